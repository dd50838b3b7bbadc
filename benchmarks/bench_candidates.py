"""Caption matching with the bundled LVIS: captions/s now and at a git revision, side by side in one run.

The revision's ``stages/candidates.py`` and ``ssam/vocab.py`` (by default ``HEAD``) are loaded from
git into private modules, so both matchers run in the same process on the same captions: the
caption test set (tests/candidates/captions.txt) repeated to ``--captions``. Also reports recall
and precision of both on that set (the old matcher's labels compared by plain name). Building the
matcher (loading the vocabulary) is timed apart from matching::

    .venv/bin/python benchmarks/bench_candidates.py
    .venv/bin/python benchmarks/bench_candidates.py --rev 67a4cac --captions 20000
"""

from __future__ import annotations

import argparse
import subprocess
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = REPO / "tests" / "candidates" / "captions.txt"


def caption_set() -> list[tuple[str, set[str]]]:
    from ssam.vocab import normalize_name

    cases = []
    for line in CAPTIONS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            caption, _, expected = line.partition(" => ")
            cases.append((caption, {normalize_name(e) for e in expected.split(",") if e.strip()}))
    return cases


def old_matcher(rev: str):
    """The revision's ``VocabularyMatcher(load_vocabulary("lvis"))``, as a callable caption -> labels."""

    def module(path: str, name: str, package: str, extra: dict) -> types.ModuleType:
        src = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
        )
        mod = types.ModuleType(name)
        mod.__package__ = package
        mod.__dict__.update(extra)
        exec(
            compile(src.stdout.replace("from ssam.vocab import load_vocabulary", ""), path, "exec"),
            mod.__dict__,
        )
        return mod

    vocab = module("ssam/vocab.py", "ssam._bench_old_vocab", "ssam", {})
    stage = module(
        "stages/candidates.py",
        "ssam.stages._bench_old_candidates",
        "ssam.stages",
        {"load_vocabulary": vocab.load_vocabulary},
    )
    return stage.VocabularyMatcher(vocab.load_vocabulary("lvis"))


def new_matcher():
    from ssam.vocab import CaptionMatcher, load_categories

    m = CaptionMatcher(load_categories("lvis"))
    return lambda caption: [x.category.name for x in m(caption)]


def timed(build, captions: list[str]) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    match = build()
    t1 = time.perf_counter()
    for c in captions[:200]:  # warm the word caches, as a long-running stage has them
        match(c)
    t2 = time.perf_counter()
    for c in captions:
        match(c)
    return t1 - t0, len(captions) / (time.perf_counter() - t2), match


def quality(match, cases, by_plain: bool) -> tuple[float, float]:
    from ssam.vocab import plain_name

    tp = n_exp = n_got = 0
    for caption, expected in cases:
        exp = {plain_name(e) for e in expected} if by_plain else expected
        got = set(match(caption))
        tp, n_exp, n_got = tp + len(exp & got), n_exp + len(exp), n_got + len(got)
    return tp / max(1, n_exp), tp / max(1, n_got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the old matcher (default HEAD)")
    ap.add_argument("--captions", type=int, default=10_000, help="captions matched per matcher")
    args = ap.parse_args()
    cases = caption_set()
    captions = [cases[i % len(cases)][0] for i in range(args.captions)]
    rows = []
    for name, build, by_plain in (
        (f"old ({args.rev})", lambda: old_matcher(args.rev), True),
        ("new (working tree)", new_matcher, False),
    ):
        build_s, per_s, match = timed(build, captions)
        recall, precision = quality(match, cases, by_plain)
        rows.append((name, build_s, per_s, recall, precision))
    print(f"caption matching, bundled LVIS, {args.captions} captions ({len(cases)} distinct)")
    print(f"{'matcher':<20} {'build s':>8} {'captions/s':>11} {'recall':>7} {'precision':>9}")
    for name, build_s, per_s, recall, precision in rows:
        print(f"{name:<20} {build_s:>8.2f} {per_s:>11.0f} {recall:>7.3f} {precision:>9.3f}")
    print(f"new / old captions/s: x{rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
