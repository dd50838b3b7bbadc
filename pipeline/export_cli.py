"""``ssam-pipeline export RUN --format coco|hf OUT``: a run's committed shards for other tools.

Examples::

    ssam-pipeline export runs/smoke --format coco runs/smoke-coco            # instances.json + images/
    ssam-pipeline export runs/smoke --format coco out/ --include-unlabelled --no-images
    ssam-pipeline export runs/smoke --format hf runs/smoke-hf                # load_dataset("runs/smoke-hf")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HF_SNIPPET = """from datasets import load_dataset

ds = load_dataset("{out}", split="train")   # jpg: PIL image, json: the sample JSON, emb.npy: crop embeddings"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` command to ``ssam-pipeline``'s subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a run as COCO instances JSON or a Hugging Face datasets folder",
        description="Export a run's committed shards. coco: OUT/instances.json (RLE masks, categories from the "
        "labels) and OUT/images/. hf: OUT/data/*.tar (links to the shards) and OUT/README.md, so that "
        "datasets.load_dataset(OUT) reads them with the right feature schema.",
    )
    p.add_argument("run_dir", help="the run directory (output.dir)")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--format", required=True, choices=("coco", "hf"), help="coco or hf")
    p.add_argument(
        "--include-unlabelled",
        action="store_true",
        help="coco: keep masks without a label, as category 'unlabelled' (default: drop them)",
    )
    p.add_argument("--no-images", action="store_true", help="coco: do not write the JPEGs into OUT/images")
    p.add_argument(
        "--copy", action="store_true", help="hf: copy the tars into OUT/data instead of symlinking"
    )
    return p


def main(args: argparse.Namespace) -> int:
    from .export import export_coco, export_hf

    run = Path(args.run_dir)
    if not (run / "shards").is_dir():
        print(f"error: {run}: no shards/ folder; is it a run directory?", file=sys.stderr)
        return 2
    if args.format == "coco":
        s = export_coco(run, args.out, include_unlabelled=args.include_unlabelled, images=not args.no_images)
        print(
            f"{s.path}: {s.images} images, {s.annotations} annotations, {len(s.categories)} categories"
            + (f"; {s.skipped_unlabelled} unlabelled masks left out" if s.skipped_unlabelled else "")
        )
        return 0 if s.images else 1
    try:
        tars = export_hf(run, args.out, copy=args.copy)
    except ImportError:
        print("error: the hf export needs Hugging Face datasets: pip install datasets", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(tars)} shard(s) in data/, README.md with the features. Load with:\n")
    print(HF_SNIPPET.format(out=Path(args.out).resolve()))
    return 0 if tars else 1
