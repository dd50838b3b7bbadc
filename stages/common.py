"""Row bookkeeping shared by the stages.

A batch is ``dict[str, list | np.ndarray]`` (Ray Data's numpy batch format). Every row carries
``status`` (``"ok"`` or a failure reason), ``fail_stage`` and ``fail_detail``. A stage works on
the ``ok`` rows and passes the others through untouched, so every input row reaches the writer.
One bad row never raises out of a stage: :func:`map_rows` turns its exception into a failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np

OK = "ok"


class RowFailure(Exception):
    """Raised by per-row code to mark the row failed with a known reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def batch_len(batch: dict[str, Any]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def as_list(col: Any) -> list:
    return col.tolist() if isinstance(col, np.ndarray) else list(col)


def to_lists(batch: dict[str, Any]) -> dict[str, list]:
    """A mutable copy of a batch with every column as a Python list."""
    return {k: as_list(v) for k, v in batch.items()}


def ok_indices(batch: dict[str, list]) -> list[int]:
    return [i for i, s in enumerate(batch["status"]) if s == OK]


def mark_failed(batch: dict[str, list], i: int, stage: str, reason: str, detail: str = "") -> None:
    batch["status"][i] = reason
    batch["fail_stage"][i] = stage
    batch["fail_detail"][i] = detail[:500]


def map_rows(
    batch: dict[str, list], stage: str, fn: Callable[[int], dict[str, Any]], new_columns: dict[str, Any]
) -> None:
    """Apply ``fn(i) -> {column: value}`` to every ok row, in place.

    ``new_columns`` gives each output column's value for rows that are not ok (or fail here).
    A :class:`RowFailure` marks the row with its reason; any other exception with ``stage_error``.
    """
    n = batch_len(batch)
    for col, default in new_columns.items():
        batch.setdefault(col, [default] * n)
    for i in ok_indices(batch):
        try:
            for col, value in fn(i).items():
                batch[col][i] = value
        except RowFailure as e:
            mark_failed(batch, i, stage, e.reason, e.detail)
        except Exception as e:  # noqa: BLE001 -- one bad row must not stop the run; it is recorded
            mark_failed(batch, i, stage, "stage_error", f"{type(e).__name__}: {e}")


ROW_COLUMNS = ("key", "status", "fail_stage", "fail_detail")


class StageContractError(RuntimeError):
    """A batch lacks a column its stage reads, or the stage failed to write one it declares.

    A bug in the graph or a stage, never a bad row: it stops the run with the stage and columns named.
    """


class Stage:
    """The stage contract, shared by the Ray Data actors and the local loop.

    Subclasses set ``name``, the columns they ``reads`` and ``writes`` (and ``drops``), take their
    own config section in ``__init__`` and implement :meth:`process`, which edits a batch of Python
    lists in place. ``__call__`` checks the contract once per batch, runs :meth:`process` (at
    ``torch_threads`` CPU threads, where a stage sets it) and records the batch's wall time in
    ``t_<name>``.
    """

    name: str = ""
    torch_threads: int = 0  # torch's CPU threads while this stage runs (0: the process's as they are)
    batch_attempts: int = 2  # a batch whose stage raises outside the per-row guard is tried again once
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()

    def process(self, batch: dict[str, list]) -> None:
        raise NotImplementedError

    def _process_with_retries(self, batch: dict[str, list]) -> dict[str, list]:
        """:meth:`process` on a copy of the batch; an exception that escapes it (outside the
        per-row guard: a model call on the whole batch, say) is retried on a fresh copy, and after
        ``batch_attempts`` its rows become ``stage_error`` failure records, never a dead run."""
        error: Exception | None = None
        for _ in range(self.batch_attempts):
            work = {k: list(v) for k, v in batch.items()}
            try:
                self.process(work)
                return work
            except StageContractError:
                raise
            except Exception as e:  # noqa: BLE001 -- recorded on every row of the batch below
                error = e
        return _fail_batch(self, batch, error)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        started = time.perf_counter()
        out = to_lists(batch)
        missing = [c for c in self.reads if c not in out]
        if missing:
            raise StageContractError(
                f"stage {self.name!r} reads columns {missing} that the batch lacks (it has {sorted(out)})"
            )
        threads = nullcontext()
        if self.torch_threads:
            from ssam.device import torch_threads  # torch only for stages that use it

            threads = torch_threads(self.torch_threads)
        with threads:
            out = self._process_with_retries(out)
        absent = [c for c in self.writes if c not in out] + [c for c in self.drops if c in out]
        if absent:
            raise StageContractError(f"stage {self.name!r} broke its contract on columns {absent}")
        record_time(out, self.name, started)
        return out


def _fail_batch(stage: Stage, batch: dict[str, list], error: Exception) -> dict[str, list]:
    """Every ok row of a batch its stage could not process becomes a ``stage_error`` record."""
    n = batch_len(batch)
    for col in stage.writes:
        batch.setdefault(col, [None] * n)
    for col in stage.drops:
        batch.pop(col, None)
    detail = f"batch of {n} failed {stage.batch_attempts} times: {type(error).__name__}: {error}"
    for i in ok_indices(batch):
        mark_failed(batch, i, stage.name, "stage_error", detail)
    return batch


def record_time(batch: dict[str, list], stage: str, started: float) -> None:
    """Spread a batch's wall time over its rows in column ``t_<stage>`` (for the run summary)."""
    n = batch_len(batch)
    if n:
        batch[f"t_{stage}"] = [(time.perf_counter() - started) / n] * n
