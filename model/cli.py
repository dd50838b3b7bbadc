"""Command lines of the model package: ``ssam-train``, ``ssam-predict``, ``ssam-eval``.

Each ``main`` parses arguments and calls library code. Errors a user can fix (a bad config, a
checkpoint of the wrong kind, an empty vocabulary, too much bad data) print one clear message
and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SMOKE_BANNER = "*** SMOKE MODEL: tiny random weights; its masks and labels are meaningless ***"


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    from .train import __doc__ as doc

    p = argparse.ArgumentParser(prog="ssam-train", description="Train Semantic-SAM on pipeline shards (+ SA-1B).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)  # fmt: skip
    p.add_argument("config", help="training YAML (configs/train/*.yaml)")
    p.add_argument(
        "--shards",
        nargs="+",
        metavar="SPEC",
        help="our shards: tar files, RUN/shards folders or globs (overrides data.shards)",
    )
    p.add_argument("--sa1b", nargs="+", metavar="SPEC", help="SA-1B tars (overrides data.sa1b)")
    p.add_argument(
        "--output",
        default="runs/train",
        metavar="DIR",
        help="checkpoints/, model.pt, metrics.jsonl, tb/ go here",
    )
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/last.pt exactly")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.max_steps=200 (repeatable)")  # fmt: skip
    p.add_argument(
        "--num-workers", type=int, default=0, metavar="N", help="train data-parallel on N Ray Train workers"
    )
    p.add_argument("--use-gpu", action="store_true", help="with --num-workers: one GPU per worker")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import json

    from .data import DataError
    from .semantic_sam import CheckpointError
    from .train import Trainer, fit, train_with_ray
    from .train_config import TrainConfigError, load_train_config
    from .weights import WeightsUnavailable

    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.shards={json.dumps(args.shards)}")
    if args.sa1b:
        overrides.append(f"data.sa1b={json.dumps(args.sa1b)}")
    try:
        cfg = load_train_config(args.config, overrides)
        if cfg.model.size == "smoke":
            print(SMOKE_BANNER)
        out = Path(args.output)
        if args.num_workers > 0:
            final = train_with_ray(cfg, out, args.resume, args.num_workers, args.use_gpu)
        else:
            final = fit(Trainer(cfg, out), args.resume)
    except (
        TrainConfigError,
        DataError,
        CheckpointError,
        WeightsUnavailable,
        FileNotFoundError,
        ValueError,
    ) as e:
        return _fail(str(e))
    print(f"model written to {final}")
    return 0
