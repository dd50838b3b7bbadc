"""``ssam-pipeline``: run the pseudo-label pipeline, validate its output, print the config reference.

Examples::

    ssam-pipeline run configs/pipeline/smoke.yaml
    ssam-pipeline run configs/pipeline/laion-gpu.yaml --input 's3://bucket/laion/*.parquet' --output /data/run1
    ssam-pipeline run configs/pipeline/smoke.yaml --set masks.points_per_side=8 --set ray.executor=local
    ssam-pipeline validate runs/smoke
    ssam-pipeline candidates "a woman with a pram and a BlackBerry phone" --vocabulary lvis
    ssam-pipeline report runs/smoke && ssam-pipeline export runs/smoke --format coco /tmp/coco
    ray job submit --working-dir . -- ssam-pipeline run configs/pipeline/laion-gpu.yaml

Exit status: 0 the run finished (rows may have failed; see the summary), 2 bad config or input,
3 model weights unavailable, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssam-pipeline",
        description="Semantic-SAM factory: LAION pairs -> labelled mask shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run", help="run or resume the pipeline", description="Run (or resume) the pipeline on a config."
    )
    r.add_argument("config", help="pipeline YAML (configs/pipeline/*.yaml)")
    r.add_argument(
        "--input", nargs="+", metavar="PATH", help="override input.path: parquet files, directories or globs"
    )
    r.add_argument("--output", metavar="DIR", help="override output.dir: the run directory")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one config key, e.g. --set masks.points_per_side=16 (repeatable; value parsed as YAML)",
    )
    v = sub.add_parser(
        "validate",
        help="check a run's shards against the format",
        description="Validate every complete shard of a run.",
    )
    v.add_argument("run_dir", help="the run directory (output.dir)")
    s = sub.add_parser(
        "show", help="draw mask overlays of a run's samples", description="Write overlay PNGs of samples."
    )
    s.add_argument("run_dir", help="the run directory (output.dir)")
    s.add_argument("--key", action="append", default=[], help="sample key to draw (repeatable; default: all)")
    s.add_argument(
        "--out",
        default=None,
        help="folder for the PNGs (default: RUN_DIR/overlays; ./overlays for s3:// runs)",
    )
    sub.add_parser("config-reference", help="print every config key as a Markdown table")
    from .candidates_cli import add_parser as add_candidates_parser

    add_candidates_parser(sub)
    from .export_cli import add_parser as add_export_parser
    from .report_cli import add_parser as add_report_parser

    add_report_parser(sub)
    add_export_parser(sub)
    return p


def cmd_run(args) -> int:
    from .config import ConfigError, load_config
    from .inputs import InputError
    from .preflight import ModelsUnavailable
    from .run import run_pipeline

    overrides = list(args.overrides)
    if args.input:
        overrides.append(f"input.path={json.dumps(args.input)}")  # JSON is YAML: paths stay verbatim
    if args.output:
        overrides.append(f"output.dir={json.dumps(args.output)}")
    try:
        cfg = load_config(args.config, overrides)
        summary = run_pipeline(cfg, log=lambda m: print(m, flush=True))
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print("\n".join(summary.lines()))
    if cfg.smoke:
        print("*** SMOKE RUN: output made by tiny random models; it is marked smoke and means nothing ***")
    return 0


def cmd_validate(args) -> int:
    from ssam.format import validate_run

    errs = validate_run(args.run_dir)
    for e in errs:
        print(e)
    print(f"{args.run_dir}: {'valid' if not errs else f'{len(errs)} problem(s)'}")
    return 0 if not errs else 1


def cmd_show(args) -> int:
    import io
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ssam import storage
    from ssam.format import complete_shards, decode_sample, iter_tar_samples
    from ssam.overlay import render_overlay

    # overlays go beside a local run; for a run in object storage, to ./overlays unless --out says
    default = "overlays" if storage.is_remote(args.run_dir) else Path(args.run_dir) / "overlays"
    out = Path(args.out or default)
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = storage.join(args.run_dir, "shards")
    n = 0
    for sid in complete_shards(shard_dir):
        for raw in iter_tar_samples(storage.join(shard_dir, f"{sid:05d}.tar")):
            if args.key and raw["__key__"] not in args.key:
                continue
            meta, _ = decode_sample(raw)
            image = np.asarray(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"))
            smoke = bool(meta["provenance"].get("smoke"))
            render_overlay(
                image, meta["annotations"], smoke=smoke, caption=meta["image"].get("caption")
            ).save(out / f"{raw['__key__']}.png")
            n += 1
    print(f"wrote {n} overlay(s) to {out}")
    return 0 if n else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("SSAM_OFFLINE", "") not in ("", "0"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
    if args.command == "run":
        return cmd_run(args)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "show":
        return cmd_show(args)
    if args.command == "report":
        from .report_cli import main as report_main

        return report_main(args)
    if args.command == "export":
        from .export_cli import main as export_main

        return export_main(args)
    if args.command == "candidates":
        from .candidates_cli import main as candidates_main

        return candidates_main(args)
    from .config import config_reference

    print("| key | type | default | description |\n|---|---|---|---|")
    print("\n".join(config_reference()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
