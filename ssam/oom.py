"""Run a batch function, halving the batch on CUDA out-of-memory.

A batch that does not fit is split in two and each half retried, recursively; an item that
still runs out of memory alone comes back as :class:`Failed` (reason ``gpu_oom``) instead of an
exception, so a stage can write a failure record for that row and carry on with the others.

Imports nothing of ours: usable from every stage and model module.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

# torch.OutOfMemoryError is torch >= 2.5; earlier releases only have the cuda alias.
OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
)


@dataclass(frozen=True)
class Failed:
    """An item that could not be processed even alone."""

    reason: str  # "gpu_oom"
    message: str  # first line of the error


def free_cuda_memory() -> None:
    """Drop unreachable tensors and hand cached CUDA blocks back (no-op without CUDA)."""
    gc.collect()  # an OOM traceback's frames can sit in reference cycles that pin the batch's tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_halving_on_oom(
    fn: Callable[[list[T]], Sequence[R]], items: Sequence[T], *, reason: str = "gpu_oom"
) -> list[R | Failed]:
    """``fn(items)``, retried on halves after CUDA out-of-memory.

    Args:
        fn: takes a list of items, returns one result per item, in order.
        items: the batch.
        reason: the :attr:`Failed.reason` of an item that runs out of memory alone.

    Returns:
        One entry per item, in order: ``fn``'s result, or :class:`Failed`.

    Raises:
        ValueError: ``fn`` returned a different number of results than items.
        Any other exception from ``fn``, unchanged.
    """
    items = list(items)
    if not items:
        return []
    message = None
    try:
        out = list(fn(items))
    except OOM_ERRORS as e:
        # Keep only the text: leaving the except block drops the exception and its traceback,
        # whose frames hold the failed batch's tensors; retrying inside it would keep them alive.
        message = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if message is None:
        if len(out) != len(items):
            raise ValueError(f"batch function returned {len(out)} results for {len(items)} items")
        return out
    free_cuda_memory()
    if len(items) == 1:
        log.warning("out of memory on a single item: %s", message)
        return [Failed(reason, message)]
    half = len(items) // 2
    log.warning("out of memory on %d items; retrying as %d + %d", len(items), half, len(items) - half)
    return run_halving_on_oom(fn, items[:half], reason=reason) + run_halving_on_oom(
        fn, items[half:], reason=reason
    )
