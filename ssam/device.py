"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:1``) becomes a torch device;
where the models run in bf16 (:func:`use_bf16`, :func:`bf16_autocast`); :class:`CompiledOrEager`, a
compiled function that falls back to its eager self; :func:`keep_freed_memory`, the C
allocator's setting for the batched engines on a CPU; and :func:`torch_threads`, a stage's CPU
threads while it runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from contextlib import contextmanager, nullcontext

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when one is visible, else the CPU; other names as given.

    Raises:
        ValueError: a CUDA device is asked for and none is visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA device is visible")
    return device


def use_bf16(device: torch.device, cuda: bool, cpu: bool) -> bool:
    """Whether the models on ``device`` run in bfloat16: on CUDA when ``cuda`` (the ``bf16``
    settings, on by default), on a CPU when ``cpu`` (the ``cpu_bf16`` settings, off by default)
    and the CPU does bf16 products in hardware (:func:`cpu_has_bf16`); asked for on a CPU without
    them, float32 with a warning, as torch would emulate bf16 there, slower than float32.
    """
    if device.type == "cuda":
        return cuda
    if device.type != "cpu" or not cpu:
        return False
    if cpu_has_bf16():
        return True
    if not _warned_no_cpu_bf16:
        _warned_no_cpu_bf16.append(True)
        log.warning("cpu_bf16 is on but this CPU has neither AVX512-BF16 nor AMX: running in float32")
    return False


_warned_no_cpu_bf16: list[bool] = []


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 or AMX, which torch's oneDNN kernels use for bf16 products.

    Where it has (the 2-core CPU of ``benchmarks/README.md``), bf16 ran SAM vit_b's image encoder,
    its mask decoder and CLIP ViT-B-32's image tower x1.8-1.9 faster than float32.
    """
    # torch's own CPU feature checks (private, so each looked up; absent means no)
    checks = (
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return any(bool(check()) for check in checks if check is not None)


def bf16_autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (decided by :func:`use_bf16`); else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


class CompiledOrEager:
    """Calls a ``torch.compile``'d function, and the eager one from its first failure on.

    A compiled function fails on its first call where there is no compiler or an op Inductor
    cannot handle; the caller then runs eagerly, with a warning, once. CUDA out-of-memory errors
    pass through (the callers' batch halving handles them). ``fn`` is what runs now.
    """

    def __init__(self, eager, enabled: bool, what: str, dynamic_batch: bool = False):
        self.eager, self.what, self.dynamic_batch = eager, what, dynamic_batch
        self.fn = torch.compile(eager) if enabled else eager

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, *args, **kwargs):
        if self.dynamic_batch and self.compiled:
            return self._one_graph_for_every_batch_size(args, kwargs)
        return self._call(*args, **kwargs)

    def _one_graph_for_every_batch_size(self, args, kwargs):
        """``dynamic_batch``: every tensor argument's first dimension is the same batch, of any size.

        Left alone, torch.compile specialises the first batch size, compiles again with a dynamic
        one at the second size, and a third time for a batch of 1 (dynamo treats 0 and 1 apart).
        Here the dimension is marked dynamic from the first call, and a batch of 1 runs as a batch
        of 2 (the row twice; each tensor output's first row kept), so one graph serves them all.
        """
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        n = tensors[0].shape[0] if tensors else 0
        if n == 0:
            return self.eager(*args, **kwargs)
        if n == 1:
            twice = [torch.cat([a, a]) if isinstance(a, torch.Tensor) else a for a in args]
            out = self._one_graph_for_every_batch_size(twice, kwargs)
            return tuple(o[:1] if isinstance(o, torch.Tensor) else o for o in out)
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)
        return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if not self.compiled:
                raise
            log.warning("torch.compile of %s failed, running it eagerly: %s", self.what, str(e)[:300])
            self.fn = self.eager
            return self.fn(*args, **kwargs)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_ENV = "SSAM_KEEP_FREED_MEMORY"
_kept: bool | None = None


@contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to ``n`` inside the block and put back after it (``n`` 0: unchanged).

    torch's thread count is process-wide: a stage that set it once for itself would set it for
    every stage sharing its process (the local executor runs them all in one; so do
    ``ray.fuse_gpu_stages`` and the benchmarks). Scoped to the stage's own calls, each stage runs
    at its own setting. Under Ray an actor otherwise gets ``floor(num_cpus)`` threads, at least one
    (Ray sets ``OMP_NUM_THREADS``, which torch reads).
    """
    before = torch.get_num_threads()
    change = bool(n) and n != before
    if change:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if change:
            torch.set_num_threads(before)


def keep_freed_memory(mmap_mib: int = 64, trim_mib: int = 256) -> bool:
    """Let glibc's malloc keep freed buffers for reuse instead of handing them back to the kernel.

    The batched engines on a CPU allocate buffers of several MB per batch (mask windows, crops,
    activations). By default glibc serves large buffers with fresh ``mmap`` pages or gives freed
    heap back once much of it is free, so a batch can pay a page fault per 4 KiB it touches first
    (whether it does depends on the heap's history, as glibc adapts its threshold): up to ~1,450
    faults per image of the CPU labels stage, about a quarter of its time at one thread on the
    machine of ``benchmarks/README.md``. Here buffers under ``mmap_mib`` come
    from the heap and up to ``trim_mib`` of freed heap is kept, so the next batch reuses the same
    pages (what PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc). The cost is
    that the process keeps up to ``trim_mib`` of freed memory.

    Process-wide and done once; off with ``SSAM_KEEP_FREED_MEMORY=0``; a no-op where the C library
    has no ``mallopt`` (not glibc).

    Returns:
        Whether the setting is in effect.
    """
    global _kept
    if _kept is None:
        _kept = False
        if os.environ.get(KEEP_FREED_ENV, "1") != "0":
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            mallopt = getattr(libc, "mallopt", None)
            if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):
                _kept = bool(mallopt(M_MMAP_THRESHOLD, mmap_mib << 20)) and bool(
                    mallopt(M_TRIM_THRESHOLD, trim_mib << 20)
                )
        log.debug("keep freed memory: %s", _kept)
    return _kept
