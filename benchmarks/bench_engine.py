"""The labelling engine, batched vs reference, side by side in one run on the same images.

For each setup (SAM size + CLIP model, random weights: timing only, never labels to trust):

1. masks stage: ``masks.engine=reference`` (segment-anything's generator, untouched) vs
   ``batched`` (model/amg.py), s/image, the ratio, and mask agreement: the share of reference
   masks matched at IoU >= 0.9 by the batched output, and vice versa;
2. labels stage: ``labels.engine=reference`` (per-mask PIL crops, CLIP image by image) vs
   ``batched`` (crops cut on the device, CLIP over several images' crops), on the same
   annotations (``--label-masks`` seeded ellipses per image); s/image, ratio, label agreement and
   embedding cosine;
   Both pairs are timed at each ``--threads`` count of torch CPU threads (both engines alike; on a
   CPU by default at one thread and at torch's default, the machine's cores), under
   ``pairs.<count>`` in the results;
3. the whole label path (batched masks + batched labels), images/s and peak GPU memory;
4. with ``--pipeline N``: the pipeline's stages (decode, candidates without LLM, masks, labels,
   shard writing) over the bundled sample replicated to N images, images/s.

Thresholds are set so that a realistic number of masks (up to ``--max-masks``) survive random
weights. Runs without Ray and img2dataset (the GPU machine has neither)::

    .venv/bin/python benchmarks/bench_engine.py --setups smoke vit_b:ViT-B-32            # CPU
    python3 benchmarks/bench_engine.py --device cuda --setups vit_b:ViT-B-32 vit_h:ViT-L-14 \
        --images 16 --pipeline 240                                                         # GPU
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[1]
LABELS = [
    "person",
    "dog",
    "cat",
    "car",
    "bicycle",
    "tree",
    "building",
    "sky",
    "cup",
    "table",
    "rocket",
    "flower",
]


def sample_images(n: int, side: int) -> list[bytes]:
    """JPEG bytes of the bundled photos, longest side ``side``, cycled to ``n``."""
    files = sorted((REPO / "sample/images").glob("*.jpg"))
    out = []
    for i in range(n):
        img = Image.open(files[i % len(files)]).convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def rows_for(jpegs: list[bytes]) -> dict[str, list]:
    n = len(jpegs)
    cands = json.dumps([{"label": lab, "source": "caption"} for lab in LABELS])
    return {
        "key": [f"{i:06d}" for i in range(n)],
        "status": ["ok"] * n,
        "fail_stage": [""] * n,
        "fail_detail": [""] * n,
        "jpeg": list(jpegs),
        "candidates_json": [cands] * n,
    }


def ellipse_annotations(jpeg: bytes, n: int, seed: int) -> str:
    """``n`` seeded elliptical masks of assorted sizes over an image, as SA-1B annotations (JSON).

    The labels stage is timed on these, so that its work does not depend on how many masks a
    random-weight SAM happens to keep.
    """
    w, h = Image.open(io.BytesIO(jpeg)).size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    anns = []
    for i in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.02, 0.3) * w, rng.uniform(0.02, 0.3) * h
        m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
        if not m.any():
            m[int(min(cy, h - 1)), int(min(cx, w - 1))] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        seg = {"size": [h, w], "counts": rle["counts"].decode()}
        anns.append(
            {
                "id": i,
                "segmentation": seg,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": int(m.sum()),
            }
        )
    return json.dumps(anns)


def random_clip(name: str, device: str):
    """The smoke CLIP, or open_clip's ``name`` with seeded random weights (timing only), as a ClipBundle."""
    from ssam.model.clip import ClipBundle, load_clip

    if name == "ssam-smoke-clip":
        return load_clip(name, None, seed=0, device=device)
    import open_clip

    with torch.random.fork_rng():  # seeded: the same random weights in every run
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    dim = int(model.text_projection.shape[1]) if model.text_projection is not None else 512
    tok = open_clip.get_tokenizer(name)
    return ClipBundle(model.eval(), preprocess, tok, dim, int(size), {"name": name, "smoke": True})


def run_setups(args, bench, note=None) -> None:
    """``bench(args, sam_size, clip_name)`` for each of ``args.setups`` (``SAM:CLIP``), each result
    printed (with ``note(result)`` before it, if that gives a line) and all written to ``args.out``."""
    results = []
    for setup in args.setups:
        sam_size, _, clip_name = setup.partition(":")
        r = bench(args, sam_size, clip_name or "ssam-smoke-clip")
        if note and note(r):
            print(note(r), flush=True)
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def masks_of(anns_json: str) -> list[dict]:
    """One row's annotations' segmentations (COCO RLE, string counts)."""
    return [a["segmentation"] for a in json.loads(anns_json)]


