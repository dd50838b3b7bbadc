"""``ssam-pipeline candidates``: print the candidates of captions without running the pipeline.

Examples::

    ssam-pipeline candidates "a woman with a pram"
    ssam-pipeline candidates "Apple iPhone 12 Pro" "corn dogs on a paper plate" --json
    ssam-pipeline candidates "a busy street" --llm Qwen/Qwen2.5-0.5B-Instruct --show-answers
    ssam-pipeline candidates "a telly on a table" --synonyms my_synonyms.txt --deny table
    ssam-pipeline candidates "a red car" --config configs/pipeline/sample.yaml --set candidates.allow=[car]

Exit status: 0 printed, 2 bad option, vocabulary or config, 3 LLM weights unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``candidates`` command to ``ssam-pipeline``'s subparsers."""
    p = subparsers.add_parser(
        "candidates",
        help="print the candidates of captions (no pipeline run)",
        description="Print the candidates the candidates stage makes for each caption.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("captions", nargs="+", metavar="CAPTION", help="caption text (one or more)")
    p.add_argument(
        "--config", help="take the candidates section of this pipeline YAML (default: the defaults)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config key, e.g. --set candidates.max_candidates=8 (repeatable; value parsed as YAML)",
    )
    p.add_argument("--vocabulary", help="lvis, coco, objects365, ade20k, a synonym-format file, or 'a,b,c'")
    p.add_argument("--synonyms", help="synonym map file (docs/CANDIDATES.md)")
    p.add_argument(
        "--deny", action="append", default=None, metavar="WORD", help="never a candidate (repeatable)"
    )
    p.add_argument(
        "--allow", action="append", default=None, metavar="LABEL", help="allow-only label (repeatable)"
    )
    p.add_argument(
        "--llm", metavar="MODEL", help="also ask this LLM (HF id, local dir, or 'smoke'); default: none"
    )
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers", help="LLM backend")
    p.add_argument("--show-answers", action="store_true", help="also print the LLM's raw answers")
    p.add_argument("--json", action="store_true", help="print JSON: one object per caption")
    return p


def candidates_config(args):
    """The ``CandidatesConfig`` the options describe: --config and --set, then the flags."""
    import yaml

    from ssam.stages.candidates import CandidatesConfig

    from .config import load_config

    if args.config:
        cfg = load_config(args.config, list(args.overrides)).candidates
    else:
        values = {}
        for item in args.overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("candidates."):
                raise ValueError(f"--set {item!r}: without --config only candidates.KEY=VALUE")
            values[key.removeprefix("candidates.")] = yaml.safe_load(value)
        cfg = CandidatesConfig.model_validate({"backend": "none", **values})
    flags = {"vocabulary": args.vocabulary, "synonyms": args.synonyms, "deny": args.deny, "allow": args.allow}
    updates = {k: v for k, v in flags.items() if v is not None}
    updates["backend"] = args.backend if args.llm else "none"
    if args.llm:
        updates["llm_model"] = args.llm
    return CandidatesConfig.model_validate({**cfg.model_dump(), **updates})


def describe(caption: str, candidates: list[dict], answers: list[str]) -> list[str]:
    """Text lines for one caption: label, source, category id, and the words it came from."""
    lines = [caption]
    width = max((len(c["label"]) for c in candidates), default=0)
    for c in candidates:
        source = c["source"] if c.get("template") is None else f"llm:t{c['template']}"
        cid = f"#{c['category_id']}" if c.get("category_id") is not None else "-"
        lines.append(f"  {c['label']:<{width}}  {source:<7}  {cid:>5}  {', '.join(c.get('words', []))}")
    if not candidates:
        lines.append("  (no candidates)")
    for t, answer in enumerate(answers):
        lines.append(f"  answer t{t}: {answer.strip()!r}")
    return lines


def main(args) -> int:
    from ssam.stages.candidates import CandidatesStage, rank_phrases
    from ssam.weights import WeightsUnavailable

    from .config import ConfigError

    try:
        cfg = candidates_config(args)
        stage = CandidatesStage(cfg)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WeightsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    answers = stage.llm_answers(list(args.captions))
    results = []
    for caption, caption_answers in zip(args.captions, answers, strict=True):
        cands = stage.candidates_for(caption, rank_phrases(caption_answers, cfg.max_words))
        results.append({"caption": caption, "candidates": cands, "answers": caption_answers})
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        for r in results:
            print(
                "\n".join(describe(r["caption"], r["candidates"], r["answers"] if args.show_answers else []))
            )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ssam.pipeline.candidates_cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(main(parser.parse_args(["candidates", *sys.argv[1:]])))
