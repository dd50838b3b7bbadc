"""Exports of a run's committed shards: COCO instances JSON, and a Hugging Face ``datasets`` folder.

``export_coco`` streams the samples once: image entries and annotations go to temporary files as
they are read, categories are numbered in order of first appearance, and the JSON is assembled at
the end, so memory holds only the category table. ``export_hf`` writes no copy of the data: it links
the committed tars into ``OUT/data/`` and writes a dataset card whose YAML gives ``load_dataset``
the file list and the full feature schema (see docs/REPORT.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ssam.format import PIPELINE_VERSION, complete_shards, iter_tar_samples, shard_name

COCO_FILE = "instances.json"
UNLABELLED = "unlabelled"  # category of masks without a label, with --include-unlabelled


@dataclass
class CocoSummary:
    """What ``export_coco`` wrote."""

    path: Path
    images: int = 0
    annotations: int = 0
    skipped_unlabelled: int = 0
    categories: dict = field(default_factory=dict)  # name -> {"id", "name", "vocab_id", "source"}


def _category(summary: CocoSummary, label: str, candidates: list[dict]) -> int:
    """The COCO id of ``label``, adding the category on first sight (ids 1, 2, ... in that order)."""
    if label not in summary.categories:
        cand = next((c for c in candidates if c["label"] == label), {})
        summary.categories[label] = {
            "id": len(summary.categories) + 1,
            "name": label,
            "supercategory": "",
            "vocab_id": cand.get("category_id"),  # id in candidates.vocabulary; null for an LLM phrase
            "source": cand.get("source", "background" if label == UNLABELLED else "unknown"),
        }
    return summary.categories[label]["id"]


def coco_annotation(ann: dict, ann_id: int, image_id: int, category_id: int, key: str) -> dict:
    """One of our annotations (docs/FORMAT.md) as a COCO instance annotation (RLE as in the shard)."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": ann["segmentation"],
        "area": int(ann["area"]),
        "bbox": [float(v) for v in ann["bbox"]],
        "iscrowd": 0,
        "score": ann.get("label_score", 0.0),
        "predicted_iou": ann["predicted_iou"],
        "stability_score": ann["stability_score"],
        "ssam_key": key,
        "ssam_ann_id": ann["id"],
    }


def export_coco(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    include_unlabelled: bool = False,
    images: bool = True,
) -> CocoSummary:
    """Write ``OUT/instances.json`` (COCO instances) and, with ``images``, ``OUT/images/KEY.jpg``.

    Args:
        run_dir: the run directory; only its committed shards are read.
        out_dir: output folder (created).
        include_unlabelled: keep masks whose label is null, as category ``"unlabelled"``.
        images: write each sample's stored JPEG to ``OUT/images/`` (``file_name`` is relative to it).

    Returns:
        Counts and the category table.
    """
    out, shard_dir = Path(out_dir), Path(run_dir) / "shards"
    out.mkdir(parents=True, exist_ok=True)
    if images:
        (out / "images").mkdir(exist_ok=True)
    summary = CocoSummary(path=out / COCO_FILE)
    smoke = False
    with tempfile.TemporaryDirectory(dir=out, prefix=".coco-") as tmp:
        image_part, ann_part = open(Path(tmp) / "images", "w"), open(Path(tmp) / "annotations", "w")
        with image_part, ann_part:
            for sid in complete_shards(shard_dir):
                for raw in iter_tar_samples(shard_dir / f"{shard_name(sid)}.tar"):
                    meta, key = json.loads(raw["json"]), raw["__key__"]
                    smoke = smoke or bool(meta["provenance"].get("smoke"))
                    summary.images += 1
                    img = meta["image"]
                    entry = {
                        "id": summary.images,
                        "file_name": img["file_name"],
                        "width": img["width"],
                        "height": img["height"],
                        "ssam_key": key,
                        "ssam_shard": shard_name(sid),
                        "url": img.get("url"),
                        "caption": img.get("caption"),
                    }
                    image_part.write(("," if summary.images > 1 else "") + json.dumps(entry))
                    if images:
                        (out / "images" / img["file_name"]).write_bytes(raw["jpg"])
                    for ann in meta["annotations"]:
                        label = ann.get("label") or (UNLABELLED if include_unlabelled else None)
                        if label is None:
                            summary.skipped_unlabelled += 1
                            continue
                        cat = _category(summary, label, meta["candidates"])
                        summary.annotations += 1
                        coco = coco_annotation(ann, summary.annotations, summary.images, cat, key)
                        ann_part.write(("," if summary.annotations > 1 else "") + json.dumps(coco))
        info = {
            "description": f"Semantic-SAM factory pseudo-labels from {Path(run_dir).resolve()}",
            "version": PIPELINE_VERSION,
            "smoke": smoke,
        }
        partial = Path(tmp) / COCO_FILE
        with open(partial, "w") as f:
            f.write('{"info": ' + json.dumps(info) + ', "licenses": [], "images": [')
            _append(f, Path(tmp) / "images")
            f.write('], "annotations": [')
            _append(f, Path(tmp) / "annotations")
            f.write('], "categories": ' + json.dumps(list(summary.categories.values())) + "}")
        os.replace(partial, summary.path)  # a reader never sees half a file
    return summary


