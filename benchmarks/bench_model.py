"""Semantic-SAM training throughput and predict latency, smoke and vit_b side by side, with peak memory.

Random weights (timing only). Each measurement runs in a fresh process so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_model.py [--sizes smoke vit_b] [--device cpu|cuda] [--bf16]
        [--train-steps 5] [--predict-images 2] [--points-per-side 16] [--out benchmarks/last_model.json]

Training: synthetic shapes shards (128 px, upscaled to the model's input), batch 2 (``--batch``), 8 masks per image,
image encoder frozen (the default) -- samples/s after one warm-up step. Predict: automatic mode on the
bundled photos (``points_per_side`` grid) and box mode (4 boxes), seconds per image after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, os
import numpy as np, torch
from pathlib import Path
mode, size, device, bf16, steps, n_img, pps, tmp, batch = sys.argv[1:10]
steps, n_img, pps, bf16, batch = int(steps), int(n_img), int(pps), bf16 == "1", int(batch)
from ssam.model.clip import SMOKE_CLIP
from ssam.model.semantic_sam import build_semantic_sam, save_model
if mode == "train":
    from ssam.model.synthetic import write_shapes
    from ssam.model.train import Trainer
    from ssam.model.train_config import load_train_config
    write_shapes(Path(tmp) / "shards", max(16, 2 * batch), 8, seed=0, emb_dim=32)
    cfg = load_train_config(None, [f"model.size={size}", "model.random_init=true", f"model.clip_model={SMOKE_CLIP}",
        "model.clip_pretrained=null", f"data.shards=[\"{Path(tmp) / 'shards'}\"]", f"train.batch_size={batch}",
        "data.masks_per_image=8", f"train.device={device}", f"train.bf16={bf16}", "train.max_steps=1000"])
    tr = Trainer(cfg, Path(tmp) / "run")
    tr.train_step()
    if device == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps): tr.train_step()
    if device == "cuda": torch.cuda.synchronize()
    dt = time.perf_counter() - t
    out = {"samples_per_s": steps * batch / dt, "s_per_step": dt / steps, "batch": batch}
else:
    from PIL import Image
    from ssam.model.amg import AmgSettings
    from ssam.model.predict import PredictOptions, load_for_prediction, predict_image
    model = build_semantic_sam(size, 32)
    save_model(Path(tmp) / "m.pt", model, {"name": SMOKE_CLIP, "pretrained": None, "seed": 0, "smoke": True})
    loaded = load_for_prediction(str(Path(tmp) / "m.pt"), "coco", device)
    photos = sorted((Path(os.environ["REPO"]) / "sample/images").glob("*.jpg"))[: n_img + 1]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
    amg = AmgSettings(  # ssam-predict's: neither encoder nor decoder compiled
        points_per_side=pps,
        pred_iou_thresh=0,
        stability_score_thresh=0,
        max_masks=100,
        compile_encoder=False,
        compile_decoder=False,
    )
    opts = PredictOptions(amg=amg)
    use_bf16 = bf16 and device == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        predict_image(loaded, images[0], opts)
        if device == "cuda": torch.cuda.synchronize()
        t = time.perf_counter()
        for im in images[1:]: predict_image(loaded, im, opts)
        if device == "cuda": torch.cuda.synchronize()
        auto = (time.perf_counter() - t) / (len(images) - 1)
        t = time.perf_counter()
        boxes = [[10, 10, 100, 100], [50, 50, 200, 200], [0, 0, 300, 200], [100, 20, 250, 180]]
        for im in images[1:]:
            predict_image(loaded, im, opts, boxes=boxes)
        if device == "cuda": torch.cuda.synchronize()
        box = (time.perf_counter() - t) / (len(images) - 1)
    out = {"auto_s_per_image": auto, "box_s_per_image": box}
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if device == "cuda": out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
print("RESULT " + json.dumps(out))
"""


def measure(mode: str, size: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            mode,
            size,
            args.device,
            "1" if args.bf16 else "0",
            str(args.train_steps),
            str(args.predict_images),
            str(args.points_per_side),
            tmp,
            str(args.batch),
        ]
        env = {
            "REPO": str(REPO),
            "SSAM_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),  # the GPU machine's carried packages
            "SSAM_CACHE": str(Path(tmp) / "cache"),
            "HOME": tmp,
        }
        # not cwd=REPO: its ssam/ folder would shadow the package put together on PYTHONPATH (GPU machine)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{mode}/{size} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["smoke", "vit_b"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2, help="training images per step")
    ap.add_argument("--predict-images", type=int, default=2)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "benchmarks/last_model.json"))
    args = ap.parse_args()
    results = {
        size: {"train": measure("train", size, args), "predict": measure("predict", size, args)}
        for size in args.sizes
    }
    Path(args.out).write_text(
        json.dumps({"device": args.device, "bf16": args.bf16, "results": results}, indent=2)
    )
    base = results[args.sizes[0]]
    print(f"device {args.device}{' bf16' if args.bf16 else ''}; points_per_side {args.points_per_side}")
    print(
        f"{'size':<8}{'train samples/s':>16}{'auto s/img':>12}{'box s/img':>11}"
        f"{'train RSS MB':>14}{'predict RSS MB':>16}"
    )
    for size, r in results.items():
        t, p = r["train"], r["predict"]
        print(
            f"{size:<8}{t['samples_per_s']:16.3f}{p['auto_s_per_image']:12.3f}{p['box_s_per_image']:11.3f}"
            f"{t['peak_rss_mb']:14.0f}{p['peak_rss_mb']:16.0f}"
        )
    for size, r in list(results.items())[1:]:
        print(
            f"{size} vs {args.sizes[0]}: "
            f"train x{base['train']['samples_per_s'] / r['train']['samples_per_s']:.1f} slower, "
            f"automatic predict x{r['predict']['auto_s_per_image'] / base['predict']['auto_s_per_image']:.1f} slower"
        )


if __name__ == "__main__":
    main()