def matched_share(a: list[dict], b: list[dict], thresh: float = 0.9) -> float:
    """Share of masks in ``a`` that some mask in ``b`` matches at IoU >= thresh (1.0 when ``a`` is empty)."""
    if not a:
        return 1.0
    if not b:
        return 0.0
    from ssam.overlay import rle_ious

    return float((rle_ious(a, b).max(1) >= thresh).mean())


def shift_iou_head(sam, jpeg: bytes, points_per_side: int, share: float, thresh: float) -> float:
    """Shift a random-weight SAM's predicted IoUs so that ``share`` of one image's decoded masks
    pass ``thresh``; returns the shift.

    Random weights predict meaningless IoUs (vit_h's sit around 0); moving the IoU head's last
    bias makes the shipped threshold pass a realistic share of masks on to be upscaled, as with
    real weights, without any change to the engines.
    """
    from segment_anything.utils.amg import build_point_grid
    from segment_anything.utils.transforms import ResizeLongestSide

    from ssam.device import use_bf16
    from ssam.model.amg import decode_prompts, sam_image_features
    from ssam.stages.masks import image_from_jpeg

    image = image_from_jpeg(jpeg)
    # the stages' default precision: bf16 on CUDA, float32 on a CPU
    ((feats, _),) = sam_image_features(sam, [image], 1, use_bf16(sam.device, True, False))
    h, w = image.shape[:2]
    pts = build_point_grid(points_per_side) * np.array([[w, h]])
    coords = ResizeLongestSide(sam.image_encoder.img_size).apply_coords(pts, (h, w))
    coords_t = torch.as_tensor(coords, dtype=torch.float32, device=sam.device)[:, None]
    labels = torch.ones(len(pts), 1, dtype=torch.int, device=sam.device)
    with torch.inference_mode():
        iou = torch.cat(
            [
                decode_prompts(sam, feats, c, lab)[1][:, 1:].float().flatten()
                for c, lab in zip(coords_t.split(256), labels.split(256), strict=True)
            ]
        )
    shift = thresh - float(torch.quantile(iou.cpu(), 1.0 - share))
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias += shift
    return shift


def stage_pair(
    kind: str,
    cfg_section,
    seed: int,
    model,
    device: str,
    batched_update: dict | None = None,
    engines=("reference", "batched"),
):
    """Reference and batched stage objects over the same model (``batched_update``: the batched
    engine's own settings, e.g. more prompts per decoder call)."""
    from ssam.stages.labels import LabelStage
    from ssam.stages.masks import MaskStage

    out = {}
    for engine in engines:
        update = {
            "engine": engine,
            "device": device,
            **((batched_update or {}) if engine == "batched" else {}),
        }
        section = cfg_section.model_copy(update=update)
        if kind == "masks":
            # the batched engine switches its model to SDPA attention: give it its own copy
            own = copy.deepcopy(model) if engine == "batched" else model
            out[engine] = MaskStage(section, seed, sam=own)
        else:
            out[engine] = LabelStage(section, seed, clip=model)
    return out


