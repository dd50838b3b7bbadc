"""Model weights: local paths or URLs fetched once into a cache, sha256-checked.

Nothing here falls back to random weights: a missing file raises :class:`WeightsUnavailable`
with what was missing and where to put it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from ssam.io import atomic_path


class WeightsUnavailable(RuntimeError):
    """A model's weights could not be found locally or fetched."""


def load_weights_file(
    path: str | os.PathLike,
    what: str = "",
    error: type[Exception] = WeightsUnavailable,
    kind: str = "weights file",
) -> dict:
    """``torch.load`` of a weights file (``weights_only=True``, on the CPU). A missing file, or one
    that is not a weights file, raises ``error`` naming ``what`` (e.g. "SAM vit_b checkpoint") and
    the file: torch's own errors for a corrupt file, an unpickling error among them, name neither."""
    import torch

    name = f"{what} {path}" if what else str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{name}: no such {kind}") from None
    except Exception as e:  # noqa: BLE001 -- torch raises many types for corrupt or unsafe files
        raise error(f"{name}: not a loadable {kind} ({type(e).__name__}: {str(e)[:200]})") from e


def cache_dir() -> Path:
    """``$SSAM_CACHE`` or ``~/.cache/ssam``: where fetched weights live."""
    return Path(os.environ.get("SSAM_CACHE", Path.home() / ".cache" / "ssam"))


def offline() -> bool:
    """True when fetching is disabled (``SSAM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("SSAM_OFFLINE", "HF_HUB_OFFLINE"))


def offline_reason() -> str:
    """Why fetching is off, for error messages."""
    return os.environ.get("SSAM_OFFLINE_REASON") or "fetching is off (SSAM_OFFLINE or HF_HUB_OFFLINE is set)"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fetch(source: str, sha256: str | None = None, timeout_s: float = 60.0) -> Path:
    """Return a local path for ``source`` (a path or an http(s) URL), downloading once into the cache.

    Args:
        source: a file path, or a URL whose basename names the cached file.
        sha256: expected digest; checked after download and on a cached file.
        timeout_s: socket timeout for the download.

    Raises:
        WeightsUnavailable: the path does not exist, fetching is off, the download failed,
            or the digest does not match.
    """
    if not source.startswith(("http://", "https://")):
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist")
        return path
    target = cache_dir() / "weights" / source.rsplit("/", 1)[-1]
    if target.is_file() and (sha256 is None or sha256_file(target) == sha256):
        return target
    if offline():
        raise WeightsUnavailable(f"{source} is not in the cache ({target}) and {offline_reason()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(target) as tmp:
            with urllib.request.urlopen(source, timeout=timeout_s) as r, open(tmp, "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
            if sha256 is not None and (got := sha256_file(tmp)) != sha256:
                raise WeightsUnavailable(f"{source}: sha256 {got} != expected {sha256}")
    except OSError as e:
        raise WeightsUnavailable(f"could not download {source}: {e}") from e
    return target
