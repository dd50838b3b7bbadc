"""Labels: CLIP names each SAM mask with one of its image's candidates, or with nothing.

For each mask, the crop around its box (padded) is taken with the background outside the mask
dimmed or blurred, embedded by CLIP, and compared with prompt-ensembled text embeddings of the
image's candidates plus a few background labels. The softmax over those is the score; the label
is ``null`` when the winner is a background label, scores under ``score_threshold``, or beats
the runner-up by less than ``margin_threshold``. Text embeddings are cached per label.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils

from ssam.device import resolve_device

from .common import map_rows, record_time, to_lists
from .masks import image_from_jpeg


def crop_with_background(
    image: np.ndarray,
    mask_hw: np.ndarray,
    bbox_xywh: list[float],
    padding: float,
    mode: str,
    dim: float,
    blur_radius: float,
) -> Image.Image:
    """The padded box crop of ``image`` with pixels outside the mask dimmed, blurred, or kept."""
    h, w = mask_hw.shape
    x, y, bw, bh = bbox_xywh
    px, py = bw * padding, bh * padding
    x0, y0 = int(max(0, np.floor(x - px))), int(max(0, np.floor(y - py)))
    x1, y1 = int(min(w, np.ceil(x + bw + px))), int(min(h, np.ceil(y + bh + py)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    crop = image[y0:y1, x0:x1].astype(np.float32)
    keep = mask_hw[y0:y1, x0:x1, None].astype(np.float32)
    if mode == "dim":
        crop = crop * keep + crop * (1.0 - keep) * dim
    elif mode == "blur":
        blurred = Image.fromarray(crop.astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur_radius))
        crop = crop * keep + np.asarray(blurred, np.float32) * (1.0 - keep)
    return Image.fromarray(np.clip(crop + 0.5, 0, 255).astype(np.uint8))


def choose_labels(
    scores: np.ndarray,
    names: list[str],
    n_candidates: int,
    top_k: int,
    score_threshold: float,
    margin_threshold: float,
) -> list[tuple[str | None, float, list[dict]]]:
    """Per mask: (label or None, score, top-k candidates) from softmax scores ``[M, n_cand + n_bg]``.

    Columns ``[:n_candidates]`` are candidates, the rest background labels.
    """
    out = []
    for row in scores:
        order = np.argsort(-row)
        best, second = order[0], (order[1] if len(order) > 1 else None)
        cand_order = [j for j in order if j < n_candidates][:top_k]
        topk = [{"label": names[j], "score": round(float(row[j]), 4)} for j in cand_order]
        margin = float(row[best] - row[second]) if second is not None else float(row[best])
        ok = best < n_candidates and row[best] >= score_threshold and margin >= margin_threshold
        score = float(row[best]) if ok else (float(row[cand_order[0]]) if cand_order else 0.0)
        out.append((names[best] if ok else None, round(score, 4), topk))
    return out


class LabelStage:
    """``annotations_json`` + ``candidates_json`` -> labelled annotations and ``emb`` (float16 .npy bytes)."""

    name = "labels"

    def __init__(self, cfg):
        from ssam.model.clip import load_clip

        self.l = cfg.labels
        device = str(resolve_device(self.l.device))
        self.clip = load_clip(self.l.clip_model, self.l.clip_pretrained, seed=cfg.seed, device=device)
        self.provenance = self.clip.provenance
        self._text_cache: dict[str, np.ndarray] = {}

    def text_embeddings(self, labels: list[str]) -> np.ndarray:
        """``[len(labels), D]`` prompt-ensembled embeddings, computed once per label."""
        from ssam.model.clip import encode_texts

        missing = [lab for lab in dict.fromkeys(labels) if lab not in self._text_cache]
        if missing:
            templates = self.l.prompt_templates or None
            emb = (
                encode_texts(self.clip, missing, templates) if templates else encode_texts(self.clip, missing)
            )
            self._text_cache.update(zip(missing, emb, strict=True))
        return (
            np.stack([self._text_cache[lab] for lab in labels])
            if labels
            else np.zeros((0, self.clip.embed_dim))
        )

    def crop_embeddings(self, image: np.ndarray, anns: list[dict]) -> np.ndarray:
        from ssam.model.clip import encode_images

        crops = []
        for ann in anns:
            seg = ann["segmentation"]
            mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
            crop = crop_with_background(
                image,
                mask,
                ann["bbox"],
                self.l.crop_padding,
                self.l.background,
                self.l.background_dim,
                self.l.blur_radius,
            )
            crops.append(self.clip.preprocess(crop))
        embs = [
            encode_images(self.clip, torch.stack(crops[s : s + self.l.clip_batch_size]))
            for s in range(0, len(crops), self.l.clip_batch_size)
        ]
        return np.concatenate(embs) if embs else np.zeros((0, self.clip.embed_dim), np.float32)

    def label_one(self, jpeg: bytes, candidates_json: str, annotations_json: str) -> dict:
        anns = json.loads(annotations_json)
        cands = [c["label"] for c in json.loads(candidates_json)]
        emb = self.crop_embeddings(image_from_jpeg(jpeg), anns)
        names = cands + list(self.l.background_labels)
        if cands:
            logits = self.l.logit_scale * emb @ self.text_embeddings(names).T
            probs = torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()
            picks = choose_labels(
                probs, names, len(cands), self.l.top_k, self.l.score_threshold, self.l.margin_threshold
            )
        else:
            picks = [(None, 0.0, [])] * len(anns)
        for ann, (label, score, topk) in zip(anns, picks, strict=True):
            ann["label"], ann["label_score"], ann["topk"] = label, score, topk
        buf = io.BytesIO()
        np.save(buf, emb.astype(np.float16), allow_pickle=False)
        return {
            "annotations_json": json.dumps(anns),
            "emb": buf.getvalue() if self.l.keep_embeddings else b"",
        }

    def __call__(self, batch):
        started = time.perf_counter()
        out = to_lists(batch)
        map_rows(
            out,
            self.name,
            lambda i: self.label_one(out["jpeg"][i], out["candidates_json"][i], out["annotations_json"][i]),
            {"emb": b""},
        )
        record_time(out, self.name, started)
        return out
