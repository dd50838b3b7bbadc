"""Where the mask engine's time goes: encoder, decoder, post-processing, host syncs.

Runs ``MaskEngine.generate`` under ``torch.profiler`` on the bundled photos with random
weights (timing only) and prints (a) the wall time of the engine's own phases, from the
``record_function`` ranges in model/amg.py (``amg.encode``, ``amg.decode``, ``amg.survivors``,
``amg.select``), and (b) the operators that take the most device (CUDA) or CPU time. Written for
the one GPU call a session gets (see benchmarks/gpu_run.sh); runs on a CPU too.

    python3 benchmarks/profile_masks.py --device cuda --sam vit_h --images 8 --out /tmp/prof.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def photos(n: int, side: int) -> list[np.ndarray]:
    files = sorted((REPO / "sample/images").glob("*.jpg"))
    out = []
    for i in range(n):
        im = Image.open(files[i % len(files)]).convert("RGB")
        im.thumbnail((side, side))
        out.append(np.asarray(im))
    return out


def main() -> None:
    from ssam.model.amg import AmgSettings, MaskEngine
    from ssam.model.sam import build_sam

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sam", default="smoke")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=512)
    p.add_argument("--encoder-batch", type=int, default=8)
    p.add_argument("--pred-iou", type=float, default=0.0, help="0: random weights keep masks")
    p.add_argument("--stability", type=float, default=0.0)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["plain"],
        help="engine variants, each timed and profiled on the same model: plain, compile (the decoder)",
    )
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    side = 256 if args.sam == "smoke" else 1024
    sam = build_sam(args.sam, seed=0).to(args.device).eval()
    images = photos(args.images, side)
    cuda = args.device.startswith("cuda")
    all_res = []
    for variant in args.variants:
        s = AmgSettings(
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou,
            stability_score_thresh=args.stability,
            encoder_batch_size=args.encoder_batch,
            bf16=not args.no_bf16,
            compile_decoder=variant == "compile",
        )
        res, table = profile_engine(MaskEngine(sam, s), images, cuda, args.top)
        res.update(variant=variant, sam=args.sam, settings=vars(args))
        print(json.dumps(res, indent=1))
        print(table)
        all_res.append(dict(res, table=table))
    if args.out:
        Path(args.out).write_text(json.dumps(all_res, indent=1))


def profile_engine(engine, images, cuda: bool, top: int) -> tuple[dict, str]:
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    engine.generate(images[:2])  # warm-up (kernels, allocator, compiling)
    sync()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    engine.generate(images)
    sync()
    wall = time.perf_counter() - t
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        results = engine.generate(images)
        sync()
    events = prof.key_averages()
    phases = {
        e.key: {
            "cpu_ms": e.cpu_time_total / 1e3,
            "device_ms": getattr(e, "device_time_total", 0) / 1e3,
            "calls": e.count,
        }
        for e in events
        if e.key.startswith("amg.")
    }
    sort = "device_time_total" if cuda else "cpu_time_total"
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "images": len(images),
        "warm_up_s": warm,
        "s_per_image": wall / len(images),
        "masks_per_image": float(np.mean([len(r.records) for r in results])),
        "phases": phases,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    return res, events.table(sort_by=sort, row_limit=top)


if __name__ == "__main__":
    main()
