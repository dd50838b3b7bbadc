"""Input parquet files: find them, check their schema before any work, stream their rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ssam import storage
from ssam.paths import expand_specs
from ssam.stages.download import resolve_file_url

from .config import PipelineConfig


class InputError(ValueError):
    """The input cannot be read; the message names the file and the column."""


_TEXT = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_string_view,
    pa.types.is_dictionary,
)
_NUMBER = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)


def _expand_remote(spec: str) -> list[str]:
    """An object-storage spec's parquet files: a glob's matches, a folder's parquets, or itself."""
    if any(ch in spec for ch in "*?["):
        return storage.glob(spec)
    if storage.isdir(spec):
        return storage.glob(storage.join(spec, "*.parquet"))
    return [spec] if storage.exists(spec) else []


def resolve_inputs(paths: list[str]) -> list[str]:
    """Parquet files named by paths, directories or globs (local or object storage, e.g.
    ``s3://bucket/laion/*.parquet``), in order; a spec naming none is an error."""
    files: list[str] = []
    remote = [p for p in paths if storage.is_remote(p)]
    local = expand_specs([p for p in paths if not storage.is_remote(p)], (".parquet",))
    for spec in paths:
        found = _expand_remote(spec) if spec in remote else [str(f) for f in local[spec] if f.exists()]
        if not found:
            raise InputError(f"input {spec}: no parquet file found")
        files += found
    return files


def _check_type(path: str, column: str, typ: pa.DataType, kinds, expected: str) -> None:
    if not any(k(typ) for k in kinds):
        raise InputError(f"{path}: column '{column}' has type {typ}, expected {expected}")


def check_inputs(cfg: PipelineConfig) -> list[str]:
    """Resolve and check every input file: readable parquet, url/caption columns present and typed."""
    cols = cfg.input.columns
    files = resolve_inputs(cfg.input.path)
    for f in files:
        try:
            with storage.open_file(f) as fh:
                schema = pq.read_schema(fh)
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(f"{f}: not a readable parquet file: {e}") from e
        for role, name in (("url", cols.url), ("caption", cols.caption)):
            if name not in schema.names:
                raise InputError(
                    f"{f}: missing {role} column '{name}' (columns: {schema.names}); set input.columns.{role}"
                )
            _check_type(f, name, schema.field(name).type, _TEXT, "a string column")
        for role in ("width", "height", "similarity"):
            name = getattr(cols, role)
            if name and name in schema.names:
                _check_type(f, name, schema.field(name).type, _NUMBER, "a numeric column")
    return files


def iter_input_batches(
    cfg: PipelineConfig, files: list[str], batch_rows: int = 8192
) -> Iterator[dict[str, list]]:
    """Rows in our column names (url, caption, width, ...) plus ``src_index`` and ``fetch_url``."""
    cols = cfg.input.columns
    roles = {
        r: getattr(cols, r) for r in ("url", "caption", "width", "height", "nsfw", "similarity", "language")
    }
    index, limit = 0, cfg.input.limit
    for f in files:
        with storage.open_file(f) as fh:
            pf = pq.ParquetFile(fh)
            base = None if storage.is_remote(f) else Path(f).parent.resolve()  # relative file: URLs
            present = {r: n for r, n in roles.items() if n and n in pf.schema_arrow.names}
            for rb in pf.iter_batches(batch_size=batch_rows, columns=sorted(set(present.values()))):
                data = rb.to_pydict()
                n = rb.num_rows if limit is None else min(rb.num_rows, limit - index)
                if n <= 0:
                    return
                batch = {
                    r: data[name][:n] if name in present.values() else [None] * n
                    for r, name in ((r, present.get(r)) for r in roles)
                }
                batch["url"] = [
                    u.decode("utf-8", "replace") if isinstance(u, bytes) else u for u in batch["url"]
                ]
                batch["src_index"] = list(range(index, index + n))
                batch["fetch_url"] = [
                    resolve_file_url(u, base) if isinstance(u, str) and base else u for u in batch["url"]
                ]
                index += n
                yield batch
