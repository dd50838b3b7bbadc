"""The layering of docs/ARCHITECTURE.md, enforced: who may import whom.

foundation ``ssam`` (format, io, config loading, ...)  <-  ``ssam.model``  <-  ``ssam.stages``  <-  ``ssam.pipeline``

- the foundation imports nothing else of ours;
- ``model`` imports the foundation (and itself), never stages or pipeline;
- ``stages`` import the foundation and model's networks and inference, never training code;
- ``pipeline`` imports stages, the foundation and model's networks, never training code;
- Ray is imported only by ``pipeline`` and, lazily for Ray Train, by ``model/train.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {
    "ssam": REPO / "ssam",
    "model": REPO / "model",
    "stages": REPO / "stages",
    "pipeline": REPO / "pipeline",
}
TRAINING = {
    "ssam.model.train",
    "ssam.model.train_config",
    "ssam.model.data",
    "ssam.model.losses",
    "ssam.model.synthetic",
    "ssam.model.cli",
}
FOUNDATION_MODULES = {p.stem for p in (REPO / "ssam").glob("*.py")} | {"vocab"}


def module_name(layer: str, path: Path) -> str:
    package = "ssam" if layer == "ssam" else f"ssam.{layer}"
    return f"{package}.{path.stem}" if path.stem != "__init__" else package


def imports_of(layer: str, path: Path) -> list[tuple[int, str]]:
    """Absolute names of every module ``path`` imports (relative imports resolved), with line numbers."""
    package = (
        module_name(layer, path).rsplit(".", 1)[0] if path.stem != "__init__" else module_name(layer, path)
    )
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if f"{base}.{a.name}" in TRAINING]
    return out


def layer_of(name: str) -> str | None:
    """Which of our layers a module name belongs to (None: not ours)."""
    if name == "ssam" or (name.startswith("ssam.") and name.split(".")[1] in FOUNDATION_MODULES):
        return "ssam"
    if name.startswith("ssam."):
        return name.split(".")[1]
    return None


ALLOWED = {
    "ssam": {"ssam"},
    "model": {"ssam", "model"},
    "stages": {"ssam", "model", "stages"},
    "pipeline": {"ssam", "model", "stages", "pipeline"},
}


def all_sources():
    for layer, folder in LAYERS.items():
        for path in sorted(folder.glob("*.py")):
            yield layer, path


@pytest.mark.parametrize(("layer", "path"), list(all_sources()), ids=lambda v: getattr(v, "name", v))
def test_imports_follow_the_layers(layer, path):
    bad = []
    for line, name in imports_of(layer, path):
        target = layer_of(name)
        if target is not None and target not in ALLOWED[layer]:
            bad.append(f"{path.relative_to(REPO)}:{line} imports {name} ({layer} may not import {target})")
        if layer in ("stages", "pipeline") and name in TRAINING:
            bad.append(f"{path.relative_to(REPO)}:{line} imports training code {name}")
        if name.split(".")[0] == "ray" and layer not in ("pipeline",) and path.name != "train.py":
            bad.append(f"{path.relative_to(REPO)}:{line} imports Ray outside the pipeline")
    assert bad == []


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: a stage that imports the trainer, and a foundation module that imports a stage."""
    stage = tmp_path / "bad_stage.py"
    stage.write_text("from ssam.model.train import Trainer\nfrom ssam.format import write_shard\n")
    names = [n for _, n in imports_of("stages", stage)]
    assert "ssam.model.train.Trainer" not in TRAINING and "ssam.model.train" in names
    assert layer_of("ssam.format") == "ssam" and layer_of("ssam.stages.masks") == "stages"
    found = tmp_path / "bad_found.py"
    found.write_text("from .stages.masks import MaskStage\n")
    assert [layer_of(n) for _, n in imports_of("ssam", found)][0] == "stages"
