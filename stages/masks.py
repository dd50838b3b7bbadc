"""Masks: SAM automatic mask proposals (segment-anything's ``SamAutomaticMaskGenerator``).

Every generator setting comes from ``cfg.masks``. The expensive part, the ViT image encoder, runs
batched over the images of a Ray batch (``encoder_batch_size`` at a time); the generator then
reuses those features for its full-image crop instead of encoding each image alone. bf16
autocast on CUDA when ``masks.bf16`` is set.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from ssam.device import resolve_device

from .common import RowFailure, map_rows, ok_indices, record_time, to_lists


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


class MaskStage:
    """``jpeg`` -> ``annotations_json`` (SA-1B annotations, no labels yet); ``no_masks`` when empty."""

    name = "masks"

    def __init__(self, cfg):
        from ssam.model.sam import load_sam

        m = cfg.masks
        self.m = m
        self.device = resolve_device(m.device)
        if m.torch_threads:
            torch.set_num_threads(m.torch_threads)
        self.sam, self.provenance = load_sam(m.sam_model, m.sam_checkpoint, seed=cfg.seed)
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
        if self.device.type == "cuda" and self.m.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Image-encoder features ``1xCxhxw`` and the resized input size of each image, batched."""
        out = []
        for s in range(0, len(images), self.m.encoder_batch_size):
            chunk, sizes = [], []
            for im in images[s : s + self.m.encoder_batch_size]:
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
        records = records[: self.m.max_masks_per_image]
        if not records:
            raise RowFailure("no_masks", "SAM proposed no mask that passed the thresholds")
        return [sa1b_annotation(i, r) for i, r in enumerate(records)]

    def __call__(self, batch):
        started = time.perf_counter()
        out = to_lists(batch)
        idx = ok_indices(out)
        images = {i: image_from_jpeg(out["jpeg"][i]) for i in idx}
        feats = dict(zip(idx, self.embed([images[i] for i in idx]), strict=True)) if idx else {}

        def one(i):
            anns = self.masks_for(images[i], *feats[i])
            return {"annotations_json": json.dumps(anns)}

        map_rows(out, self.name, one, {"annotations_json": "[]"})
        record_time(out, self.name, started)
        return out
