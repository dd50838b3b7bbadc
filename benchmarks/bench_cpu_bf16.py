"""bf16 on a CPU (``masks.cpu_bf16`` / ``labels.cpu_bf16``) against float32, side by side in one run.

Both sides are the batched engines, on the same images and models (random weights: timing only):

1. masks stage, float32 vs ``cpu_bf16`` (image encoder under bf16 autocast, mask decoder a bf16
   copy), s/image and the ratio, and how many masks each keeps (random weights' masks move a lot
   under bf16: their logits sit near 0, so agreement is reported, not expected);
2. labels stage on ``--label-masks`` seeded ellipses per image, float32 vs ``cpu_bf16`` (CLIP's
   image tower under bf16 autocast), s/image, the ratio, label agreement and embedding cosine.
3. with ``--train-steps N``: ``ssam-train``'s step (Semantic-SAM of the setup's SAM size, random
   weights, synthetic shapes, batch 2, 8 masks per image, the image encoder frozen as shipped),
   float32 vs ``train.cpu_bf16``, one trainer switching between the two, s/step and the ratio.

The two sides take turns ``--repeat`` times and the median pass is reported (this machine is
shared). Only meaningful on a CPU with AVX512-BF16 or AMX: elsewhere ``cpu_bf16`` falls back to
float32 and the script says so::

    .venv/bin/python benchmarks/bench_cpu_bf16.py --setups vit_b:ViT-B-32 smoke:ssam-smoke-clip
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (  # noqa: E402 -- the engine benchmark's images, rows and agreement
    REPO,
    _in_batches,
    ellipse_annotations,
    masks_of,
    matched_share,
    random_clip,
    rows_for,
    run_setups,
    sample_images,
)


def turns(stages: dict, rows: dict, batch: int, repeat: int) -> tuple[dict, dict]:
    """Each stage over ``rows`` ``repeat`` times, in turn; the last outputs and the median s/image."""
    outs, times = {}, {k: [] for k in stages}
    for _ in range(repeat):
        for name, stage in stages.items():
            t = time.perf_counter()
            outs[name] = _in_batches(stage, dict(rows), batch)
            times[name].append((time.perf_counter() - t) / len(rows["key"]))
    return outs, {k: float(np.median(v)) for k, v in times.items()}


def bench(args, sam_size: str, clip_name: str) -> dict:
    from ssam.device import cpu_has_bf16
    from ssam.model.sam import build_sam
    from ssam.pipeline.config import load_config
    from ssam.stages.labels import LabelStage
    from ssam.stages.masks import MaskStage

    side = 256 if sam_size == "smoke" else 1024
    jpegs = sample_images(args.images, side)
    cfg = load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [
            "output.dir=/tmp/unused",
            f"masks.points_per_side={args.points_per_side}",
            f"masks.points_per_batch={args.points_per_batch}",
            f"masks.max_masks_per_image={args.max_masks}",
            f"masks.encoder_batch_size={args.batch}",
            f"masks.torch_threads={args.threads}",
            f"labels.clip_batch_size={args.clip_batch}",
            "labels.score_threshold=0",
            "labels.margin_threshold=0",
        ],
    )
    sam, clip = build_sam(sam_size, seed=0).eval(), random_clip(clip_name, "cpu")
    res = {"sam": sam_size, "clip": clip_name, "images": len(jpegs), "cpu_has_bf16": cpu_has_bf16()}
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("setups", "out")}
    masks = {
        name: MaskStage(cfg.masks.model_copy(update={"cpu_bf16": on}), cfg.seed, sam=sam)
        for name, on in (("fp32", False), ("bf16", True))
    }
    res["masks_bf16_in_effect"] = masks["bf16"].engine.bf16
    res["torch_threads"] = torch.get_num_threads()  # after the stages applied masks.torch_threads
    warm = rows_for(jpegs[: args.batch])
    for st in masks.values():
        st(dict(warm))
    outs, t = turns(masks, rows_for(jpegs), args.batch, args.repeat)
    res["masks_fp32_s_per_image"], res["masks_bf16_s_per_image"] = t["fp32"], t["bf16"]
    res["masks_speedup"] = t["fp32"] / t["bf16"]
    m = {k: [masks_of(a) for a in o["annotations_json"]] for k, o in outs.items()}
    res["masks_per_image"] = {k: float(np.mean([len(x) for x in v])) for k, v in m.items()}
    pairs = list(zip(m["fp32"], m["bf16"], strict=True))
    res["fp32_matched_by_bf16"] = float(np.mean([matched_share(a, b) for a, b in pairs]))
    res["bf16_matched_by_fp32"] = float(np.mean([matched_share(b, a) for a, b in pairs]))
    print("so far:", json.dumps(res), flush=True)

    labels = {
        name: LabelStage(cfg.labels.model_copy(update={"cpu_bf16": on}), cfg.seed, clip=clip)
        for name, on in (("fp32", False), ("bf16", True))
    }
    rows = rows_for(jpegs)
    rows["annotations_json"] = [ellipse_annotations(j, args.label_masks, i) for i, j in enumerate(jpegs)]
    for st in labels.values():
        st({k: v[: args.batch] for k, v in rows.items()})
    louts, t = turns(labels, rows, args.batch, args.repeat)
    res["labels_fp32_s_per_image"], res["labels_bf16_s_per_image"] = t["fp32"], t["bf16"]
    res["labels_speedup"] = t["fp32"] / t["bf16"]
    lab = {k: [a["label"] for j in o["annotations_json"] for a in json.loads(j)] for k, o in louts.items()}
    res["label_agreement"] = float(np.mean([a == b for a, b in zip(lab["fp32"], lab["bf16"], strict=True)]))
    cos = []
    for ea, eb in zip(louts["fp32"]["emb"], louts["bf16"]["emb"], strict=True):
        a, b = np.load(io.BytesIO(ea)).astype(np.float32), np.load(io.BytesIO(eb)).astype(np.float32)
        cos += list((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8))
    res["embedding_cosine_mean"], res["embedding_cosine_min"] = float(np.mean(cos)), float(np.min(cos))
    if args.train_steps:
        res.update(bench_train(sam_size, args.train_steps))
    return res


def bench_train(size: str, steps: int) -> dict:
    """One trainer, its step timed with and without bf16 autocast in turn (``steps`` pairs)."""
    import tempfile

    from ssam.device import bf16_autocast, use_bf16
    from ssam.model.clip import SMOKE_CLIP
    from ssam.model.synthetic import write_shapes
    from ssam.model.train import Trainer
    from ssam.model.train_config import load_train_config

    with tempfile.TemporaryDirectory() as tmp:
        write_shapes(Path(tmp) / "shards", 16, 8, seed=0, emb_dim=32)
        overrides = [f"model.size={size}", "model.random_init=true", f"model.clip_model={SMOKE_CLIP}"]
        overrides += ["model.clip_pretrained=null", f'data.shards=["{Path(tmp) / "shards"}"]']
        overrides += ["train.batch_size=2", "data.masks_per_image=8", "train.device=cpu"]
        cfg = load_train_config(None, [*overrides, "train.max_steps=1000", "train.cpu_bf16=true"])
        trainer = Trainer(cfg, Path(tmp) / "run")
        on = use_bf16(trainer.device, True, True)
        mode = {"bf16": False}
        trainer._autocast = lambda: bf16_autocast(trainer.device, mode["bf16"] and on)
        times: dict = {"fp32": [], "bf16": []}
        for i in range(steps + 1):  # the first pair warms up
            for name in times:
                mode["bf16"] = name == "bf16"
                t = time.perf_counter()
                trainer.train_step()
                if i:
                    times[name].append(time.perf_counter() - t)
    res = {f"train_{k}_s_per_step": float(np.median(v)) for k, v in times.items()}
    res["train_speedup"] = res["train_fp32_s_per_step"] / res["train_bf16_s_per_step"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", default=["vit_b:ViT-B-32"], help="SAM:CLIP pairs")
    p.add_argument("--images", type=int, default=2, help="images per timed pass")
    p.add_argument("--batch", type=int, default=2, help="rows per stage batch")
    p.add_argument("--points-per-side", type=int, default=16)
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--max-masks", type=int, default=100)
    p.add_argument("--clip-batch", type=int, default=32)
    p.add_argument("--label-masks", type=int, default=32, help="seeded ellipse masks per image (labels)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per side, in turn (median)")
    p.add_argument("--train-steps", type=int, default=0, help="also time N training steps per side")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    run_setups(
        p.parse_args(),
        bench,
        lambda r: (
            None
            if r["cpu_has_bf16"]
            else "this CPU has neither AVX512-BF16 nor AMX: both sides ran in float32"
        ),
    )


if __name__ == "__main__":
    main()
