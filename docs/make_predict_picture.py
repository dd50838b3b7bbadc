"""Rebuild docs/predict-shapes.png: the smoke model trained on synthetic shapes, predicting held-out ones.

Trains ``configs/train/smoke.yaml`` for 1000 CPU steps on 96 synthetic images (the learning test's
setup, ~2 minutes), then prompts it with each held-out shape's box through
``ssam.model.predict.predict_image`` and draws the overlays side by side.

    .venv/bin/python docs/make_predict_picture.py [--workdir runs/picture]
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
    args = ap.parse_args()
    work = Path(args.workdir)
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
    loaded = load_for_prediction(str(work / "run/model.pt"), list(SHAPES))
    rng = np.random.default_rng(2024)
    tiles = []
    for _ in range(4):
        image, shapes = make_image(rng, size=192)
        boxes = []
        for _, m in shapes:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        anns = predict_image(loaded, image, PredictOptions(min_label_score=0.0), boxes=boxes)
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
        "SMOKE MODEL trained 1000 CPU steps on synthetic shapes; held-out images, box prompts",
        fill="white",
        font=ImageFont.load_default(size=14),
    )
    strip.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
