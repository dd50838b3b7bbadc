"""The one place a device name (``auto``, ``cpu``, ``cuda``, ``cuda:1``) becomes a torch device."""

from __future__ import annotations

import torch


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
