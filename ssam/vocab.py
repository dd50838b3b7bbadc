"""Vocabularies: bundled class lists (LVIS v1, COCO, Objects365 v2, ADE20K instance), files, lists."""

from __future__ import annotations

from importlib import resources

BUNDLED_VOCABS = {
    "lvis": "lvis_v1.txt",
    "coco": "coco.txt",
    "objects365": "objects365_v2.txt",
    "ade20k": "ade20k_instance.txt",
}


def normalize_name(name: str) -> str:
    """A category name as vocabularies hold it: ``Traffic_Light `` -> ``traffic light``."""
    return name.strip().replace("_", " ").lower()


def load_vocabulary(spec: str | list[str]) -> list[str]:
    """Class names, lower case, underscores as spaces, deduplicated in order.

    Args:
        spec: a bundled name (``lvis``, ``coco``, ``objects365``, ``ade20k``), a text file with one
            name per line, a comma-separated list (``"cat,dog"``), or a Python list.

    Raises:
        ValueError: the vocabulary is empty. OSError: the file cannot be read.
    """
    if isinstance(spec, list):
        names = spec
    elif spec in BUNDLED_VOCABS:
        names = (resources.files("ssam") / "vocab" / BUNDLED_VOCABS[spec]).read_text().splitlines()
    elif "," in spec and not spec.endswith(".txt"):
        names = spec.split(",")
    else:
        with open(spec, encoding="utf-8") as f:
            names = f.read().splitlines()
    names = [normalize_name(n) for n in names if n.strip()]
    if not names:
        raise ValueError(f"vocabulary {spec!r} is empty")
    return list(dict.fromkeys(names))
