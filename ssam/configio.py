"""YAML configs into pydantic models, for the pipeline and the trainer alike.

``load_validated`` reads a file, applies ``--set key=value`` overrides (values parsed as YAML),
validates, and turns every validation problem into one message naming the file and each bad key.
``config_rows`` renders every leaf key as a Markdown table row (the README's config references).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


def set_key(raw: dict, dotted: str, value: str, error: type[Exception]) -> None:
    """Apply ``--set a.b.c=value`` to a raw config dict; the value is parsed as YAML."""
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        if not isinstance(node.setdefault(p, {}), dict):
            raise error(f"--set {dotted}: '{p}' is not a section")
        node = node[p]
    node[leaf] = yaml.safe_load(value) if value != "" else ""


def _explain(err: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        node: Any = model
        for p in err["loc"][:-1]:
            field = node.model_fields.get(str(p)) if hasattr(node, "model_fields") else None
            node = field.annotation if field is not None else None
        known = sorted(node.model_fields) if hasattr(node, "model_fields") else []
        return f"key '{loc}': unknown key; expected one of {known}"
    if err["type"] == "missing":
        return f"key '{loc}': required"
    got = err.get("input")
    got = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"key '{loc}': {err['msg']}{got}"


def load_validated(
    model: type[M], path: str | Path | None, overrides: list[str], error: type[Exception]
) -> M:
    """Read YAML (or start empty), apply overrides, validate into ``model``.

    Raises:
        error: unreadable file, bad YAML, a malformed override, unknown key, wrong type or value.
    """
    where = str(path) if path else "<config>"
    raw: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise error(f"{where}: cannot read config: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise error(f"{where}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise error(f"{where}: expected a mapping of sections at the top level")
        raw = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise error(f"--set {item!r}: expected key=value")
        set_key(raw, key.strip(), value, error)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = [_explain(err, model) for err in e.errors()]
        raise error(f"{where}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def config_rows(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """Markdown table rows ``| key | type | default | description |`` for every leaf key.

    ``defaults``: the section's default instance, when its parent builds it with other values than
    the class's own (``ray.write`` is a ``StageResources`` with 0.25 CPUs, not 1).
    """
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if defaults is not None:
            value, known = getattr(defaults, name), True
        elif field.is_required():
            value, known = None, False
        else:
            value, known = field.get_default(call_default_factory=True), True
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += config_rows(ann, key + ".", value)
            continue
        default = f"`{value!r}`" if known else "required"
        type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
        rows.append(f"| `{key}` | `{type_name}` | {default} | {field.description or ''} |")
    return rows


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated.

    A sub-section given in part keeps the defaults its parent gives it for the rest: with
    ``ray.write`` built as 0.25 CPUs and 4 tasks, ``--set ray.write.batch_size=128`` changes the
    batch size only (pydantic alone would rebuild the section from its class's defaults).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _partial_sections_keep_their_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            given = out.get(name)
            if not isinstance(given, dict) or field.default_factory is None:
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                out[name] = {**default.model_dump(exclude_unset=True), **given}
        return out
