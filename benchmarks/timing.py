"""What the side-by-side benchmarks share: the variants take turns, and each keeps its best.

This machine's speed drifts by a third within minutes, so a pair is timed in alternation, round by
round, never one variant's rounds after the other's.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of_interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], object] = lambda: None
) -> dict[str, float]:
    """Each variant's fastest call in seconds over ``rounds`` rounds of one call each, in turn;
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after every call."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, fn in variants.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t)
    return best
