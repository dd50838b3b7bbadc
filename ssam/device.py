"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:1``) becomes a torch device;
and :class:`CompiledOrEager`, a compiled function that falls back to its eager self."""

from __future__ import annotations

import logging

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


class CompiledOrEager:
    """Calls a ``torch.compile``'d function, and the eager one from its first failure on.

    A compiled function fails on its first call where there is no compiler or an op Inductor
    cannot handle; the caller then runs eagerly, with a warning, once. CUDA out-of-memory errors
    pass through (the callers' batch halving handles them). ``fn`` is what runs now.
    """

    def __init__(self, eager, enabled: bool, what: str):
        self.eager, self.what = eager, what
        self.fn = torch.compile(eager) if enabled else eager

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, *args, **kwargs):
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
