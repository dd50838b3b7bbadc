"""Prediction and evaluation on image files: COCO-format results, overlays, COCO mask AP/AR.

``ssam-predict`` and ``ssam-eval`` call :func:`predict_files` and :func:`evaluate_coco`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from contextlib import redirect_stdout
from dataclasses import dataclass, field  # noqa: I001
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from ssam.overlay import render_overlay, rle_ious
from ssam.paths import expand_specs
from ssam.vocab import load_vocabulary, normalize_name

from .amg import AmgSettings
from .clip import encode_texts, load_clip
from .predictor import SemanticPredictor
from .semantic_sam import CheckpointError, load_model

log = logging.getLogger("ssam.predict")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


CHECKPOINT_THRESHOLDS = ("pred_iou_thresh", "stability_score_thresh")


@dataclass
class PredictOptions:
    amg: AmgSettings = field(default_factory=AmgSettings)  # automatic mode: the engine's settings
    # AmgSettings fields taken from the checkpoint's recorded predict defaults when it has them
    # (ssam-train writes the thresholds suited to the model it trained); () keeps amg's own values.
    from_checkpoint: tuple[str, ...] = CHECKPOINT_THRESHOLDS
    min_label_score: float = 0.2  # label is None below this probability (softmax over the vocabulary)
    max_pixels: int = 64_000_000  # refuse larger images


@dataclass
class Loaded:
    predictor: SemanticPredictor
    clip_info: dict
    smoke: bool
    vocab: list[str] = field(default_factory=list)
    vocab_emb: np.ndarray | None = None
    predict_defaults: dict = field(default_factory=dict)  # what the checkpoint records (may be empty)


def automatic_settings(loaded: Loaded, opts: PredictOptions) -> AmgSettings:
    """``opts.amg`` with the fields named in ``opts.from_checkpoint`` replaced by the checkpoint's
    recorded values, where it records them (older checkpoints do not: SAM's defaults then)."""
    recorded = {k: float(v) for k, v in loaded.predict_defaults.items() if k in opts.from_checkpoint}
    return dataclasses.replace(opts.amg, **recorded)


def load_for_prediction(checkpoint: str, vocab_spec: str | list[str], device: str = "cpu") -> Loaded:
    """The model, its CLIP text tower and the vocabulary's embeddings.

    Raises:
        CheckpointError: wrong kind or size of checkpoint. ValueError: empty vocabulary.
    """
    model, payload = load_model(checkpoint, device)
    clip_info = payload["clip"]
    clip = load_clip(
        clip_info["name"], clip_info.get("pretrained"), seed=clip_info.get("seed", 0), device=device
    )
    if clip.embed_dim != model.config.clip_dim:
        raise CheckpointError(
            f"{checkpoint}: label space is {model.config.clip_dim}-d but CLIP {clip_info['name']} "
            f"gives {clip.embed_dim}-d text embeddings"
        )
    vocab = load_vocabulary(vocab_spec)
    smoke = bool(clip_info.get("smoke")) or model.config.sam_size == "smoke"
    recorded = payload.get("predict_defaults") or {}
    return Loaded(
        SemanticPredictor(model, device), clip_info, smoke, vocab, encode_texts(clip, vocab), dict(recorded)
    )


def resolve_images(specs: list[str]) -> list[Path]:
    """Image files named by paths, folders or globs (a missing path is reported when read)."""
    return [f for files in expand_specs(specs, IMAGE_EXTENSIONS).values() for f in files]


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8, EXIF-upright. Raises ValueError naming the file when it cannot be used."""
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > max_pixels:
                raise ValueError(f"{path}: {img.size[0]}x{img.size[1]} pixels is over the limit {max_pixels}")
            img.load()
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def parse_boxes(spec: str | None) -> list[list[float]] | None:
    """``"x0,y0,x1,y1;x0,y0,x1,y1"`` or a JSON file with a list of XYXY boxes."""
    if not spec:
        return None
    if Path(spec).is_file():
        boxes = json.loads(Path(spec).read_text())
    else:
        boxes = [[float(v) for v in part.split(",")] for part in spec.split(";") if part.strip()]
    if not boxes or any(len(b) != 4 or b[2] <= b[0] or b[3] <= b[1] for b in boxes):
        raise ValueError(f"--boxes {spec!r}: expected x0,y0,x1,y1 boxes with x1 > x0 and y1 > y0")
    return boxes


def predict_image(loaded: Loaded, image: np.ndarray, opts: PredictOptions, boxes=None) -> list[dict]:
    """Annotations (masks RLE, bbox XYWH, label, scores) of one image, automatic or box-prompted."""
    pred = loaded.predictor
    pred.set_image(image)
    if boxes is not None:
        masks, iou, sem, score = pred.predict(boxes=np.asarray(boxes, np.float32))
    else:
        masks, iou, sem, score = pred.generate(automatic_settings(loaded, opts))
    labels, probs = pred.name(sem, loaded.vocab_emb, loaded.vocab, opts.min_label_score)
    anns = []
    for i in range(len(masks)):
        rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
        anns.append(
            {
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": int(mask_utils.area(rle)),
                "label": labels[i],
                "label_score": round(float(probs[i]), 4),
                "predicted_iou": round(float(iou[i]), 4),
                "predicted_cosine": round(float(score[i]), 4),
                "score": round(float(probs[i]) * float(iou[i]), 4),
            }
        )
    return anns


def predict_files(
    loaded: Loaded, images: list[Path], output: Path, opts: PredictOptions, boxes=None, overlays: bool = True
) -> tuple[Path, list[str]]:
    """Predict every image; write ``predictions.json`` (COCO) and ``overlays/*.png``.

    Returns the JSON path and one error message per image that could not be read.
    """
    output.mkdir(parents=True, exist_ok=True)
    cat_id = {name: i + 1 for i, name in enumerate(loaded.vocab)}
    coco = {
        "info": {"description": "ssam-predict", "smoke": loaded.smoke, "clip": loaded.clip_info},
        "images": [],
        "categories": [{"id": i, "name": n} for n, i in cat_id.items()],
        "annotations": [],
    }
    errors = []
    for path in images:
        try:
            image = read_image(path, opts.max_pixels)
        except ValueError as e:
            errors.append(str(e))
            continue
        image_id = len(coco["images"]) + 1
        h, w = image.shape[:2]
        coco["images"].append({"id": image_id, "file_name": str(path), "width": w, "height": h})
        anns = predict_image(loaded, image, opts, boxes)
        for a in anns:
            coco["annotations"].append(
                dict(
                    a,
                    id=len(coco["annotations"]) + 1,
                    image_id=image_id,
                    iscrowd=0,
                    category_id=cat_id.get(a["label"]),
                )
            )
        if overlays:
            (output / "overlays").mkdir(exist_ok=True)
            render_overlay(image, anns, smoke=loaded.smoke).save(output / "overlays" / f"{path.stem}.png")
    out = output / "predictions.json"
    out.write_text(json.dumps(coco))
    return out, errors


def _coco_eval(gt, dets: list[dict], use_cats: bool) -> np.ndarray:
    from pycocotools.cocoeval import COCOeval

    if not dets:
        return np.zeros(12)
    with redirect_stdout(io.StringIO()):  # pycocotools prints progress
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "segm")
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.maximum(ev.stats, 0)


def match_metrics(gt_rles: list[dict], gt_names: list[str], anns: list[dict], match_iou: float = 0.5) -> dict:
    """How one image's predictions match its ground truth.

    Args:
        gt_rles: the GT masks (COCO RLE); gt_names: their category names.
        anns: predictions (``segmentation`` RLE, ``label``, ``predicted_iou``).
        match_iou: a GT mask is matched when its best prediction overlaps it at least this much.

    Returns:
        ``best_iou``: per GT mask, the highest IoU of any prediction (0 without predictions);
        ``label_correct``: per matched GT mask, whether that best prediction's label is its name;
        ``label_prob``: per matched GT mask, that prediction's label score;
        ``iou_error``: per prediction, |predicted IoU - its IoU with the GT mask it overlaps most|.
    """
    out = {"best_iou": [0.0] * len(gt_rles), "label_correct": [], "label_prob": [], "iou_error": []}
    if not anns:
        return out
    if not gt_rles:
        out["iou_error"] = [abs(float(a["predicted_iou"])) for a in anns]
        return out
    iou = rle_ious([a["segmentation"] for a in anns], gt_rles)  # [predictions, GT]
    out["iou_error"] = [
        abs(float(a["predicted_iou"]) - float(t)) for a, t in zip(anns, iou.max(1), strict=True)
    ]
    best = iou.argmax(0)
    out["best_iou"] = [float(iou[b, g]) for g, b in enumerate(best)]
    for g, b in enumerate(best):
        if iou[b, g] >= match_iou:  # a matched GT mask: its best prediction's label and score
            out["label_correct"].append(normalize_name(anns[b]["label"] or "") == normalize_name(gt_names[g]))
            out["label_prob"].append(float(anns[b]["label_score"]))
    return out


def label_reliability(probs: list[float], correct: list[bool], cut: float = 0.5) -> dict:
    """Label accuracy of matched masks whose label score is at least ``cut`` and of those below it:
    for a calibrated score, the first is above ``cut`` and the second below."""
    p, c = np.asarray(probs, float), np.asarray(correct, bool)
    out = {}
    for name, sel in ((f"score>={cut}", p >= cut), (f"score<{cut}", p < cut)):
        out[name] = {"masks": int(sel.sum()), "accuracy": float(c[sel].mean()) if sel.any() else None}
    return out


def evaluate_coco(
    loaded_ckpt: str, gt_path: Path, images_dir: Path, opts: PredictOptions, device: str = "cpu"
) -> dict:
    """Zero-shot mask AP (GT categories as vocabulary), class-agnostic mask AR, and how the masks
    match the ground truth: mean best-match IoU per GT mask, label accuracy on GT masks matched at
    IoU >= 0.5, and the predicted IoU's calibration error (mean |predicted - true|)."""
    from pycocotools.coco import COCO

    with redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    cats = gt.loadCats(gt.getCatIds())
    loaded = load_for_prediction(loaded_ckpt, [c["name"] for c in cats], device)
    name_to_id = {normalize_name(c["name"]): c["id"] for c in cats}
    opts = dataclasses.replace(
        opts, min_label_score=0.0
    )  # every mask gets its best category; AP ranks by score
    used = automatic_settings(loaded, opts)  # the thresholds the results are reported with
    dets, missing = [], []
    matches: dict[str, list] = {"best_iou": [], "label_correct": [], "label_prob": [], "iou_error": []}
    cat_name = {c["id"]: c["name"] for c in cats}
    for img in gt.loadImgs(gt.getImgIds()):
        path = images_dir / img["file_name"]
        try:
            image = read_image(path, opts.max_pixels)
        except ValueError as e:
            missing.append(str(e))
            continue
        anns = predict_image(loaded, image, opts)
        gt_anns = gt.loadAnns(gt.getAnnIds(imgIds=img["id"], iscrowd=None))
        m = match_metrics(
            [gt.annToRLE(g) for g in gt_anns], [cat_name[g["category_id"]] for g in gt_anns], anns
        )
        for k, v in m.items():
            matches[k] += v
        for a in anns:
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": name_to_id[a["label"]],
                    "segmentation": a["segmentation"],
                    "score": a["score"],
                    "bbox": a["bbox"],
                    "area": a["area"],
                }
            )
    seg_ap = _coco_eval(gt, dets, use_cats=True)
    agnostic = _coco_eval(gt, dets, use_cats=False)
    return {
        "mask_AP": float(seg_ap[0]),
        "mask_AP50": float(seg_ap[1]),
        "mask_AP75": float(seg_ap[2]),
        "agnostic_AR@1": float(agnostic[6]),
        "agnostic_AR@10": float(agnostic[7]),
        "agnostic_AR@100": float(agnostic[8]),
        "mean_best_match_iou": float(np.mean(matches["best_iou"])) if matches["best_iou"] else 0.0,
        "label_accuracy_matched": float(np.mean(matches["label_correct"]))
        if matches["label_correct"]
        else 0.0,
        "matched_masks": len(matches["label_correct"]),
        "gt_masks": len(matches["best_iou"]),
        "iou_calibration_mae": float(np.mean(matches["iou_error"])) if matches["iou_error"] else 0.0,
        "label_score_reliability": label_reliability(matches["label_prob"], matches["label_correct"]),
        "pred_iou_thresh": used.pred_iou_thresh,
        "stability_score_thresh": used.stability_score_thresh,
        "images": len(gt.getImgIds()),
        "detections": len(dets),
        "unreadable_images": missing,
        "smoke": loaded.smoke,
        "checkpoint": str(loaded_ckpt),
    }
