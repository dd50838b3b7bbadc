"""Runs for the report and export tests: one real smoke run per session, and tiny hand-made shards.

``smoke_run(tmp_path_factory)`` runs the smoke pipeline once (about 30 s) on the bundled sample plus
four rows that fail (``missing_url``, ``bad_url``, ``duplicate_url`` in the filter,
``download_failed`` after it), and returns the same run directory to every caller.
``write_synthetic_run`` writes shards by ``ssam.format.write_shard`` with chosen candidates and labels,
for what the smoke models never produce (LLM candidates, labels won by them).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from ssam.format import Failure, Sample, ShardContent, write_shard

REPO = Path(__file__).resolve().parents[1]
FAILING_ROWS = {"": "missing_url", "gopher://example.com/a.jpg": "bad_url"}
_SMOKE_RUN: list[Path] = []


def smoke_input(path: Path) -> Path:
    """The bundled sample with absolute ``file:`` URLs, plus rows that fail; written to ``path``."""
    table = pq.read_table(REPO / "sample/pairs.parquet")
    urls = [f"file://{REPO / 'sample' / u.removeprefix('file:')}" for u in table.column("URL").to_pylist()]
    extra = [*FAILING_ROWS, urls[0], f"file://{REPO / 'sample/images/not-there.jpg'}"]
    n = len(extra)
    rows = table.to_pylist() + [dict(table.slice(0, 1).to_pylist()[0]) for _ in range(n)]
    for row, url in zip(rows, urls + extra, strict=True):
        row["URL"] = url
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return path


def smoke_run(tmp_path_factory) -> Path:
    """A finished smoke run (shared by every test of the session)."""
    if not _SMOKE_RUN:
        from ssam.pipeline.config import load_config
        from ssam.pipeline.run import run_pipeline

        base = tmp_path_factory.mktemp("smoke-run")
        cfg = load_config(
            REPO / "configs/pipeline/smoke.yaml",
            [
                f"output.dir={base / 'run'}",
                f"input.path={smoke_input(base / 'pairs.parquet')}",
                "ray.executor=local",
            ],
        )
        run_pipeline(cfg)
        _SMOKE_RUN.append(base / "run")
    return _SMOKE_RUN[0]


def _jpeg(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _annotation(i: int, label: str | None, height: int, width: int) -> dict:
    mask = np.zeros((height, width), np.uint8, order="F")
    mask[2 + i : 20, 4 : 30 + i] = 1
    rle = mask_utils.encode(mask)
    return {
        "id": i,
        "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
        "bbox": [4.0, 2.0 + i, 26.0 + i, 18.0 - i],
        "area": int(mask.sum()),
        "predicted_iou": 0.5 + 0.1 * i,
        "stability_score": 0.9,
        "point_coords": [[10.0, 10.0]],
        "crop_box": [0.0, 0.0, float(width), float(height)],
        "label": label,
        "label_score": 0.8 if label else 0.2,
        "topk": [],
    }


def synthetic_meta(key: str, candidates: list[dict], labels: list[str | None], smoke: bool = False) -> dict:
    """A valid sample JSON (docs/FORMAT.md) of a 48x64 image with one mask per entry of ``labels``."""
    h, w = 48, 64
    return {
        "image": {
            "image_id": int(key),
            "key": key,
            "file_name": f"{key}.jpg",
            "width": w,
            "height": h,
            "url": f"http://example.com/{key}.jpg",
            "caption": "a dog on a leash",
            "sha256": "0" * 64,
        },
        "candidates": candidates,
        "annotations": [_annotation(i, label, h, w) for i, label in enumerate(labels)],
        "provenance": {
            "sam": {"name": "vit_b", "checkpoint": None, "checkpoint_sha256": None},
            "clip": {"name": "ViT-B-32", "pretrained": None, "embed_dim": 4},
            "llm": {"backend": "none", "model": None},
            "smoke": smoke,
            "pipeline_version": "0.1.0",
        },
    }


DOG = {"label": "dog", "source": "caption", "category_id": 378, "words": ["dog"], "template": None}
LEASH = {"label": "leash", "source": "llm", "category_id": 616, "words": ["leash"], "template": 0}


def write_synthetic_run(run: Path) -> Path:
    """Two shards: shard 0 only caption candidates (``template`` all null), shard 1 an LLM candidate
    that wins a mask, an unlabelled mask, and ``near_duplicate`` / ``eval_overlap`` failure records."""
    shards = run / "shards"
    s0 = [Sample("000000", _jpeg(48, 64), synthetic_meta("000000", [DOG], ["dog", "dog"]), None)]
    s1 = [
        Sample("000010", _jpeg(48, 64), synthetic_meta("000010", [DOG, LEASH], ["leash", None, "dog"]), None)
    ]
    fails = [
        Failure("000011", "http://example.com/11.jpg", "dedup", "near_duplicate", "like 000010"),
        Failure("000012", "http://example.com/12.jpg", "dedup", "eval_overlap", "coco val 42"),
    ]
    write_shard(shards, ShardContent(0, samples=s0, stats={"provenance": s0[0].meta["provenance"]}))
    write_shard(
        shards, ShardContent(1, samples=s1, failures=fails, stats={"provenance": s1[0].meta["provenance"]})
    )
    return run