def bench_pairs(args, cfg, sam, clip, jpegs, ppb, engines):
    """The masks pair and the labels pair at ``cfg``'s settings: their figures, and the stages and
    labels-pair rows the label path reuses."""
    res: dict = {"torch_threads": {"masks": cfg.masks.torch_threads, "labels": cfg.labels.torch_threads}}
    masks = stage_pair("masks", cfg.masks, cfg.seed, sam, args.device, ppb, engines)
    warm = rows_for(jpegs[: args.batch])
    for st in masks.values():
        st(warm)
    outs = {}
    for engine, st in masks.items():
        outs[engine], t = timed(lambda st=st: _in_batches(st, rows_for(jpegs), args.batch), args.device)
        res[f"masks_{engine}_s_per_image"] = t / len(jpegs)
    bat_m = [masks_of(a) for a in outs["batched"]["annotations_json"]]
    res["masks_per_image_batched"] = float(np.mean([len(m) for m in bat_m]))
    if "reference" in outs:
        res["masks_speedup"] = res["masks_reference_s_per_image"] / res["masks_batched_s_per_image"]
        ref_m = [masks_of(a) for a in outs["reference"]["annotations_json"]]
        res["masks_per_image_reference"] = float(np.mean([len(m) for m in ref_m]))
        res["ref_matched_by_batched"] = float(
            np.mean([matched_share(a, b) for a, b in zip(ref_m, bat_m, strict=True)])
        )
        res["batched_matched_by_ref"] = float(
            np.mean([matched_share(b, a) for a, b in zip(ref_m, bat_m, strict=True)])
        )

    if args.device.startswith("cuda") and cfg.masks.bf16:
        # bf16 (the shipped default on CUDA) against fp32, both through the batched engine
        from ssam.stages.masks import MaskStage

        fp32 = MaskStage(
            cfg.masks.model_copy(update={"engine": "batched", "device": args.device, "bf16": False, **ppb}),
            cfg.seed,
            sam=masks["batched"].sam,
        )
        out32 = _in_batches(fp32, rows_for(jpegs), args.batch)
        m32 = [masks_of(a) for a in out32["annotations_json"]]
        res["bf16_matched_by_fp32"] = float(
            np.mean([matched_share(b, a) for a, b in zip(m32, bat_m, strict=True)])
        )
        res["fp32_matched_by_bf16"] = float(
            np.mean([matched_share(a, b) for a, b in zip(m32, bat_m, strict=True)])
        )

    labels = stage_pair("labels", cfg.labels, cfg.seed, clip, args.device)
    rows = rows_for(jpegs)
    rows["annotations_json"] = [ellipse_annotations(j, args.label_masks, i) for i, j in enumerate(jpegs)]
    res["label_masks_per_image"] = args.label_masks
    for st in labels.values():
        st({k: v[: args.batch] for k, v in rows.items()})
    # The pair takes tens of ms per image on a CPU, where one pass is at the mercy of a shared
    # machine: the engines run in turn `--labels-repeat` times and the median pass is reported.
    louts, runs = {}, {engine: [] for engine in labels}
    for _ in range(args.labels_repeat):
        for engine, st in labels.items():
            louts[engine], t = timed(lambda st=st: _in_batches(st, dict(rows), args.batch), args.device)
            runs[engine].append(t / len(jpegs))
    for engine, times in runs.items():
        res[f"labels_{engine}_s_per_image"] = float(np.median(times))
        res[f"labels_{engine}_s_per_image_passes"] = times
    res["labels_speedup"] = res["labels_reference_s_per_image"] / res["labels_batched_s_per_image"]
    ref_l = [a["label"] for j in louts["reference"]["annotations_json"] for a in json.loads(j)]
    bat_l = [a["label"] for j in louts["batched"]["annotations_json"] for a in json.loads(j)]
    res["label_agreement"] = (
        float(np.mean([a == b for a, b in zip(ref_l, bat_l, strict=True)])) if ref_l else 1.0
    )
    cos = []
    for ea, eb in zip(louts["reference"]["emb"], louts["batched"]["emb"], strict=True):
        if not ea or not eb:
            continue
        a, b = np.load(io.BytesIO(ea)).astype(np.float32), np.load(io.BytesIO(eb)).astype(np.float32)
        cos += list((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8))
    res["embedding_cosine_mean"] = float(np.mean(cos)) if cos else 1.0
    return res, masks, labels, rows