def _append(dst, src: Path) -> None:
    with open(src) as f:
        shutil.copyfileobj(f, dst)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------

HF_CARD = """---
{yaml}---

# Semantic-SAM factory shards{smoke}

Committed shards of `{run}`, linked into `data/` (WebDataset tars: `KEY.jpg`, `KEY.json`,
`KEY.emb.npy`; the JSON is documented in docs/FORMAT.md of the factory). The YAML above gives
`datasets` the files and the feature schema, so columns that are null in the first shards
(e.g. `template` before an LLM candidate appears) still get their real type.

```python
from datasets import load_dataset

ds = load_dataset("{out}", split="train")
sample = ds[0]
sample["jpg"]                                 # PIL image
sample["json"]["annotations"][0]["label"]     # str or None
sample["emb.npy"]                             # [masks][D] float16 CLIP crop embeddings
```
"""


def hf_features():
    """The ``datasets.Features`` of our shards' tar members (``jpg``, ``json``, ``emb.npy``)."""
    from datasets import Features, Image, List, Value

    s, i, f = Value("string"), Value("int64"), Value("float64")
    candidate = {"label": s, "source": s, "category_id": i, "words": List(s), "template": i}
    annotation = {
        "id": i,
        "segmentation": {"size": List(i), "counts": s},
        "bbox": List(f),
        "area": i,
        "predicted_iou": f,
        "stability_score": f,
        "point_coords": List(List(f)),
        "crop_box": List(f),
        "label": s,
        "label_score": f,
        "topk": List({"label": s, "score": f}),
    }
    provenance = {
        "sam": {"name": s, "checkpoint": s, "checkpoint_sha256": s},
        "clip": {"name": s, "pretrained": s, "embed_dim": i},
        "llm": {"backend": s, "model": s},
        "smoke": Value("bool"),
        "pipeline_version": s,
    }
    image = {k: i for k in ("image_id", "width", "height")} | {
        k: s for k in ("key", "file_name", "url", "caption", "sha256")
    }
    meta = {
        "image": image,
        "candidates": List(candidate),
        "annotations": List(annotation),
        "provenance": provenance,
    }
    return Features(
        {
            "__key__": s,
            "__url__": s,
            "jpg": Image(),
            "json": meta,
            "emb.npy": List(List(Value("float16"))),
        }
    )


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, copy: bool = False) -> list[Path]:
    """Make ``out_dir`` loadable with ``datasets.load_dataset(out_dir)``: tars in ``data/`` + a card.

    Args:
        run_dir: the run directory; only its committed shards are exported.
        out_dir: output folder (created); its ``data/`` is replaced.
        copy: copy the tars instead of symlinking them (for a folder that must outlive the run).

    Returns:
        The tars in ``out_dir/data``.
    """
    from datasets import DatasetInfo

    out, shard_dir = Path(out_dir), Path(run_dir).resolve() / "shards"
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    tars, smoke = [], False
    for sid in complete_shards(shard_dir):
        stem = shard_name(sid)
        smoke = smoke or json.loads((shard_dir / f"{stem}.stats.json").read_text())["provenance"].get("smoke")
        src, dst = shard_dir / f"{stem}.tar", data / f"{stem}.tar"
        shutil.copyfile(src, dst) if copy else dst.symlink_to(src)
        tars.append(dst)
    import yaml

    card = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.tar"}]}],
        "dataset_info": DatasetInfo(features=hf_features())._to_yaml_dict(),
    }
    (out / "README.md").write_text(
        HF_CARD.format(
            yaml=yaml.safe_dump(card, sort_keys=False),
            smoke=" (SMOKE: random models, meaningless labels)" if smoke else "",
            run=Path(run_dir).resolve(),
            out=out.resolve(),
        )
    )
    return tars
