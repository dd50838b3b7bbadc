"""ssam.oom: halving a batch on CUDA out-of-memory, with a simulated OOM (no GPU needed)."""

import pytest
import torch

from ssam.oom import Failed, run_halving_on_oom


class FitsAtMost:
    """A batch function that runs out of memory above ``n`` items, or whenever ``poison`` is in the batch."""

    def __init__(self, n, poison=(), error=torch.OutOfMemoryError):
        self.n, self.poison, self.error, self.calls = n, set(poison), error, []

    def __call__(self, items):
        self.calls.append(list(items))
        if len(items) > self.n or self.poison & set(items):
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in items]


def test_a_batch_that_fits_runs_once():
    fn = FitsAtMost(8)
    assert run_halving_on_oom(fn, range(5)) == [0, 10, 20, 30, 40]
    assert fn.calls == [[0, 1, 2, 3, 4]]


def test_out_of_memory_halves_until_the_pieces_fit_and_keeps_the_order():
    fn = FitsAtMost(2)
    assert run_halving_on_oom(fn, range(7)) == [x * 10 for x in range(7)]
    assert fn.calls == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2], [0], [1, 2], [3, 4, 5, 6], [3, 4], [5, 6]]


def test_an_item_that_fails_alone_is_reported_not_raised():
    fn = FitsAtMost(4, poison={5})
    out = run_halving_on_oom(fn, range(8))
    assert out[:5] == [0, 10, 20, 30, 40] and out[6:] == [60, 70]
    assert isinstance(out[5], Failed) and out[5].reason == "gpu_oom"
    assert out[5].message.startswith("CUDA out of memory")
    assert run_halving_on_oom(FitsAtMost(0), ["a"], reason="oom")[0].reason == "oom"


def test_cuda_alias_is_caught_and_other_errors_propagate():
    assert run_halving_on_oom(FitsAtMost(1, error=torch.cuda.OutOfMemoryError), [1, 2]) == [10, 20]
    # Any other error, even a RuntimeError (OOM's base class), propagates at once: no halving.
    fn = FitsAtMost(1, error=RuntimeError)
    with pytest.raises(RuntimeError):
        run_halving_on_oom(fn, [1, 2])
    assert len(fn.calls) == 1


def test_empty_batch_and_wrong_result_count():
    fn = FitsAtMost(1)
    assert run_halving_on_oom(fn, []) == [] and fn.calls == []
    with pytest.raises(ValueError, match="2 results for 3 items"):
        run_halving_on_oom(lambda items: items[:2], [1, 2, 3])
