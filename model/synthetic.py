"""A synthetic shapes set written as real shards: known masks, known labels.

Each image holds one to three filled shapes (``circle``, ``square``, ``triangle``) of random
colours on a noisy background; each shape's visible pixels are its mask and its name is its
label. It is how the learning test knows the right answer, and a quick way to check a training
setup end to end::

    python -m ssam.model.synthetic OUT_DIR --images 64 --per-shard 16 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from ssam.format import Sample, ShardContent, write_shard

SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(canvas)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=1)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=1)
    return np.asarray(canvas, bool)


def make_image(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """An HxWx3 image and its ``(label, visible mask)`` list."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = float(rng.uniform(size * 0.12, size * 0.25))
        cx, cy = rng.uniform(r, size - r, 2)
        m = _draw(shape, cx, cy, r, size)
        img[m] = rng.integers(120, 256, 3)
        shapes = [(lab, prev & ~m) for lab, prev in shapes]  # the new shape hides what it covers
        shapes.append((shape, m))
    return img, [(lab, m) for lab, m in shapes if m.sum() >= 30]


def annotation(i: int, label: str, mask_hw: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask_hw.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    ys, xs = np.nonzero(mask_hw)
    return {
        "id": i,
        "segmentation": {"size": list(mask_hw.shape), "counts": rle["counts"].decode()},
        "bbox": [x, y, w, h],
        "area": int(mask_hw.sum()),
        "predicted_iou": 1.0,
        "stability_score": 1.0,
        "point_coords": [[float(xs.mean()), float(ys.mean())]],
        "crop_box": [0.0, 0.0, float(mask_hw.shape[1]), float(mask_hw.shape[0])],
        "label": label,
        "label_score": 1.0,
        "topk": [{"label": label, "score": 1.0}],
    }


def make_sample(key: str, rng: np.random.Generator, size: int = 128, emb_dim: int = 0) -> Sample:
    img, shapes = make_image(rng, size)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")  # lossless: masks match pixels exactly
    meta = {
        "image": {
            "image_id": int(key),
            "key": key,
            "file_name": f"{key}.jpg",
            "width": size,
            "height": size,
            "url": "",
            "caption": "synthetic shapes",
            "sha256": "",
        },
        "candidates": [{"label": s, "source": "caption"} for s in SHAPES],
        "annotations": [annotation(i, lab, m) for i, (lab, m) in enumerate(shapes)],
        "provenance": {"synthetic": True, "smoke": False, "pipeline_version": "synthetic"},
    }
    emb = None
    if emb_dim:  # stand-in crop embeddings (random unit vectors): exercise the score loss, mean nothing
        e = rng.normal(size=(len(shapes), emb_dim))
        emb = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)
    return Sample(key, buf.getvalue(), meta, emb)


def write_shapes(
    out_dir: str | Path, images: int, per_shard: int, seed: int = 0, size: int = 128, emb_dim: int = 0
) -> list[Path]:
    """Write ``images`` samples as shards ``00000..`` in ``out_dir``; return the tar paths."""
    rng = np.random.default_rng(seed)
    tars = []
    for sid, start in enumerate(range(0, images, per_shard)):
        samples = [
            make_sample(f"{seed:03d}{i:06d}", rng, size, emb_dim)
            for i in range(start, min(images, start + per_shard))
        ]
        write_shard(out_dir, ShardContent(sid, samples, [], {"synthetic": True}))
        tars.append(Path(out_dir) / f"{sid:05d}.tar")
    return tars


def write_coco(out_dir: str | Path, images: int, seed: int = 1, size: int = 128) -> Path:
    """Held-out images as PNG files plus a COCO ground-truth JSON (for ``ssam-eval``)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]
    coco = {"images": [], "annotations": [], "categories": cats}
    for i in range(images):
        img, shapes = make_image(rng, size)
        name = f"shape_{i:04d}.png"
        Image.fromarray(img).save(out / "images" / name)
        coco["images"].append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for lab, m in shapes:
            ann = annotation(len(coco["annotations"]) + 1, lab, m)
            coco["annotations"].append(
                {
                    "id": ann["id"],
                    "image_id": i + 1,
                    "category_id": SHAPES.index(lab) + 1,
                    "segmentation": ann["segmentation"],
                    "area": ann["area"],
                    "bbox": ann["bbox"],
                    "iscrowd": 0,
                }
            )
    (out / "gt.json").write_text(json.dumps(coco))
    return out / "gt.json"


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic shapes set as shards (and a COCO test set).")
    ap.add_argument("out_dir")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--coco-images", type=int, default=0, help="also write this many held-out images + gt.json"
    )
    a = ap.parse_args()
    write_shapes(Path(a.out_dir) / "shards", a.images, a.per_shard, a.seed)
    if a.coco_images:
        write_coco(Path(a.out_dir) / "coco", a.coco_images, a.seed + 1)


if __name__ == "__main__":
    main()
