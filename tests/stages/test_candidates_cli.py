"""``ssam-pipeline candidates``, called through its module's functions and ``python -m``."""

import argparse
import json
import subprocess
import sys

import pytest

from ssam.pipeline import candidates_cli


def run(capsys, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="ssam-pipeline")
    candidates_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    rc = candidates_cli.main(parser.parse_args(["candidates", *argv]))
    out, err = capsys.readouterr()
    return rc, out, err


def test_prints_candidates_with_source_id_and_words(capsys):
    rc, out, _ = run(capsys, "a woman with a pram", "corn dogs")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "a woman with a pram"
    assert lines[1].split() == ["person", "caption", "#793", "woman"]
    assert lines[2].split() == ["baby", "buggy", "caption", "#32", "pram"]
    assert lines[3:] == ["corn dogs", "  (no candidates)"]


def test_json_vocabulary_and_controls(capsys, tmp_path):
    syn = tmp_path / "syn.txt"
    syn.write_text("television: tv, telly\n")
    rc, out, _ = run(
        capsys,
        "a telly, a dog and a cat",
        "--vocabulary",
        "coco",
        "--synonyms",
        str(syn),
        "--deny",
        "cat",
        "--json",
    )
    assert rc == 0
    got = json.loads(out)
    assert [(c["label"], c["category_id"]) for c in got["candidates"]] == [("television", 81), ("dog", 17)]
    rc, out, _ = run(capsys, "a dog and a cat", "--set", "candidates.allow=[cat]", "--json")
    assert rc == 0 and [c["label"] for c in json.loads(out)["candidates"]] == ["cat"]


def test_config_section_and_errors(capsys, tmp_path):
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[2] / "configs/pipeline/smoke.yaml"
    rc, out, _ = run(capsys, "a bus", "--config", str(smoke), "--set", "candidates.vocabulary=coco", "--json")
    assert rc == 0 and json.loads(out)["candidates"][0]["category_id"] == 6  # COCO's bus, LLM off
    rc, _, err = run(capsys, "a bus", "--vocabulary", str(tmp_path / "missing.txt"))
    assert rc == 2 and "error:" in err
    rc, _, err = run(capsys, "a bus", "--set", "max_candidates=3")
    assert rc == 2 and "candidates.KEY=VALUE" in err


def test_smoke_llm_answers_are_shown(capsys):
    rc, out, _ = run(capsys, "a street", "--llm", "smoke", "--show-answers")
    assert rc == 0 and out.count("answer t") == 3


@pytest.mark.slow
def test_python_m_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "ssam.pipeline.candidates_cli", "a man on a bike", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [c["label"] for c in json.loads(res.stdout)["candidates"]] == ["person", "bicycle"]
