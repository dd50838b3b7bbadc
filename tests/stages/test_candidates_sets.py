"""Recall and precision of caption matching and LLM-answer parsing on the sets in tests/candidates/.

The sets were written, with the answers a careful annotator gives, before the matcher and the
parser were tuned; see the head of each file for what counts as a named object.
"""

from pathlib import Path

import pytest
import yaml

from ssam.stages.candidates import parse_llm_output
from ssam.vocab import CaptionMatcher, load_categories, normalize_name

SETS = Path(__file__).resolve().parents[1] / "candidates"


def caption_cases() -> list[tuple[str, set[str]]]:
    cases = []
    for line in (SETS / "captions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            caption, _, expected = line.partition(" => ")
            cases.append((caption, {normalize_name(e) for e in expected.split(",") if e.strip()}))
    return cases


def recall_precision(pairs) -> tuple[float, float]:
    tp = sum(len(exp & got) for exp, got in pairs)
    return tp / max(1, sum(len(e) for e, _ in pairs)), tp / max(1, sum(len(g) for _, g in pairs))


def test_the_sets_are_large_and_use_real_lvis_names():
    cases = caption_cases()
    lvis = {c.name for c in load_categories("lvis")}
    assert len(cases) >= 150 and all(exp <= lvis for _, exp in cases)
    assert len(yaml.safe_load((SETS / "llm_answers.yaml").read_text())) >= 60


def test_caption_matching_recall_and_precision():
    matcher = CaptionMatcher(load_categories("lvis"))
    pairs = [(exp, {m.category.name for m in matcher(caption)}) for caption, exp in caption_cases()]
    recall, precision = recall_precision(pairs)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a woman with a pram", {"person", "baby buggy"}),
        ("Corn dogs on a stick", set()),
        ("BlackBerry phone with a keyboard case", {"cellular telephone"}),
        ("Navy pencil skirt", {"skirt"}),
        ("bull terrier running on the beach", {"dog"}),
        ("hot-air balloons and a T-shirt", {"hot-air balloon", "jersey"}),
    ],
)
def test_issue_examples(caption, expected):
    assert {m.category.name for m in CaptionMatcher(load_categories("lvis"))(caption)} == expected


def test_llm_answer_parsing_recall_and_precision():
    cases = yaml.safe_load((SETS / "llm_answers.yaml").read_text())
    pairs = [(set(c["expected"]), set(parse_llm_output(c["answer"] or ""))) for c in cases]
    recall, precision = recall_precision(pairs)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
