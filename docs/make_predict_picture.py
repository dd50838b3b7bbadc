"""Rebuild docs/predict-shapes.png: the smoke model trained on synthetic shapes, predicting held-out ones.

Trains ``configs/train/smoke.yaml`` for 1000 CPU steps on 96 synthetic images (the learning test's
setup, ~3 minutes), then runs ``ssam.model.predict.predict_image`` in automatic mode with
ssam-predict's defaults on held-out images and draws the best-scoring masks side by side.

    .venv/bin/python docs/make_predict_picture.py [--workdir runs/picture] [--checkpoint model.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ssam.model.predict import PredictOptions, load_for_prediction, predict_image
from ssam.model.synthetic import SHAPES, make_image, write_shapes
from ssam.model.train import Trainer, fit
from ssam.model.train_config import load_train_config
from ssam.overlay import render_overlay

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "runs/picture"))
    ap.add_argument("--out", default=str(REPO / "docs/predict-shapes.png"))
    ap.add_argument("--checkpoint", help="draw with this model.pt (trained the same way) instead of training")
    args = ap.parse_args()
    work = Path(args.workdir)
    model_pt = Path(args.checkpoint) if args.checkpoint else work / "run/model.pt"
    if not args.checkpoint:
        write_shapes(work / "shards", images=96, per_shard=24, seed=0)
        cfg = load_train_config(
            REPO / "configs/train/smoke.yaml",
            [
                f'data.shards=["{work / "shards"}"]',
                "train.max_steps=1000",  # the shipped smoke recipe, as the learning test runs it
                "train.log_every=100",
                "train.checkpoint_every=1000",
            ],
        )
        fit(Trainer(cfg, work / "run"), resume=False)
    loaded = load_for_prediction(str(model_pt), list(SHAPES))
    rng = np.random.default_rng(2024)
    tiles = []
    for _ in range(4):
        image, _ = make_image(rng, size=192)
        # ssam-predict's automatic mode with its defaults; drawn: the masks scoring (label
        # probability x predicted IoU) at least 0.5, at most 5, best first
        anns = predict_image(loaded, image, PredictOptions())
        anns = sorted((a for a in anns if a["score"] >= 0.5), key=lambda a: -a["score"])[:5]
        tiles.append(render_overlay(image, anns, smoke=False))
    strip = Image.new("RGB", (sum(t.size[0] for t in tiles) + 8 * 3, tiles[0].size[1] + 30), (255, 255, 255))
    x = 0
    for t in tiles:
        strip.paste(t, (x, 30))
        x += t.size[0] + 8
    from PIL import ImageDraw, ImageFont

    d = ImageDraw.Draw(strip)
    d.rectangle((0, 0, strip.size[0], 26), fill=(200, 20, 20))
    d.text(
        (6, 5),
        "SMOKE MODEL, 1000 CPU steps on synthetic shapes; held-out images, automatic mode",
        fill="white",
        font=ImageFont.load_default(size=14),
    )
    strip.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
