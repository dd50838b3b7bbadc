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
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter
from pydantic import Field

from ssam.configio import Section
from ssam.device import CompiledOrEager, keep_freed_memory, resolve_device, use_bf16
from ssam.overlay import decode_rle

from .common import ROW_COLUMNS, RowFailure, Stage, map_rows, ok_indices
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

    Columns ``[:n_candidates]`` are candidates, the rest background labels. The label is the best
    column when it is a candidate, scores at least ``score_threshold`` and beats the runner-up by
    at least ``margin_threshold``; the score is then its score, else the best candidate's. Ties go
    to the lower column. Sorted for all masks at once; only the output is built row by row.
    """
    scores = np.asarray(scores)
    m, n = scores.shape
    rows = np.arange(m)
    order = np.argsort(-scores, axis=1, kind="stable")
    top = scores[rows, order[:, 0]] if n else np.zeros(m, scores.dtype)
    margin = (top - scores[rows, order[:, 1]]) if n > 1 else top
    ok = (
        (order[:, 0] < n_candidates)
        & (top >= score_threshold)
        & (margin.astype(np.float64) >= margin_threshold)
    )
    cand = np.argsort(-scores[:, :n_candidates], axis=1, kind="stable")[:, :top_k]
    score = np.where(ok, top, scores[rows, cand[:, 0]] if n_candidates else 0.0)
    out = []
    for best, good, value, idx, vals in zip(
        order[:, 0].tolist(),
        ok.tolist(),
        score.tolist(),
        cand.tolist(),
        scores[rows[:, None], cand].tolist(),
        strict=True,
    ):
        topk = [{"label": names[j], "score": round(v, 4)} for j, v in zip(idx, vals, strict=True)]
        out.append((names[best] if good else None, round(value, 4), topk))
    return out


class LabelsConfig(Section):
    engine: Literal["batched", "reference"] = Field(
        "batched",
        description="batched: crops cut on the device, CLIP over several images' crops; reference: PIL crops",
    )
    bf16: bool = Field(True, description="batched engine: bf16 autocast of CLIP's image tower on CUDA")
    cpu_bf16: bool = Field(
        False,
        description="batched engine on a CPU with AVX512-BF16 or AMX: bf16 as on CUDA (x1.9 for ViT-B-32 here)",
    )
    compile_clip: bool = Field(
        True, description="batched engine on CUDA: torch.compile CLIP's image tower (first batches compile)"
    )
    clip_model: str = Field("ViT-L-14", description="open_clip model name, or ssam-smoke-clip")
    clip_pretrained: str | None = Field(
        "datacomp_xl_s13b_b90k", description="open_clip pretrained tag or local file"
    )
    device: str = Field("auto", description="auto, cpu, cuda")
    background: Literal["dim", "blur", "none"] = Field(
        "dim", description="what happens to pixels outside the mask in the crop"
    )
    background_dim: float = Field(0.3, ge=0, le=1, description="'dim': outside pixels are multiplied by this")
    blur_radius: float = Field(8.0, ge=0, description="'blur': Gaussian radius in pixels")
    crop_padding: float = Field(0.1, ge=0, le=2, description="box padding, as a fraction of its size")
    prompt_templates: list[str] = Field(
        [], description="prompt ensemble; each needs {} (empty: built-in five)"
    )
    background_labels: list[str] = Field(
        ["background", "texture", "blurry photo"], description="labels that mean 'no object'"
    )
    logit_scale: float = Field(100.0, gt=0, description="softmax temperature applied to cosine similarities")
    score_threshold: float = Field(0.3, ge=0, le=1, description="label is null below this softmax score")
    margin_threshold: float = Field(
        0.05, ge=0, le=1, description="label is null when the runner-up is this close"
    )
    top_k: int = Field(3, ge=1, le=50, description="candidates kept in each annotation's topk")
    clip_batch_size: int = Field(64, ge=1, description="crops per CLIP forward")
    keep_embeddings: bool = Field(True, description="write KEY.emb.npy with the crop embeddings")
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads while this stage runs (0: the process's; under Ray floor(num_cpus))",
    )


class LabelStage(Stage):
    """``annotations_json`` + ``candidates_json`` -> labelled annotations and ``emb`` (float16 .npy bytes).

    Args:
        cfg: the ``labels:`` section.
        seed: seed of the smoke model's random weights.
        clip: an already loaded CLIP (``ClipBundle``) to use instead of ``cfg.clip_model``.
    """

    name = "labels"
    reads = (*ROW_COLUMNS, "jpeg", "candidates_json", "annotations_json")
    writes = ("annotations_json", "emb")

    def __init__(self, cfg: LabelsConfig, seed: int = 0, clip=None):
        from ssam.model.clip import load_clip
        from ssam.model.label_engine import TextEmbeddingCache

        self.cfg = cfg
        self.torch_threads = cfg.torch_threads  # applied around each batch (Stage.__call__)
        device = str(resolve_device(cfg.device))
        if device == "cpu":
            keep_freed_memory()  # the batched engine's windows and crops: fresh pages cost a fault each
        if clip is None:
            clip = load_clip(cfg.clip_model, cfg.clip_pretrained, seed=seed, device=device)
        self.clip = clip
        self.provenance = clip.provenance
        # the batched engine's image tower: compiled on CUDA when asked (Inductor fuses the bf16
        # casts, norms and GELUs between the matmuls)
        compile_clip = cfg.engine == "batched" and cfg.compile_clip and next(clip.model.parameters()).is_cuda
        self.encode = CompiledOrEager(clip.model.encode_image, compile_clip, "CLIP's image tower")
        self.text = TextEmbeddingCache(clip, cfg.prompt_templates or None)
        self.bf16 = use_bf16(next(clip.model.parameters()).device, cfg.bf16, cfg.cpu_bf16)  # batched engine

    def crop_embeddings(self, image: np.ndarray, anns: list[dict]) -> np.ndarray:
        """Reference engine: ``[M, D]`` CLIP embeddings of one image's mask crops, cut with PIL."""
        from ssam.model.clip import encode_images

        crops = []
        for ann in anns:
            mask = decode_rle(ann["segmentation"])
            crop = crop_with_background(
                image,
                mask,
                ann["bbox"],
                self.cfg.crop_padding,
                self.cfg.background,
                self.cfg.background_dim,
                self.cfg.blur_radius,
            )
            crops.append(self.clip.preprocess(crop))
        embs = [
            encode_images(self.clip, torch.stack(crops[s : s + self.cfg.clip_batch_size]))
            for s in range(0, len(crops), self.cfg.clip_batch_size)
        ]
        return np.concatenate(embs) if embs else np.zeros((0, self.clip.embed_dim), np.float32)

    def batched_embeddings(self, images: list[np.ndarray], anns: list[list[dict]]) -> list:
        """Batched engine: each image's crop embeddings, or ``Failed`` where it ran out of GPU memory."""
        from ssam.model.label_engine import embed_mask_crops
        from ssam.oom import run_halving_on_oom

        def run(ix: list[int]) -> list[np.ndarray]:
            return embed_mask_crops(
                self.clip,
                [images[i] for i in ix],
                [anns[i] for i in ix],
                padding=self.cfg.crop_padding,
                background=self.cfg.background,
                dim=self.cfg.background_dim,
                blur_radius=self.cfg.blur_radius,
                batch_size=self.cfg.clip_batch_size,
                bf16=self.bf16,
                encode=self.encode,
            )

        return run_halving_on_oom(run, list(range(len(images))))

    def label(self, anns: list[dict], cands: list[str], emb: np.ndarray) -> dict:
        """Name each annotation from its image's candidates; the row's new columns."""
        names = cands + list(self.cfg.background_labels)
        if cands:
            logits = self.cfg.logit_scale * emb @ self.text.get(names).T
            probs = torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()
            picks = choose_labels(
                probs, names, len(cands), self.cfg.top_k, self.cfg.score_threshold, self.cfg.margin_threshold
            )
        else:
            picks = [(None, 0.0, [])] * len(anns)
        for ann, (label, score, topk) in zip(anns, picks, strict=True):
            ann["label"], ann["label_score"], ann["topk"] = label, score, topk
        buf = io.BytesIO()
        np.save(buf, emb.astype(np.float16), allow_pickle=False)
        return {
            "annotations_json": json.dumps(anns),
            "emb": buf.getvalue() if self.cfg.keep_embeddings else b"",
        }

    def process(self, out: dict[str, list]) -> None:
        from ssam.oom import Failed

        idx = ok_indices(out)
        anns = {i: json.loads(out["annotations_json"][i]) for i in idx}
        images = {i: image_from_jpeg(out["jpeg"][i]) for i in idx}
        embs: dict[int, object] = {}
        if self.cfg.engine == "batched" and idx:
            embs = dict(
                zip(
                    idx,
                    self.batched_embeddings([images[i] for i in idx], [anns[i] for i in idx]),
                    strict=True,
                )
            )

        def one(i):
            emb = embs[i] if i in embs else self.crop_embeddings(images[i], anns[i])
            if isinstance(emb, Failed):
                raise RowFailure(emb.reason, emb.message)
            cands = [c["label"] for c in json.loads(out["candidates_json"][i])]
            return self.label(anns[i], cands, emb)

        map_rows(out, self.name, one, {"emb": b""})
