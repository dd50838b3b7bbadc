"""SAM's input resize: segment-anything's PIL path against the engines' torch path, side by side.

Reference: ``ResizeLongestSide.apply_image`` (PIL bilinear with antialiasing) on the host, then the
upload (``torch.as_tensor(..., device=...)``), as the engines did before. Ours:
``ssam.model.amg.resize_longest_side`` (torch's uint8 kernel on a CPU; on CUDA the original
pixels go up from pinned memory and are resized there). The bundled photos are scaled to each
``--sizes`` longest side first (LAION's images are mostly smaller than SAM's 1024, so most are
enlarged). The two take turns for ``--rounds`` rounds; each keeps its best. Also reported: how
far apart their pixels are.

    .venv/bin/python benchmarks/bench_resize.py [--device cpu|cuda] [--sizes 384 640 2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from timing import best_of_interleaved

from ssam.model.amg import resize_longest_side

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 640, 2048])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (PIL uses one)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    photos = [Image.open(p).convert("RGB") for p in sorted((REPO / "sample/images").glob("*.jpg"))]
    transform = ResizeLongestSide(1024)

    def reference(images):
        return [
            torch.as_tensor(transform.apply_image(im), device=dev).permute(2, 0, 1)[None].float()
            for im in images
        ]

    def ours(images):
        return [resize_longest_side(im, 1024, dev) for im in images]

    rows = []
    for side in args.sizes:
        images = []
        for p in photos:
            s = side / max(p.size)
            images.append(np.asarray(p.resize((max(1, round(p.width * s)), max(1, round(p.height * s))))))
        runs = {"reference": partial(reference, images), "ours": partial(ours, images)}
        best = {k: t / len(images) for k, t in best_of_interleaved(runs, args.rounds, sync).items()}
        diff = torch.cat(
            [(a - b).abs().flatten().cpu() for a, b in zip(reference(images), ours(images), strict=True)]
        )
        row = {
            "longest_side": side,
            "reference_ms": 1e3 * best["reference"],
            "ours_ms": 1e3 * best["ours"],
            "ratio": best["reference"] / best["ours"],
            "max_diff": float(diff.max()),
            "mean_diff": float(diff.mean()),
        }
        rows.append(row)
        print(
            f"{side:5d} px -> 1024: reference {row['reference_ms']:.2f} ms/image, ours {row['ours_ms']:.2f} "
            f"ms/image, x{row['ratio']:.2f}; pixels apart: max {row['max_diff']:.0f}, mean {row['mean_diff']:.4f}"
        )
    if args.out:
        args.out.write_text(json.dumps({"device": str(dev), "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
