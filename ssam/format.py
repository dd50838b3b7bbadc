"""The shard format (docs/FORMAT.md): the one module that writes, reads and validates it.

A shard ``NNNNN`` is four files in one directory::

    NNNNN.tar              WebDataset: KEY.jpg, KEY.json, optional KEY.emb.npy per sample
    NNNNN.parquet          one row per annotation (analytics)
    NNNNN.failures.parquet one row per input that did not make it
    NNNNN.stats.json       counts, timings, provenance -- written last: the commit marker

All four are written under a private temporary directory and renamed into place, with
``stats.json`` renamed last; a shard without its ``stats.json`` is incomplete and is removed by
:func:`remove_incomplete` before a run resumes. Readers only ever look at complete shards.
The pipeline writes this format, the trainer reads it, and nothing else parses it by hand.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

PIPELINE_VERSION = "0.1.0"
SHARD_DIGITS = 5
MANIFEST = "manifest.json"
PARTS_DIR = "_parts"  # per-batch parts of shards being written (stages/write.py); never read as output

ANNOTATION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("ann_id", pa.int32()),
        ("label", pa.string()),
        ("label_score", pa.float32()),
        ("bbox_x", pa.float32()),
        ("bbox_y", pa.float32()),
        ("bbox_w", pa.float32()),
        ("bbox_h", pa.float32()),
        ("area", pa.int64()),
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
        ("segmentation_counts", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)

FAILURE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# Every failure reason the pipeline emits, with the stage that emits it (README documents them).
FAILURE_REASONS = {
    "missing_url": "filter",
    "bad_url": "filter",
    "url_refused": "filter",
    "duplicate_url": "filter",
    "nsfw": "filter",
    "too_small": "filter",
    "low_similarity": "filter",
    "language": "filter",
    "empty_caption": "filter",
    "download_failed": "download",
    "decode_failed": "decode",
    "decompression_bomb": "decode",
    "image_too_small": "decode",
    "near_duplicate": "dedup",
    "eval_overlap": "dedup",
    "no_masks": "masks",
    "gpu_oom": "masks",
    "stage_error": "any",
}

SAMPLE_JSON_KEYS = ("image", "candidates", "annotations", "provenance")
IMAGE_KEYS = ("image_id", "key", "file_name", "width", "height")
ANNOTATION_KEYS = (
    "id",
    "segmentation",
    "bbox",
    "area",
    "predicted_iou",
    "stability_score",
    "point_coords",
    "crop_box",
)


def shard_name(shard_id: int) -> str:
    """``7 -> "00007"``: the stem of every file of a shard."""
    return f"{shard_id:0{SHARD_DIGITS}d}"


def stats_path(out_dir: str | os.PathLike, shard_id: int) -> str:
    """The path of shard ``shard_id``'s ``stats.json`` (its commit marker) in ``out_dir``."""
    return storage.join(os.fspath(out_dir), f"{shard_name(shard_id)}.stats.json")


@dataclass
class Sample:
    """One written sample: the stored JPEG, its JSON (docs/FORMAT.md) and optional crop embeddings."""

    key: str
    jpeg: bytes
    meta: dict[str, Any]
    emb: np.ndarray | None = None  # float16 [len(annotations), D]


@dataclass
class Failure:
    """One input row that did not make it, with the stage and reason."""

    key: str
    url: str
    stage: str
    reason: str
    detail: str = ""


@dataclass
class ShardContent:
    """Everything that goes into one shard."""

    shard_id: int
    samples: list[Sample] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible tars: same content, same bytes
    tar.addfile(info, io.BytesIO(data))


