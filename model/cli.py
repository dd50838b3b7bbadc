"""Command lines of the model package: ``ssam-train``, ``ssam-predict``, ``ssam-eval``.

Each ``main`` parses arguments and calls library code. Errors a user can fix (a bad config, a
checkpoint of the wrong kind, an empty vocabulary, too much bad data) print one clear message
and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SMOKE_BANNER = "*** SMOKE MODEL: tiny random weights; its masks and labels are meaningless ***"


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    from .train import __doc__ as doc

    p = argparse.ArgumentParser(
        prog="ssam-train",
        description="Train Semantic-SAM on pipeline shards (+ SA-1B).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc,
    )
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.max_steps=200 (repeatable)",
    )
    p.add_argument(
        "--num-workers", type=int, default=0, metavar="N", help="train data-parallel on N Ray Train workers"
    )
    p.add_argument("--use-gpu", action="store_true", help="with --num-workers: GPUs for the workers")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=1.0,
        metavar="F",
        help="with --use-gpu: GPUs per worker; below 1 workers share a card (DDP over gloo)",
    )
    args = p.parse_args(argv)

    import json

    from ssam.weights import WeightsUnavailable

    from .data import DataError
    from .semantic_sam import CheckpointError
    from .train import Trainer, fit, show_training_log, train_with_ray
    from .train_config import TrainConfigError, load_train_config

    show_training_log()

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
            final = train_with_ray(
                cfg, out, args.resume, args.num_workers, args.use_gpu, args.gpus_per_worker
            )
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


def _predict_options(args):
    from .amg import AmgSettings
    from .predict import PredictOptions

    d = AmgSettings()
    given = {"pred_iou_thresh": args.pred_iou_thresh, "stability_score_thresh": args.stability_thresh}
    amg = AmgSettings(
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=d.pred_iou_thresh if args.pred_iou_thresh is None else args.pred_iou_thresh,
        stability_score_thresh=d.stability_score_thresh
        if args.stability_thresh is None
        else args.stability_thresh,
        box_nms_thresh=args.nms_thresh,
        max_masks=args.max_masks,
        min_mask_area=args.min_mask_area,
        compile_decoder=args.compile_decoder,
        compile_encoder=args.compile_encoder,
        cpu_bf16=args.cpu_bf16,
    )
    from_checkpoint = tuple(k for k, v in given.items() if v is None)  # a flag beats the checkpoint
    return PredictOptions(
        amg=amg, from_checkpoint=from_checkpoint, min_label_score=getattr(args, "min_label_score", 0.0)
    )


def _add_generator_flags(p: argparse.ArgumentParser) -> None:
    from .amg import AmgSettings

    d = AmgSettings()  # one set of defaults: the pipeline's masks stage uses the same
    recorded = "the value model.pt records (ssam-train's predict.* keys), else {}"
    thresholds = [
        ("--pred-iou-thresh", "keep masks with predicted IoU above this", d.pred_iou_thresh),
        ("--stability-thresh", "keep masks with stability at least this", d.stability_score_thresh),
    ]
    for flag, text, default in thresholds:
        p.add_argument(flag, type=float, default=None, help=f"{text} (default: {recorded.format(default)})")
    flags = [
        ("--points-per-side", int, d.points_per_side, "automatic mode: point grid per side"),
        ("--points-per-batch", int, d.points_per_batch, "point prompts per mask-decoder call"),
        ("--nms-thresh", float, d.box_nms_thresh, "box IoU for NMS between masks"),
        ("--max-masks", int, d.max_masks, "at most this many masks per image, highest predicted IoU first"),
        ("--min-mask-area", int, d.min_mask_area, "drop masks with fewer pixels"),
    ]
    for flag, kind, default, text in flags:
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument(
        "--compile-decoder",
        action="store_true",
        help="CUDA: torch.compile the mask decoder (the pipeline's default; here off: the first image "
        "compiles for ~15 s, worth it from a few dozen images on)",
    )
    p.add_argument(
        "--compile-encoder",
        action="store_true",
        help="CUDA: torch.compile the image encoder (the pipeline's default; here off: the first image "
        "compiles for ~1 minute with vit_h, then it encodes x1.9 faster on an H100)",
    )
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="on a CPU with AVX512-BF16 or AMX: the image encoder and mask decoder in bf16, as on CUDA "
        "(x1.8-1.9 faster with vit_b there; float32 on other CPUs)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _device(name: str) -> str:
    from ssam.device import resolve_device

    return str(resolve_device(name))


def predict_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ssam-predict",
        description="Segment images and name every mask from any vocabulary.",
        epilog="example: ssam-predict --checkpoint runs/train/model.pt --images photo.jpg --vocab coco --output preds",
    )
    p.add_argument("--checkpoint", required=True, help="a Semantic-SAM model.pt (from ssam-train)")
    p.add_argument("--images", required=True, nargs="+", help="image files, folders or globs")
    p.add_argument(
        "--vocab",
        required=True,
        help="comma list ('cat,dog'), a text file (one name per line), or lvis|coco|objects365|ade20k",
    )
    p.add_argument(
        "--output",
        default="predictions",
        help="folder for predictions.json (COCO) and overlays/ (default ./predictions)",
    )
    p.add_argument(
        "--boxes",
        default=None,
        help="box-prompt mode: 'x0,y0,x1,y1;...' or a JSON file of XYXY boxes (applied to every image)",
    )
    p.add_argument(
        "--min-label-score",
        type=float,
        default=0.2,
        help="label is none below this probability: the model's softmax over the vocabulary, trained "
        "with cross-entropy, so 0.5 means about half of such masks are named right (default 0.2)",
    )
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    _add_generator_flags(p)
    args = p.parse_args(argv)

    from ssam.weights import WeightsUnavailable

    from .predict import load_for_prediction, parse_boxes, predict_files, resolve_images
    from .semantic_sam import CheckpointError

    try:
        boxes = parse_boxes(args.boxes)
        loaded = load_for_prediction(args.checkpoint, args.vocab, _device(args.device))
    except (CheckpointError, WeightsUnavailable, ValueError, OSError) as e:
        return _fail(str(e))
    if loaded.smoke:
        print(SMOKE_BANNER)
    images = resolve_images(args.images)
    if not images:
        return _fail(f"--images {args.images}: no image files found")
    out, errors = predict_files(
        loaded, images, Path(args.output), _predict_options(args), boxes, not args.no_overlays
    )
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    n = len(images) - len(errors)
    print(f"{n} image(s) -> {out}" + ("" if args.no_overlays else f", overlays in {out.parent / 'overlays'}"))
    return 1 if errors else 0


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ssam-eval",
        description="Zero-shot COCO mask AP and class-agnostic mask AR.",
        epilog="example: ssam-eval --checkpoint runs/train/model.pt --coco val.json --images val2017/",
    )
    p.add_argument("--checkpoint", required=True, help="a Semantic-SAM model.pt")
    p.add_argument("--coco", required=True, help="COCO ground-truth JSON; its categories are the vocabulary")
    p.add_argument("--images", required=True, help="folder holding the GT images (by file_name)")
    p.add_argument("--output", default=None, help="write the metrics JSON here (default: print only)")
    _add_generator_flags(p)
    args = p.parse_args(argv)

    import json

    from ssam.weights import WeightsUnavailable

    from .predict import evaluate_coco
    from .semantic_sam import CheckpointError

    try:
        result = evaluate_coco(
            args.checkpoint, Path(args.coco), Path(args.images), _predict_options(args), _device(args.device)
        )
    except (CheckpointError, WeightsUnavailable, ValueError, OSError, KeyError) as e:
        return _fail(str(e))
    if result["smoke"]:
        print(SMOKE_BANNER)
    print(f"{'metric':<18}{'value':>8}")
    for k in ("mask_AP", "mask_AP50", "mask_AP75", "agnostic_AR@1", "agnostic_AR@10", "agnostic_AR@100"):
        print(f"{k:<18}{100 * result[k]:8.2f}")
    print(f"{'best-match IoU':<18}{100 * result['mean_best_match_iou']:8.2f}   mean over GT masks")
    print(
        f"{'label accuracy':<18}{100 * result['label_accuracy_matched']:8.2f}   "
        f"on {result['matched_masks']} of {result['gt_masks']} GT masks matched at IoU >= 0.5"
    )
    print(f"{'IoU calib. error':<18}{result['iou_calibration_mae']:8.3f}   mean |predicted IoU - true IoU|")
    for cut, r in result["label_score_reliability"].items():
        acc = f"{'-':>8}" if r["accuracy"] is None else f"{100 * r['accuracy']:8.2f}"
        name = "label acc. " + cut.removeprefix("score")
        print(f"{name:<18}{acc}   on {r['masks']} matched masks with label score {cut[5:]}")
    print(
        f"thresholds: predicted IoU > {result['pred_iou_thresh']}, stability >= {result['stability_score_thresh']}"
    )
    print(f"{result['images']} images, {result['detections']} detections")
    for e in result["unreadable_images"]:
        print(f"error: {e}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 1 if result["unreadable_images"] else 0