def bench_setup(args, sam_size: str, clip_name: str) -> dict:
    from ssam.model.sam import build_sam
    from ssam.pipeline.config import load_config

    side = 256 if sam_size == "smoke" else 1024
    sam = build_sam(sam_size, seed=0).to(args.device).eval()
    jpegs = sample_images(args.images, side)
    pred_iou, shift = args.pred_iou, 0.0
    if args.iou_keep_share:
        pred_iou = args.pred_iou or 0.88  # segment-anything's default
        shift = shift_iou_head(sam, jpegs[0], args.points_per_side, args.iou_keep_share, pred_iou)
    cfg = load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [
            "output.dir=/tmp/unused",
            f"masks.pred_iou_thresh={pred_iou}",
            f"masks.stability_score_thresh={args.stability}",
            f"masks.max_masks_per_image={args.max_masks}",
            f"masks.points_per_side={args.points_per_side}",
            f"masks.points_per_batch={args.points_per_batch}",
            f"masks.box_nms_thresh={args.box_nms}",
            f"masks.encoder_batch_size={args.batch}",
            f"labels.clip_batch_size={args.clip_batch}",
            "labels.score_threshold=0",
            "labels.margin_threshold=0",
        ],
    )
    clip = random_clip(clip_name, args.device)
    res: dict = {"sam": sam_size, "clip": clip_name, "images": len(jpegs), "device": args.device}
    res["pred_iou_thresh"], res["iou_head_shift"] = pred_iou, shift
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("setups", "out")}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()

    ppb = {"points_per_batch": args.batched_points_per_batch or args.points_per_batch}
    engines = ("batched",) if args.skip_reference_masks else ("reference", "batched")
    threads = args.threads or (
        [0] if args.device.startswith("cuda") else sorted({1, torch.get_num_threads()})
    )
    res["pairs"] = {}
    for n in threads:
        # Both engines of both pairs at n CPU threads (0: as the config has it). torch's thread
        # count is process-wide and a stage sets its own around each batch, so the pairs are timed
        # at a stated count, not at whatever the stage before had left.
        set_n = {"torch_threads": n} if n else {}
        cfg_n = cfg.model_copy(
            update={
                "masks": cfg.masks.model_copy(update=set_n),
                "labels": cfg.labels.model_copy(update=set_n),
            }
        )
        pair, masks, labels, rows = bench_pairs(args, cfg_n, sam, clip, jpegs, ppb, engines)
        res["pairs"][str(n) if n else "config"] = pair
        print(f"pairs at {n or 'the config'} threads:", json.dumps(pair), flush=True)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    # The label path: the masks stage, then the labels stage on `label_masks` masks per image. A
    # random SAM keeps ~1 mask per image after NMS (its masks cover the image), where real weights
    # give the labels stage 50-100: the seeded ellipses stand in for them (made before timing).
    ellipses = list(rows["annotations_json"])

    def label_path(mask_stage=masks["batched"], label_stage=labels["batched"]):
        out = _in_batches(mask_stage, rows_for(jpegs), args.batch)
        out["annotations_json"] = list(ellipses)
        out = _in_batches(label_stage, out, args.batch)
        bad = [(s, d[:300]) for s, d in zip(out["status"], out["fail_detail"], strict=True) if s != "ok"]
        if bad:  # a failed row costs nothing downstream: its time would not be the label path's
            raise RuntimeError(f"{len(bad)} rows failed in the label path, e.g. {bad[0]}")
        return out

    _, t = timed(label_path, args.device)
    res["label_path_images_per_s"] = len(jpegs) / t
    if args.device.startswith("cuda"):
        res["label_path_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # printed now: a device call cut at its time limit during the steps below (as on 2026-11-28,
    # in the pipeline's 240 photos) loses only those steps
    print("so far:", json.dumps(res), flush=True)
    for variant in args.label_path_variants:  # the same path with less compiled than shipped
        from ssam.stages.labels import LabelStage
        from ssam.stages.masks import MaskStage

        enc, tower = (
            variant not in ("eager_encoder", "eager"),
            variant not in ("eager_clip", "eager"),
        )
        update = {"engine": "batched", "device": args.device, "compile_encoder": enc, **ppb}
        ms = MaskStage(cfg.masks.model_copy(update=update), cfg.seed, sam=masks["batched"].sam)
        update = {"engine": "batched", "device": args.device, "compile_clip": tower}
        ls = LabelStage(cfg.labels.model_copy(update=update), cfg.seed, clip=clip)
        t0 = time.perf_counter()
        label_path(ms, ls)  # warm-up: compiles at the timed batch sizes
        sync(args.device)
        res[f"label_path_{variant}_warm_up_s"] = time.perf_counter() - t0
        _, t = timed(lambda ms=ms, ls=ls: label_path(ms, ls), args.device)
        res[f"label_path_{variant}_images_per_s"] = len(jpegs) / t
        print(variant, res[f"label_path_{variant}_images_per_s"], flush=True)
    if args.profile:  # where the host's time goes (waits on the device show up in the syncing calls)
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(lambda: timed(label_path, args.device))
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
        Path(args.profile).write_text(buf.getvalue())
        print(buf.getvalue()[-6000:])
    if args.pipeline:
        res.update(bench_pipeline(args, cfg, masks["batched"], labels["batched"], side))
    return res


def _in_batches(stage, rows: dict[str, list], size: int) -> dict[str, list]:
    from ssam.pipeline.graph import _run_chain

    return _run_chain([(stage, size)], rows)


def fake_download_shard(folder: Path, shard_id: int, jpegs: list[bytes], start: int) -> Path:
    """An img2dataset-style shard (tar of KEY.jpg + parquet with status), as the pipeline reads them."""
    stem = folder / f"{shard_id:05d}"
    rows = []
    with tarfile.open(f"{stem}.tar", "w") as tar:
        for i, data in enumerate(jpegs):
            key = f"{shard_id:05d}{start + i:04d}"
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            rows.append(
                {
                    "key": key,
                    "status": "success",
                    "caption": "a photo",
                    "url": f"file:{key}.jpg",
                    "sha256": "",
                    "error_message": None,
                }
            )
    pq.write_table(pa.Table.from_pylist(rows), f"{stem}.parquet")
    return stem


def bench_pipeline(args, cfg, mask_stage, label_stage, side: int) -> dict:
    """decode -> candidates (no LLM) -> masks -> labels -> shard writing, over N replicated photos."""
    from ssam.pipeline.graph import _run_chain
    from ssam.stages.candidates import CandidatesStage
    from ssam.stages.decode import DecodeStage
    from ssam.stages.download import read_downloaded_shard
    from ssam.stages.write import ShardAssembler

    per_shard = 60
    jpegs = sample_images(args.pipeline, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stems = [
            fake_download_shard(tmp, s, jpegs[o : o + per_shard], 0)
            for s, o in enumerate(range(0, len(jpegs), per_shard))
        ]
        decode = DecodeStage(cfg.decode.model_copy(update={"image_size": side}))
        cands = CandidatesStage(
            cfg.candidates.model_copy(update={"backend": "none", "vocabulary": "coco"}), cfg.seed
        )
        chain = [(decode, 16), (cands, 64), (mask_stage, args.batch), (label_stage, args.batch)]
        expected = {
            int(s.name): len(jpegs[o : o + per_shard])
            for s, o in zip(stems, range(0, len(jpegs), per_shard), strict=True)
        }
        assembler = ShardAssembler(tmp / "shards", expected, {"smoke": True})
        sync(args.device)
        t = time.perf_counter()
        ok, ends = 0, []
        for stem in stems:
            rows = _run_chain(chain, read_downloaded_shard(stem))
            ok += sum(st == "ok" for st in rows["status"])
            assembler.add(rows)
            sync(args.device)
            ends.append(time.perf_counter() - t)
        wall = ends[-1]
    res = {
        "pipeline_images": len(jpegs),
        "pipeline_images_per_s": len(jpegs) / wall,
        "pipeline_ok_rows": ok,  # fewer than pipeline_images: failed rows, the figure is not the path's
        "pipeline_shards": len(assembler.written),
        "pipeline_first_shard_s": ends[0],
    }
    if len(ends) > 1:  # the stages meet new batch shapes in the first shard (on CUDA: compiling again)
        res["pipeline_images_per_s_after_first_shard"] = (len(jpegs) - expected[0]) / (wall - ends[0])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--setups", nargs="+", default=["smoke:ssam-smoke-clip"], help="SAM:CLIP pairs, e.g. vit_h:ViT-L-14"
    )
    p.add_argument("--images", type=int, default=4, help="images per timed pass")
    p.add_argument(
        "--batch", type=int, default=4, help="rows per stage batch (the encoder and CLIP batch across them)"
    )
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=64, help="prompts per decoder call (reference)")
    p.add_argument(
        "--batched-points-per-batch", type=int, default=0, help="the batched engine's (0: the same)"
    )
    p.add_argument("--box-nms", type=float, default=0.7, help="box NMS threshold (both engines)")
    p.add_argument(
        "--pred-iou", type=float, default=0.0, help="predicted-IoU threshold (0: random weights keep masks)"
    )
    p.add_argument(
        "--stability", type=float, default=0.0, help="stability threshold (segment-anything: 0.95)"
    )
    p.add_argument(
        "--iou-keep-share",
        type=float,
        default=0.0,
        help="shift the random SAM's predicted IoUs so this share of the first image's decoded masks "
        "passes --pred-iou (0.88 if 0); 0: no shift",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="run the whole label path once more under cProfile, write the top here",
    )
    p.add_argument("--max-masks", type=int, default=100)
    p.add_argument("--clip-batch", type=int, default=64)
    p.add_argument("--label-masks", type=int, default=64, help="masks per image for the labels-stage pair")
    p.add_argument(
        "--labels-repeat",
        type=int,
        default=3,
        help="timed passes per engine of the labels-stage pair, taken in turn (the median is reported)",
    )
    p.add_argument(
        "--pipeline", type=int, default=0, help="also run the pipeline's stages over N replicated photos"
    )
    p.add_argument(
        "--skip-reference-masks",
        action="store_true",
        help="time only the batched masks engine (the reference is slow with big models at threshold 0)",
    )
    p.add_argument(
        "--label-path-variants",
        nargs="*",
        default=[],
        choices=["eager_encoder", "eager_clip", "eager"],
        help="also time the label path with the SAM encoder, CLIP's image tower or both not compiled "
        "(shipped: both compiled on CUDA)",
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch CPU threads for both engines of the masks and labels pairs, each pair timed at each "
        "count (default: 1 and torch's default on a CPU, the configs' setting on CUDA; 0: the configs')",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    run_setups(p.parse_args(), bench_setup)


if __name__ == "__main__":
    main()