def annotation_rows(sample: Sample, shard: str) -> list[dict[str, Any]]:
    """The analytics rows (ANNOTATION_SCHEMA) of one sample, one per annotation."""
    img = sample.meta["image"]
    rows = []
    for ann in sample.meta["annotations"]:
        x, y, w, h = ann["bbox"]
        rows.append(
            {
                "key": sample.key,
                "shard": shard,
                "ann_id": ann["id"],
                "label": ann.get("label"),
                "label_score": ann.get("label_score"),
                "bbox_x": x,
                "bbox_y": y,
                "bbox_w": w,
                "bbox_h": h,
                "area": ann["area"],
                "predicted_iou": ann["predicted_iou"],
                "stability_score": ann["stability_score"],
                "segmentation_counts": ann["segmentation"]["counts"],
                "height": img["height"],
                "width": img["width"],
            }
        )
    return rows


def write_shard(out_dir: str | os.PathLike, content: ShardContent) -> Path:
    """Write one shard atomically: all four files appear, or none.

    Args:
        out_dir: the run's shard directory (created if missing).
        content: samples, failures and stats of the shard.

    Returns:
        The path of the shard's ``stats.json`` (its commit marker).

    Raises:
        ValueError: a sample breaks the format (nothing is published then).
    """
    out = os.fspath(out_dir)
    storage.makedirs(out)
    stem = shard_name(content.shard_id)
    for sample in content.samples:
        errors = validate_sample(sample.meta, sample.emb)
        if errors:
            raise ValueError(f"shard {stem}: sample {sample.key} breaks the format: {errors[0]}")
    # Built in a private folder (beside the shards locally, in the temp dir for object storage),
    # then published file by file, stats.json last.
    if storage.is_remote(out):
        tmp = Path(tempfile.mkdtemp(prefix=f"ssam-{stem}-"))
    else:
        tmp = Path(out) / f".tmp-{stem}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    try:
        with tarfile.open(tmp / f"{stem}.tar", "w") as tar:
            for s in content.samples:
                _add_tar_member(tar, f"{s.key}.jpg", s.jpeg)
                _add_tar_member(tar, f"{s.key}.json", json.dumps(s.meta).encode())
                if s.emb is not None:
                    _add_tar_member(tar, f"{s.key}.emb.npy", _npy_bytes(s.emb.astype(np.float16)))
        rows = [r for s in content.samples for r in annotation_rows(s, stem)]
        pq.write_table(pa.Table.from_pylist(rows, schema=ANNOTATION_SCHEMA), tmp / f"{stem}.parquet")
        fails = [f.__dict__ for f in content.failures]
        pq.write_table(pa.Table.from_pylist(fails, schema=FAILURE_SCHEMA), tmp / f"{stem}.failures.parquet")
        stats = dict(
            content.stats,
            shard=stem,
            samples=len(content.samples),
            annotations=len(rows),
            failures=len(fails),
        )
        (tmp / f"{stem}.stats.json").write_text(json.dumps(stats, indent=2))
        for suffix in (".tar", ".parquet", ".failures.parquet", ".stats.json"):  # stats last
            storage.put_file(tmp / f"{stem}{suffix}", storage.join(out, f"{stem}{suffix}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats_path(out, content.shard_id)


def _read_parquet(path: str) -> pa.Table:
    with storage.open_file(path, "rb") as f:
        return pq.read_table(f)


def complete_shards(out_dir: str | os.PathLike) -> list[int]:
    """Ids of the shards whose commit marker (``stats.json``) exists, sorted."""
    ids = []
    for p in storage.glob(storage.join(out_dir, "*.stats.json")):
        stem = storage.name(p).split(".")[0]
        if stem.isdigit():
            ids.append(int(stem))
    return sorted(ids)


def remove_incomplete(out_dir: str | os.PathLike) -> list[str]:
    """Delete temporary directories, parts and shard files without a commit marker; return their names."""
    out = os.fspath(out_dir)
    done = {shard_name(i) for i in complete_shards(out)}
    removed = []
    for entry in storage.listdir(out):
        p = storage.join(out, entry)
        if entry == PARTS_DIR:  # parts of an interrupted run: its rows are redone
            removed += [f"{PARTS_DIR}/{d}" for d in storage.listdir(p)]
            storage.rm(p, recursive=True)
        elif entry.startswith(".tmp-") and storage.isdir(p):
            storage.rm(p, recursive=True)
            removed.append(entry)
        elif entry[:SHARD_DIGITS].isdigit() and entry.split(".")[0] not in done:
            storage.rm(p)
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------
# Reading: our shards and SA-1B tars through one reader
# ---------------------------------------------------------------------------------------------


def _split_member_name(name: str) -> tuple[str, str]:
    """``dir/sa_1.jpg -> ("sa_1", "jpg")``; ``0001.emb.npy -> ("0001", "emb.npy")`` (WebDataset rule)."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield ``{"__key__", "jpg", "json", "emb.npy"?...}`` per sample of a tar, members grouped by key.

    Works for our shards and for SA-1B tars (``sa_N.jpg`` + ``sa_N.json``). Members of one key
    must be adjacent, as WebDataset requires.

    Raises:
        tarfile.ReadError: the tar is truncated or not a tar.
    """
    current: dict[str, Any] = {}
    with storage.open_file(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_member_name(member.name)
            if current and key != current["__key__"]:
                yield current
                current = {}
            fh = tar.extractfile(member)
            data = fh.read() if fh is not None else b""
            current.setdefault("__key__", key)
            current[ext] = data
    if current:
        yield current


def decode_sample(raw: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    """Parse the JSON (and embeddings) of a raw tar sample; raise ValueError naming the problem."""
    if "json" not in raw:
        raise ValueError(f"sample {raw.get('__key__')}: no .json member")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sample {raw['__key__']}: JSON does not parse: {e}") from e
    emb = None
    if "emb.npy" in raw:
        emb = np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False)
    return meta, emb


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _validate_annotation(i: int, ann: dict[str, Any], height: int, width: int) -> list[str]:
    from pycocotools import mask as mask_utils

    from .overlay import coco_rle

    errs = [f"annotation {i}: missing '{k}'" for k in ANNOTATION_KEYS if k not in ann]
    if errs:
        return errs
    seg = ann["segmentation"]
    if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str):
        return [f"annotation {i}: segmentation must be COCO RLE with string counts"]
    if list(seg.get("size", [])) != [height, width]:
        return [f"annotation {i}: segmentation size {seg.get('size')} != image [{height}, {width}]"]
    try:
        area = int(mask_utils.area(coco_rle(seg)))
    except Exception as e:  # pycocotools raises plain exceptions on corrupt counts
        return [f"annotation {i}: RLE counts do not decode: {e}"]
    if area != int(ann["area"]):
        errs.append(f"annotation {i}: area {ann['area']} != RLE area {area}")
    if len(ann["bbox"]) != 4 or len(ann["crop_box"]) != 4:
        errs.append(f"annotation {i}: bbox and crop_box must be XYWH")
    if "label" in ann and ann["label"] is not None and not isinstance(ann["label"], str):
        errs.append(f"annotation {i}: label must be a string or null")
    return errs


def validate_sample(meta: dict[str, Any], emb: np.ndarray | None = None, labelled: bool = True) -> list[str]:
    """Every way a sample's JSON (and embeddings) breaks docs/FORMAT.md; empty when it is valid.

    Args:
        meta: the parsed ``KEY.json``.
        emb: the parsed ``KEY.emb.npy`` or None.
        labelled: require our keys (candidates, provenance); False accepts plain SA-1B JSON.
    """
    required = SAMPLE_JSON_KEYS if labelled else ("image", "annotations")
    errs = [f"missing top-level key '{k}'" for k in required if k not in meta]
    if errs:
        return errs
    img = meta["image"]
    needed = IMAGE_KEYS if labelled else ("image_id", "width", "height")
    errs += [f"image: missing '{k}'" for k in needed if k not in img]
    if errs:
        return errs
    phash = img.get("phash")  # optional: shards written before it existed have none
    if phash is not None and not (
        isinstance(phash, str) and len(phash) == 16 and all(c in "0123456789abcdef" for c in phash)
    ):
        errs.append(f"image.phash must be 16 lowercase hex digits, got {phash!r}")
    for i, ann in enumerate(meta["annotations"]):
        errs += _validate_annotation(i, ann, int(img["height"]), int(img["width"]))
    if emb is not None:
        if emb.ndim != 2 or emb.shape[0] != len(meta["annotations"]):
            errs.append(f"emb.npy shape {emb.shape} does not match {len(meta['annotations'])} annotations")
        elif emb.dtype != np.float16:
            errs.append(f"emb.npy dtype {emb.dtype}, expected float16")
    if labelled and not isinstance(meta["provenance"].get("smoke"), bool):
        errs.append("provenance.smoke must be true or false")
    return errs


def validate_shard(out_dir: str | os.PathLike, shard_id: int) -> list[str]:
    """Every problem with one complete shard: files, tar members, JSON, parquet agreement."""
    out, stem = os.fspath(out_dir), shard_name(shard_id)
    missing = [
        s
        for s in (".tar", ".parquet", ".failures.parquet", ".stats.json")
        if not storage.exists(storage.join(out, f"{stem}{s}"))
    ]
    if missing:
        return [f"shard {stem}: missing files {missing}"]
    errs: list[str] = []
    n_ann, keys = 0, []
    try:
        for raw in iter_tar_samples(storage.join(out, f"{stem}.tar")):
            keys.append(raw["__key__"])
            try:
                meta, emb = decode_sample(raw)
            except ValueError as e:
                errs.append(f"shard {stem}: {e}")
                continue
            if "jpg" not in raw:
                errs.append(f"shard {stem}: sample {raw['__key__']} has no .jpg")
            errs += [f"shard {stem}: sample {raw['__key__']}: {e}" for e in validate_sample(meta, emb)]
            n_ann += len(meta.get("annotations", []))
    except tarfile.TarError as e:
        return [f"shard {stem}: tar unreadable: {e}"]
    if len(keys) != len(set(keys)):
        errs.append(f"shard {stem}: duplicate keys in tar")
    table = _read_parquet(storage.join(out, f"{stem}.parquet"))
    if table.schema.names != ANNOTATION_SCHEMA.names:
        errs.append(f"shard {stem}: annotation parquet columns {table.schema.names}")
    if table.num_rows != n_ann:
        errs.append(f"shard {stem}: parquet has {table.num_rows} rows, tar has {n_ann} annotations")
    fails = _read_parquet(storage.join(out, f"{stem}.failures.parquet"))
    if fails.schema.names != FAILURE_SCHEMA.names:
        errs.append(f"shard {stem}: failures parquet columns {fails.schema.names}")
    dup = set(keys) & set(fails.column("key").to_pylist())
    if dup:
        errs.append(f"shard {stem}: keys both written and failed: {sorted(dup)[:5]}")
    return errs


def validate_run(run_dir: str | os.PathLike) -> list[str]:
    """Validate every complete shard of a run and the manifest's totals."""
    shard_dir = storage.join(run_dir, "shards")
    errs: list[str] = []
    for sid in complete_shards(shard_dir):
        errs += validate_shard(shard_dir, sid)
    manifest_path = storage.join(run_dir, MANIFEST)
    if not storage.exists(manifest_path):
        return errs + [f"{manifest_path}: missing"]
    manifest = storage.read_json(manifest_path)
    totals = manifest.get("totals", {})
    if totals and totals.get("input_rows") != totals.get("written", 0) + totals.get("failed", 0):
        errs.append(f"manifest totals do not add up: {totals}")
    return errs


def iter_run_samples(run_dir: str | os.PathLike) -> Iterable[tuple[str, dict[str, Any], np.ndarray | None]]:
    """Yield ``(key, meta, emb)`` for every sample of every complete shard of a run."""
    shard_dir = storage.join(run_dir, "shards")
    for sid in complete_shards(shard_dir):
        for raw in iter_tar_samples(storage.join(shard_dir, f"{shard_name(sid)}.tar")):
            meta, emb = decode_sample(raw)
            yield raw["__key__"], meta, emb
