"""Run directories on a local disk or in object storage (``s3://``, ``gs://``, any fsspec URL).

A path is a string (or ``os.PathLike``): a local path, or a URL whose scheme names an fsspec
filesystem. Local paths keep their POSIX semantics (atomic rename through :mod:`ssam.io`); on
object storage a single object is written by one PUT, which is atomic (readers see the old
object or the new one), so the commit-marker rule holds there too: markers are written last,
and readers trust only markers (docs/FORMAT.md).

S3-compatible endpoints (MinIO, Ceph, moto) are reached through the standard variables:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``. ``gs://`` needs ``gcsfs`` (the ``gcs`` extra).
"""

from __future__ import annotations

import glob as _glob
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any

from .io import atomic_path


def is_remote(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def _fs(path: str):
    from fsspec.core import url_to_fs

    return url_to_fs(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for local paths and URLs alike."""
    if not is_remote(base):
        return str(Path(base).joinpath(*parts))
    return "/".join([os.fspath(base).rstrip("/"), *(p.strip("/") for p in parts)])


def name(path: str | os.PathLike) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str | os.PathLike) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[0] if is_remote(path) else str(Path(path).parent)


def exists(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(os.fspath(path))
    return fs.exists(p)


def open_file(path: str | os.PathLike, mode: str = "rb") -> IO:
    """An open file object (the caller closes it; use ``with``)."""
    if not is_remote(path):
        return open(path, mode)  # noqa: SIM115 -- returned to the caller's with-block
    fs, p = _fs(os.fspath(path))
    return fs.open(p, mode)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Publish ``data`` at ``path`` all at once: a temporary and a rename locally, one PUT remotely."""
    if not is_remote(path):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return
    fs, p = _fs(os.fspath(path))
    fs.pipe_file(p, data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def put_file(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Publish a finished local file at ``path`` (a rename locally, an upload remotely)."""
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, path)
        return
    fs, p = _fs(os.fspath(path))
    fs.put_file(os.fspath(local), p)


def glob(pattern: str | os.PathLike) -> list[str]:
    """Matches of a glob, sorted, as paths or URLs like the pattern."""
    s = os.fspath(pattern)
    if not is_remote(s):
        return sorted(_glob.glob(s))
    fs, p = _fs(s)
    scheme = s.split("://", 1)[0]
    return sorted(f"{scheme}://{m}" for m in fs.glob(p))


def listdir(path: str | os.PathLike) -> list[str]:
    """Names of the entries of a folder ([] when it does not exist)."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = _fs(os.fspath(path))
    try:
        return sorted(name(e) for e in fs.ls(p, detail=False))
    except FileNotFoundError:
        return []


def isdir(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(os.fspath(path))
    return fs.isdir(p)


def size(path: str | os.PathLike) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = _fs(os.fspath(path))
    return int(fs.size(p))


def rm(path: str | os.PathLike, recursive: bool = False) -> None:
    """Delete a file (or a folder with ``recursive``); nothing if it is not there."""
    if not is_remote(path):
        if os.path.isdir(path):
            if recursive:
                shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
        return
    fs, p = _fs(os.fspath(path))
    try:
        fs.rm(p, recursive=recursive)
    except FileNotFoundError:
        pass


def makedirs(path: str | os.PathLike) -> None:
    """Create a local folder (and its parents); object stores have no folders to create."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)
