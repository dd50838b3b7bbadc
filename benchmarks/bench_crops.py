"""The labels stage's mask crops on a CPU: the reference's PIL crops, roi_align, and the shipped path.

Three ways to cut the same CLIP inputs from the same masks, side by side in one process:

- ``reference``: the reference engine's crops (``stages/labels.py``): per mask, the RLE decoded
  whole, ``crop_with_background`` with PIL, then open_clip's eval transform (PIL resize and
  centre crop, to tensor, normalise);
- ``roi_align``: the batched engine's GPU path run on the CPU (``image_mask_crops(...,
  resample="roi_align")``: full-size masks built from run lengths, torchvision's ``roi_align`` on
  the image and on the masks, combined);
- ``shipped``: the batched engine's CPU path (``cpu_crop_chunks``: each mask's window composited,
  resampled by rows and columns with ``embedding_bag``, several images at once).

Seeded ellipse masks (``bench_engine.ellipse_annotations``) on the bundled photos scaled to each
``--sizes`` entry ``IMAGE:CROP`` (image's longest side : CLIP's input side). The variants take
turns for ``--rounds`` rounds at each ``--threads`` count; each keeps its best, per image. Also
reported: how far the batched crops are from the reference's, in grey levels (0..255).

    .venv/bin/python benchmarks/bench_crops.py [--sizes 256:64 1024:224] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import torch
from bench_engine import ellipse_annotations, sample_images
from timing import best_of_interleaved

from ssam.device import keep_freed_memory
from ssam.model import label_engine as le
from ssam.overlay import decode_rle
from ssam.stages.labels import LabelsConfig, crop_with_background
from ssam.stages.masks import image_from_jpeg

DEFAULTS = LabelsConfig()  # the labels section's shipped defaults
PADDING, DIM, BLUR = DEFAULTS.crop_padding, DEFAULTS.background_dim, DEFAULTS.blur_radius


def reference_crops(images, annotations, preprocess, background):
    """Per image, its ``[M, 3, S, S]`` crops as the reference engine makes them."""
    for image, anns in zip(images, annotations, strict=True):
        yield torch.stack(
            [
                preprocess(
                    crop_with_background(
                        image, decode_rle(ann["segmentation"]), ann["bbox"], PADDING, background, DIM, BLUR
                    )
                )
                for ann in anns
            ]
        )


def roi_align_crops(images, annotations, spec, background):
    """Per image, its crops by the batched engine's GPU path, on the CPU."""
    for image, anns in zip(images, annotations, strict=True):
        yield le.image_mask_crops(
            image,
            anns,
            spec,
            torch.device("cpu"),
            padding=PADDING,
            background=background,
            dim=DIM,
            blur_radius=BLUR,
            resample="roi_align",
        )


def shipped_crops(images, annotations, spec, background):
    """Per chunk of images, their crops by the batched engine's CPU path (in its own order)."""
    for crops, _ in le.cpu_crop_chunks(images, annotations, spec, PADDING, background, DIM, BLUR):
        yield crops


def consume(variant, *args) -> None:
    """What is timed: every crop made, as the engine hands them on to CLIP (no copy of them all)."""
    for _ in variant(*args):
        pass


def all_in_order(variant, images, annotations, spec, background) -> torch.Tensor:
    """Every crop of a variant, in annotation order (for the comparison; not timed)."""
    if variant is shipped_crops:
        parts, orders = zip(
            *le.cpu_crop_chunks(images, annotations, spec, PADDING, background, DIM, BLUR), strict=True
        )
        return le.in_roi_order(torch.cat(parts), torch.from_numpy(np.concatenate(orders)))
    return torch.cat(list(variant(images, annotations, spec, background)))


def grey_levels(crops: torch.Tensor, spec: le.CropSpec) -> torch.Tensor:
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return crops * std + torch.tensor(spec.mean).view(1, 3, 1, 1) * 255


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["256:64", "1024:224"], help="IMAGE:CROP sides")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--masks", type=int, default=64, help="ellipse masks per image")
    ap.add_argument("--backgrounds", nargs="+", default=["dim", "blur", "none"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    keep_freed_memory()  # as the labels stage does on a CPU
    rows = []
    for entry in args.sizes:
        side, size = (int(v) for v in entry.split(":"))
        preprocess = open_clip.image_transform(size, is_train=False)
        spec = le.crop_spec(SimpleNamespace(preprocess=preprocess))  # what the engine reads off a ClipBundle
        jpegs = sample_images(args.images, side)
        images = [image_from_jpeg(j) for j in jpegs]
        annotations = [json.loads(ellipse_annotations(j, args.masks, i)) for i, j in enumerate(jpegs)]
        for background in args.backgrounds:
            ref = grey_levels(
                torch.cat(list(reference_crops(images, annotations, preprocess, background))), spec
            )
            far = {
                name: (grey_levels(all_in_order(fn, images, annotations, spec, background), spec) - ref).abs()
                for name, fn in (("roi_align", roi_align_crops), ("shipped", shipped_crops))
            }
            for threads in args.threads:
                torch.set_num_threads(threads)
                best = best_of_interleaved(
                    {
                        "reference": partial(
                            consume, reference_crops, images, annotations, preprocess, background
                        ),
                        "roi_align": partial(consume, roi_align_crops, images, annotations, spec, background),
                        "shipped": partial(consume, shipped_crops, images, annotations, spec, background),
                    },
                    args.rounds,
                )
                row = {
                    "image": side,
                    "crop": size,
                    "background": background,
                    "threads": threads,
                    **{f"{k}_ms_per_image": 1e3 * v / len(images) for k, v in best.items()},
                    "shipped_vs_reference": best["reference"] / best["shipped"],
                    "shipped_vs_roi_align": best["roi_align"] / best["shipped"],
                    **{f"{k}_grey_levels_mean": float(v.mean()) for k, v in far.items()},
                    **{f"{k}_grey_levels_max": float(v.max()) for k, v in far.items()},
                }
                rows.append(row)
                print(
                    f"{side} px, {size} px crops, {background}, {threads} thread(s): reference "
                    f"{row['reference_ms_per_image']:.1f}, roi_align {row['roi_align_ms_per_image']:.1f}, shipped "
                    f"{row['shipped_ms_per_image']:.1f} ms/image (x{row['shipped_vs_reference']:.2f} the reference, "
                    f"x{row['shipped_vs_roi_align']:.2f} roi_align); grey levels from the reference, mean/max: "
                    f"roi_align {row['roi_align_grey_levels_mean']:.2f}/{row['roi_align_grey_levels_max']:.0f}, "
                    f"shipped {row['shipped_grey_levels_mean']:.2f}/{row['shipped_grey_levels_max']:.0f}",
                    flush=True,
                )
    res = {"masks_per_image": args.masks, "images": args.images, "rounds": args.rounds, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
