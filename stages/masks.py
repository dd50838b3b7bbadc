"""Masks: SAM automatic mask proposals (segment-anything's ``SamAutomaticMaskGenerator``).

Every generator setting comes from ``cfg.masks``. The expensive part, the ViT image encoder, runs
batched over the images of a Ray batch (``encoder_batch_size`` at a time); the generator then
reuses those features for its full-image crop instead of encoding each image alone. bf16
autocast on CUDA when ``masks.bf16`` is set.
"""

from __future__ import annotations

import io
import json
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from ssam.configio import Section
from ssam.device import resolve_device

from .common import ROW_COLUMNS, RowFailure, Stage, map_rows, ok_indices


class MasksConfig(Section):
    sam_model: str = Field("vit_h", description="SAM size: vit_h, vit_l, vit_b, smoke")
    sam_checkpoint: str | None = Field(
        None, description="checkpoint path or URL (null: the official one, fetched once)"
    )
    device: str = Field("auto", description="auto, cpu, cuda")
    bf16: bool = Field(True, description="bf16 autocast on CUDA")
    points_per_side: int = Field(32, ge=1, le=128, description="SAM point grid per side")
    points_per_batch: int = Field(64, ge=1, description="points decoded at once")
    pred_iou_thresh: float = Field(0.88, ge=0, le=1, description="minimum predicted IoU")
    stability_score_thresh: float = Field(0.95, ge=0, le=1, description="minimum stability score")
    stability_score_offset: float = Field(1.0, description="logit offset for the stability score")
    box_nms_thresh: float = Field(0.7, ge=0, le=1, description="box IoU for NMS between masks")
    crop_n_layers: int = Field(0, ge=0, le=3, description="extra crop layers")
    crop_nms_thresh: float = Field(0.7, ge=0, le=1, description="box IoU for NMS between crops")
    crop_overlap_ratio: float = Field(512 / 1500, ge=0, lt=1, description="overlap of crops")
    crop_n_points_downscale_factor: int = Field(1, ge=1, description="point-grid downscale per crop layer")
    min_mask_region_area: int = Field(
        0, ge=0, description="remove islands and holes smaller than this (pixels)"
    )
    max_masks_per_image: int = Field(
        256, ge=1, description="keep this many masks, highest predicted IoU first"
    )
    encoder_batch_size: int = Field(4, ge=1, description="images per image-encoder forward")
    torch_threads: int = Field(0, ge=0, description="torch CPU threads per actor (0: torch default)")

    @model_validator(mode="after")
    def _known_size(self):
        from ssam.model.sam import SAM_SIZES

        if self.sam_model not in SAM_SIZES:
            raise ValueError(f"unknown SAM size {self.sam_model!r}; expected one of {sorted(SAM_SIZES)}")
        return self


class PrecomputedPredictor(SamPredictor):
    """A ``SamPredictor`` that takes image features computed ahead, in a batch.

    ``set_image`` on the exact array given to :meth:`preload` (the generator's full-image crop is
    a view of it) installs those features; any other crop is encoded as usual.
    """

    def preload(self, image_hwc: np.ndarray, features: torch.Tensor, input_size: tuple[int, int]) -> None:
        self._pre = (image_hwc, features, input_size)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        pre = getattr(self, "_pre", None)
        if (
            pre is not None
            and image.shape == pre[0].shape
            and image.__array_interface__["data"][0] == pre[0].__array_interface__["data"][0]
        ):
            self.reset_image()
            self.original_size, self.features, self.input_size = image.shape[:2], pre[1], pre[2]
            self.is_image_set = True
            return
        super().set_image(image, image_format)


def image_from_jpeg(data: bytes) -> np.ndarray:
    """HxWx3 uint8 RGB from stored JPEG bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sa1b_annotation(i: int, m: dict) -> dict:
    """One generator record as an SA-1B annotation (plain Python types)."""
    return {
        "id": i,
        "segmentation": {
            "size": [int(s) for s in m["segmentation"]["size"]],
            "counts": m["segmentation"]["counts"],
        },
        "bbox": [float(v) for v in m["bbox"]],
        "area": int(m["area"]),
        "predicted_iou": float(m["predicted_iou"]),
        "stability_score": float(m["stability_score"]),
        "point_coords": [[float(x), float(y)] for x, y in m["point_coords"]],
        "crop_box": [float(v) for v in m["crop_box"]],
    }


class MaskStage(Stage):
    """``jpeg`` -> ``annotations_json`` (SA-1B annotations, no labels yet); ``no_masks`` when empty."""

    name = "masks"
    reads = (*ROW_COLUMNS, "jpeg")
    writes = ("annotations_json",)

    def __init__(self, cfg: MasksConfig, seed: int = 0):
        from ssam.model.sam import load_sam

        m = cfg
        self.cfg = m
        self.device = resolve_device(m.device)
        if m.torch_threads:
            torch.set_num_threads(m.torch_threads)
        self.sam, self.provenance = load_sam(m.sam_model, m.sam_checkpoint, seed=seed)
        self.sam.to(self.device)
        self.predictor = PrecomputedPredictor(self.sam)
        self.generator = SamAutomaticMaskGenerator(
            self.sam,
            points_per_side=m.points_per_side,
            points_per_batch=m.points_per_batch,
            pred_iou_thresh=m.pred_iou_thresh,
            stability_score_thresh=m.stability_score_thresh,
            stability_score_offset=m.stability_score_offset,
            box_nms_thresh=m.box_nms_thresh,
            crop_n_layers=m.crop_n_layers,
            crop_nms_thresh=m.crop_nms_thresh,
            crop_overlap_ratio=m.crop_overlap_ratio,
            crop_n_points_downscale_factor=m.crop_n_points_downscale_factor,
            min_mask_region_area=m.min_mask_region_area,
            output_mode="coco_rle",
        )
        self.generator.predictor = self.predictor

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Image-encoder features ``1xCxhxw`` and the resized input size of each image, batched."""
        out = []
        for s in range(0, len(images), self.cfg.encoder_batch_size):
            chunk, sizes = [], []
            for im in images[s : s + self.cfg.encoder_batch_size]:
                t = torch.as_tensor(self.predictor.transform.apply_image(im), device=self.device)
                t = t.permute(2, 0, 1).contiguous()[None]
                sizes.append(tuple(t.shape[-2:]))
                chunk.append(self.sam.preprocess(t))
            with self._autocast():
                feats = self.sam.image_encoder(torch.cat(chunk)).float()
            out += [(feats[j : j + 1], sizes[j]) for j in range(len(chunk))]
        return out

    @torch.inference_mode()
    def masks_for(self, image: np.ndarray, features: torch.Tensor, input_size: tuple[int, int]) -> list[dict]:
        self.predictor.preload(image, features, input_size)
        with self._autocast():
            records = self.generator.generate(image)
        records.sort(key=lambda r: -r["predicted_iou"])
        records = records[: self.cfg.max_masks_per_image]
        if not records:
            raise RowFailure("no_masks", "SAM proposed no mask that passed the thresholds")
        return [sa1b_annotation(i, r) for i, r in enumerate(records)]

    def process(self, out: dict[str, list]) -> None:
        idx = ok_indices(out)
        images = {i: image_from_jpeg(out["jpeg"][i]) for i in idx}
        feats = dict(zip(idx, self.embed([images[i] for i in idx]), strict=True)) if idx else {}

        def one(i):
            anns = self.masks_for(images[i], *feats[i])
            return {"annotations_json": json.dumps(anns)}

        map_rows(out, self.name, one, {"annotations_json": "[]"})
