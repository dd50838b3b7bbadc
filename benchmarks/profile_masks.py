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
    from ssam.device import CompiledOrEager
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
    p.add_argument(
        "--iou-keep-share",
        type=float,
        default=0.0,
        help="shift the random IoU head so this share of the first image's masks pass --pred-iou "
        "(bench_engine.py's shift_iou_head; 0: no shift)",
    )
    p.add_argument("--stability", type=float, default=0.0)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["shipped"],
        choices=[
            "shipped",
            "eager",
            "eager_encoder",
            "unshared",
            "ungated",
            "bf16_encoder",
            "bf16_encoder_compile",
        ],
        help="engine variants, each timed and profiled on the same model: shipped (encoder and "
        "decoder compiled on CUDA, the prompts of an image sharing the decoder's first image-side "
        "work), eager (nothing compiled), eager_encoder (only the decoder compiled), unshared "
        "(shipped, but a copy of the image tokens per prompt, as before model/two_way.py), ungated "
        "(shipped, but every prompt's masks upscaled in the decoder, as segment-anything does), "
        "bf16_encoder (only the decoder compiled, the encoder a bf16 copy run without autocast), "
        "bf16_encoder_compile (the same, compiled)",
    )
    p.add_argument(
        "--encoder-top",
        type=int,
        default=0,
        help="also profile the eager (autocast) encoder alone: its top N ops",
    )
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    side = 256 if args.sam == "smoke" else 1024
    sam = build_sam(args.sam, seed=0).to(args.device).eval()
    images = photos(args.images, side)
    cuda = args.device.startswith("cuda")
    if args.iou_keep_share:
        import io

        from bench_engine import shift_iou_head

        buf = io.BytesIO()
        Image.fromarray(images[0]).save(buf, "JPEG", quality=95)
        shift_iou_head(sam, buf.getvalue(), args.points_per_side, args.iou_keep_share, args.pred_iou)
    all_res = []
    for variant in args.variants:
        s = AmgSettings(
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou,
            stability_score_thresh=args.stability,
            encoder_batch_size=args.encoder_batch,
            bf16=not args.no_bf16,
            compile_decoder=variant != "eager",
            compile_encoder=variant in ("shipped", "unshared"),
        )
        engine = MaskEngine(sam, s)
        if variant == "unshared":
            engine.run_tokens = CompiledOrEager(decoder_tokens_unshared, cuda, "the unshared decoder")
        engine.gate_masks = variant != "ungated"
        upscaled, run_masks = [], engine.run_masks.fn

        def counted(dec, hs, src, hw, upscaled=upscaled, run=run_masks):  # prompts upscaled
            upscaled.append(len(hs))
            return run(dec, hs, src, hw)

        engine.run_masks.fn = counted
        extra = {}
        if variant.startswith("bf16_encoder"):
            ref = torch.cat(engine.encode(images))
            engine.encoder = CompiledOrEager(
                bf16_encoder(engine.model), cuda and variant.endswith("compile"), "the bf16 encoder"
            )
            got = torch.cat(engine.encode(images))
            cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1))
            extra["feature_cosine_vs_autocast_min"] = float(cos.min())
            extra["feature_rel_err"] = float((got - ref).norm() / ref.norm())
        res, table = profile_engine(engine, images, cuda, args.top)
        # profile_engine generates 3 times (warm-up, timed, profiled)
        extra["prompts_upscaled_share"] = sum(upscaled) / (3 * len(images) * args.points_per_side**2)
        res.update(extra)
        res.update(variant=variant, sam=args.sam, settings=vars(args))
        phases = {k: round(v["device_ms"] or v["cpu_ms"], 1) for k, v in res["phases"].items()}
        summary = {
            k: res[k] for k in ("variant", "s_per_image", "warm_up_s", "masks_per_image", "peak_gpu_gib")
        }
        print(json.dumps({**summary, "phase_ms": phases, **extra}), flush=True)
        print(table)
        all_res.append(dict(res, table=table))
    if args.encoder_top:
        from torch.profiler import ProfilerActivity, profile

        settings = AmgSettings(
            encoder_batch_size=args.encoder_batch, bf16=not args.no_bf16, compile_encoder=False
        )
        engine = MaskEngine(sam, settings)
        engine.encode(images)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            engine.encode(images)
            if cuda:
                torch.cuda.synchronize()
        sort = "device_time_total" if cuda else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=args.encoder_top)
        print(table)
        all_res.append({"encoder_alone": True, "table": table})
    if args.out:
        Path(args.out).write_text(json.dumps(all_res, indent=1))


def bf16_encoder(model):
    """A bf16 copy of the image encoder, run without autocast (residual stream and norms in bf16
    too, as the engine's decoder runs): a candidate, measured against the shipped autocast one."""
    import copy

    enc = copy.deepcopy(model.image_encoder).to(torch.bfloat16)

    def run(x):
        with torch.autocast(x.device.type, enabled=False):
            return enc(x.to(torch.bfloat16))

    return run


def decoder_tokens_unshared(dec, features, pe, sparse, dense):
    """The decoder's transformer as it ran before model/two_way.py: one copy of the image tokens
    per prompt."""
    from ssam.model.amg import decoder_tokens

    p = sparse.shape[0]
    return decoder_tokens(dec, features.expand(p, -1, -1, -1), pe, sparse, dense.expand(p, -1, -1, -1))


def profile_engine(engine, images, cuda: bool, top: int) -> tuple[dict, str]:
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    engine.generate(images)  # warm-up (kernels, allocator, compiling: the same batch size as timed)
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
