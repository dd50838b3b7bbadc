"""File specs as users give them: files, folders, globs."""

from __future__ import annotations

import glob
from pathlib import Path


def expand_specs(specs: list[str], suffixes: tuple[str, ...]) -> dict[str, list[Path]]:
    """For each spec, its files: a folder gives its files with one of ``suffixes`` (sorted), a
    glob its matches (sorted), anything else itself (existing or not; the caller decides)."""
    out: dict[str, list[Path]] = {}
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            out[spec] = sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
        elif any(ch in spec for ch in "*?["):
            out[spec] = [Path(x) for x in sorted(glob.glob(str(p)))]
        else:
            out[spec] = [p]
    return out
