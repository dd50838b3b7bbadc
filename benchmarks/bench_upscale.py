"""Mask upscaling: segment-anything's ``Sam.postprocess_masks`` against the engines'
``ssam.model.amg.upscale_logits``, side by side.

Both take the same random low-res logits (``--masks`` of them, SAM's 256 x 256 for a 1024 input,
or the smoke SAM's 64 x 64 for its 256 input) to each image size and take turns for ``--rounds``
rounds; each keeps its best. Reported per size: milliseconds per call of each, the ratio, which
path ``upscale_logits`` took, how far apart the logits and the thresholded masks are (0 where its
path is exact), and the separable product's time at every size (``upscale_logits`` takes it only
on a CPU, where it pays; this says whether it would on CUDA).

    .venv/bin/python benchmarks/bench_upscale.py [--device cpu|cuda] [--masks 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from timing import best_of_interleaved

from ssam.model.amg import _separable_pays, separable_upscale, upscale_logits

#: (SAM input side, image height, width): LAION-like sizes for a 1024 input (the pipeline stores
#: large images at 1024; smaller ones stay as they are), and the tests' smoke SAM on 128-px shapes
CASES = [
    (1024, 1024, 1024),
    (1024, 768, 1024),
    (1024, 1024, 683),
    (1024, 600, 800),
    (1024, 480, 640),
    (1024, 320, 480),
    (1024, 1536, 2048),
    (256, 128, 128),
    (256, 384, 512),
]


def reference(sam, low, input_hw, hw):
    return Sam.postprocess_masks(sam, low[:, None], input_hw, hw)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--masks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    rows = []
    for side, h, w in CASES:
        sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=side))
        input_hw = ResizeLongestSide.get_preprocess_shape(h, w, side)
        low = (torch.randn(args.masks, side // 4, side // 4, generator=g) * 4).to(dev)
        runs = {
            "reference": partial(reference, sam, low, input_hw, (h, w)),
            "ours": partial(upscale_logits, low, side, input_hw, (h, w)),
            # the product at every size, whichever path `ours` takes: where it would pay on CUDA
            "separable": partial(separable_upscale, low, side, input_hw, (h, w)),
        }
        out = {k: f() for k, f in runs.items()}  # warm-up (and the ours' axis matrices)
        best = best_of_interleaved(runs, args.rounds, sync)
        ref, ours = out["reference"], out["ours"]
        row = {
            "sam_input": side,
            "image_hw": [h, w],
            "path": "separable" if _separable_pays(low, side // 4, input_hw, (h, w)) else "exact",
            "reference_ms": round(best["reference"] * 1e3, 2),
            "ours_ms": round(best["ours"] * 1e3, 2),
            "speedup": round(best["reference"] / best["ours"], 2),
            "separable_ms": round(best["separable"] * 1e3, 2),
            "max_abs_diff": float((ref - ours).abs().max()),
            "mask_pixels_differing": int(((ref > 0) != (ours > 0)).sum()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": str(dev), "masks": args.masks, "threads": args.threads, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
