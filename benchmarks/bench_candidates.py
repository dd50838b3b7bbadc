"""Caption matching with the bundled LVIS: captions/s now and at a git revision, side by side in one run.

The revision's ``stages/candidates.py`` and ``ssam/vocab.py`` (by default ``HEAD``) are loaded from
git into private modules (its ``VocabularyMatcher``; from 9068dd2 on, its ``CaptionMatcher``), so
both matchers run in the same process on the same captions: the caption test set
(tests/candidates/captions.txt) repeated to ``--captions``. Also reports recall and precision of
both on that set (a ``VocabularyMatcher``'s labels compared by plain name). Building the matcher
(loading the vocabulary) is timed apart from matching. A pass over the captions takes well under a
second, so the two matchers take turns for ``--repeat`` rounds and each reports its best round: on
a shared machine one slow round no longer decides the ratio. ``--unique`` matches captions that are
all new instead (each round its own): the head of one test caption and the tail of another, their
words shuffled half the time, so word pairs are new too::

    .venv/bin/python benchmarks/bench_candidates.py
    .venv/bin/python benchmarks/bench_candidates.py --rev 67a4cac --captions 20000 --repeat 9
    .venv/bin/python benchmarks/bench_candidates.py --rev 67a4cac --unique
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable
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


def unique_captions(cases: list[tuple[str, set[str]]], n: int, seed: int) -> list[str]:
    """``n`` made-up captions, nearly all distinct: the head of one test caption and the tail of another."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(cases)[0].split(), rng.choice(cases)[0].split()
        words = a[: rng.randint(1, len(a))] + b[rng.randint(0, len(b) - 1) :]
        if rng.random() < 0.5:
            rng.shuffle(words)
        out.append(" ".join(words))
    return out


def old_matcher(rev: str) -> tuple[Callable[[str], list[str]], bool]:
    """The revision's matcher on the bundled LVIS as a callable caption -> labels, and whether its
    labels are plain names: its ``CaptionMatcher`` (9068dd2 on), else its ``VocabularyMatcher``."""

    def module(path: str, name: str, package: str, extra: dict) -> types.ModuleType:
        src = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
        )
        mod = types.ModuleType(name)
        mod.__package__ = package
        mod.__dict__.update(extra)
        sys.modules[name] = mod  # dataclasses look their module up
        exec(
            compile(src.stdout.replace("from ssam.vocab import load_vocabulary", ""), path, "exec"),
            mod.__dict__,
        )
        return mod

    vocab = module("ssam/vocab.py", "ssam._bench_old_vocab", "ssam", {})
    if hasattr(vocab, "CaptionMatcher"):
        return names(vocab.CaptionMatcher(vocab.load_categories("lvis"))), False
    stage = module(
        "stages/candidates.py",
        "ssam.stages._bench_old_candidates",
        "ssam.stages",
        {"load_vocabulary": vocab.load_vocabulary},
    )
    return stage.VocabularyMatcher(vocab.load_vocabulary("lvis")), True


def names(matcher) -> Callable[[str], list[str]]:
    """A ``CaptionMatcher`` as a callable caption -> category names."""
    return lambda caption: [x.category.name for x in matcher(caption)]


def new_matcher() -> tuple[Callable[[str], list[str]], bool]:
    from ssam.vocab import CaptionMatcher, load_categories

    return names(CaptionMatcher(load_categories("lvis"))), False


def build(make, captions: list[str]) -> tuple[float, tuple[Callable[[str], list[str]], bool]]:
    """The seconds ``make`` took and what it made, a matcher (and whether its labels are plain names),
    warmed on 200 captions (its word caches, as a long-running stage has them)."""
    t0 = time.perf_counter()
    made = make()
    build_s = time.perf_counter() - t0
    for c in captions[:200]:
        made[0](c)
    return build_s, made


def captions_per_s(match, captions: list[str]) -> float:
    t0 = time.perf_counter()
    for c in captions:
        match(c)
    return len(captions) / (time.perf_counter() - t0)


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
    ap.add_argument("--captions", type=int, default=10_000, help="captions matched per matcher and round")
    ap.add_argument("--repeat", type=int, default=5, help="rounds, matchers taking turns; best counts")
    ap.add_argument("--unique", action="store_true", help="new made-up captions, not the test set repeated")
    args = ap.parse_args()
    cases = caption_set()
    captions = [cases[i % len(cases)][0] for i in range(args.captions)]
    if args.unique:
        captions = unique_captions(cases, args.captions, seed=-1)  # the warm-up's
    matchers = []
    for name, make in (
        (f"old ({args.rev})", lambda: old_matcher(args.rev)),
        ("new (working tree)", new_matcher),
    ):
        build_s, (match, by_plain) = build(make, captions)
        matchers.append((name, build_s, match, by_plain))
    best = [0.0] * len(matchers)
    for r in range(max(1, args.repeat)):
        if args.unique:
            captions = unique_captions(cases, args.captions, seed=r)
        for j, (_, _, match, _) in enumerate(matchers):
            best[j] = max(best[j], captions_per_s(match, captions))
    rows = []
    for (name, build_s, match, by_plain), per_s in zip(matchers, best, strict=True):
        recall, precision = quality(match, cases, by_plain)
        rows.append((name, build_s, per_s, recall, precision))
    kind = "made-up, all new" if args.unique else f"{len(cases)} distinct"
    print(
        f"caption matching, bundled LVIS, {args.captions} captions ({kind}), "
        f"best of {max(1, args.repeat)} rounds"
    )
    print(f"{'matcher':<20} {'build s':>8} {'captions/s':>11} {'recall':>7} {'precision':>9}")
    for name, build_s, per_s, recall, precision in rows:
        print(f"{name:<20} {build_s:>8.2f} {per_s:>11.0f} {recall:>7.3f} {precision:>9.3f}")
    print(f"new / old captions/s: x{rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
