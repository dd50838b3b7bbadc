"""Masks: SAM automatic mask proposals, by one of two engines.

``masks.engine: batched`` (the default) is :class:`ssam.model.amg.MaskEngine`, the one automatic-mask
engine this project has (``ssam-predict`` uses it too): the prompts of all images of a batch are
decoded together and filtering, NMS and RLE encoding stay on the device. ``reference`` is
segment-anything's own ``SamAutomaticMaskGenerator``, untouched, image by image (its image
encoder still runs batched over the images of a batch); it is kept to compare against.

Both honour every generator setting in ``masks:``, with one set of defaults
(:class:`~ssam.model.amg.AmgSettings`), and both drop masks smaller than ``masks.min_mask_area``
before anything is written: the batched engine before its box NMS, so that a degenerate mask
suppresses no other; the reference after its generator's NMS, which it leaves untouched. Where a
too-small mask would have suppressed a larger one, only the batched engine keeps the larger one
(benchmarks/README.md measures it). A CUDA out-of-memory error halves the batch and retries; a row that
still does not fit alone fails as ``gpu_oom``.
"""

from __future__ import annotations

import io
import json
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from ssam.configio import Section
from ssam.device import bf16_autocast, keep_freed_memory, resolve_device, use_bf16
from ssam.model.amg import AmgSettings, MaskEngine, sam_image_features

from .common import ROW_COLUMNS, RowFailure, Stage, map_rows, ok_indices

AMG = AmgSettings()  # the one set of automatic-mask defaults (segment-anything's, plus ours)


class MasksConfig(Section):
    engine: Literal["batched", "reference"] = Field(
        "batched", description="batched: our GPU-grade engine; reference: segment-anything's generator"
    )
    sam_model: str = Field("vit_h", description="SAM size: vit_h, vit_l, vit_b, smoke")
    sam_checkpoint: str | None = Field(
        None, description="checkpoint path or URL (null: the official one, fetched once)"
    )
    device: str = Field("auto", description="auto, cpu, cuda")
    bf16: bool = Field(
        AMG.bf16, description="CUDA: bf16 autocast encoder, bf16 mask decoder (batched engine)"
    )
    cpu_bf16: bool = Field(
        AMG.cpu_bf16,
        description="CPU with AVX512-BF16 or AMX: bf16 as on CUDA (x1.9 for vit_b here; else float32)",
    )
    compile_encoder: bool = Field(
        AMG.compile_encoder, description="batched engine on CUDA: torch.compile the image encoder"
    )
    compile_decoder: bool = Field(
        AMG.compile_decoder, description="batched engine on CUDA: torch.compile the mask decoder"
    )
    points_per_side: int = Field(AMG.points_per_side, ge=1, le=128, description="SAM point grid per side")
    points_per_batch: int = Field(
        AMG.points_per_batch, ge=1, description="point prompts per mask-decoder call (GPU: 256-1024)"
    )
    pred_iou_thresh: float = Field(AMG.pred_iou_thresh, ge=0, le=1, description="minimum predicted IoU")
    stability_score_thresh: float = Field(
        AMG.stability_score_thresh, ge=0, le=1, description="minimum stability score"
    )
    stability_score_offset: float = Field(
        AMG.stability_score_offset, description="logit offset for the stability score"
    )
    box_nms_thresh: float = Field(AMG.box_nms_thresh, ge=0, le=1, description="box IoU for NMS between masks")
    crop_n_layers: int = Field(AMG.crop_n_layers, ge=0, le=3, description="extra crop layers")
    crop_nms_thresh: float = Field(
        AMG.crop_nms_thresh, ge=0, le=1, description="box IoU for NMS between crops"
    )
    crop_overlap_ratio: float = Field(AMG.crop_overlap_ratio, ge=0, lt=1, description="overlap of crops")
    crop_n_points_downscale_factor: int = Field(
        AMG.crop_n_points_downscale_factor, ge=1, description="point-grid downscale per crop layer"
    )
    min_mask_region_area: int = Field(
        AMG.min_mask_region_area, ge=0, description="remove islands and holes smaller than this (pixels)"
    )
    min_mask_area: int = Field(
        AMG.min_mask_area, ge=0, description="drop masks with fewer pixels (empty or degenerate masks)"
    )
    max_masks_per_image: int = Field(
        AMG.max_masks, ge=1, description="keep this many masks, highest predicted IoU first"
    )
    encoder_batch_size: int = Field(
        AMG.encoder_batch_size, ge=1, description="images (or crops) per image-encoder forward"
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads while this stage runs (0: the process's; under Ray floor(num_cpus))",
    )

    @model_validator(mode="after")
    def _known_size(self):
        from ssam.model.sam import SAM_SIZES

        if self.sam_model not in SAM_SIZES:
            raise ValueError(f"unknown SAM size {self.sam_model!r}; expected one of {sorted(SAM_SIZES)}")
        return self

    def amg_settings(self) -> AmgSettings:
        """These settings as the engine's settings."""
        return AmgSettings(
            points_per_side=self.points_per_side,
            points_per_batch=self.points_per_batch,
            pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh,
            stability_score_offset=self.stability_score_offset,
            box_nms_thresh=self.box_nms_thresh,
            crop_n_layers=self.crop_n_layers,
            crop_nms_thresh=self.crop_nms_thresh,
            crop_overlap_ratio=self.crop_overlap_ratio,
            crop_n_points_downscale_factor=self.crop_n_points_downscale_factor,
            min_mask_region_area=self.min_mask_region_area,
            min_mask_area=self.min_mask_area,
            max_masks=self.max_masks_per_image,
            encoder_batch_size=self.encoder_batch_size,
            bf16=self.bf16,
            cpu_bf16=self.cpu_bf16,
            compile_encoder=self.compile_encoder,
            compile_decoder=self.compile_decoder,
        )


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
    """``jpeg`` -> ``annotations_json`` (SA-1B annotations, no labels yet); ``no_masks`` when empty.

    Args:
        cfg: the ``masks:`` section.
        seed: seed of the smoke model's random weights.
        sam: an already built SAM to use instead of loading ``cfg.sam_model`` (benchmarks, tests).
    """

    name = "masks"
    reads = (*ROW_COLUMNS, "jpeg")
    writes = ("annotations_json",)

    def __init__(self, cfg: MasksConfig, seed: int = 0, sam=None):
        from ssam.model.sam import load_sam

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # the batched engine's per-batch buffers: fresh pages cost a fault each
        self.torch_threads = cfg.torch_threads  # applied around each batch (Stage.__call__)
        if sam is None:
            sam, self.provenance = load_sam(cfg.sam_model, cfg.sam_checkpoint, seed=seed)
        else:
            self.provenance = {"name": cfg.sam_model, "checkpoint": None, "smoke": True, "injected": True}
        self.sam = sam.to(self.device).eval()
        self.bf16 = use_bf16(self.device, cfg.bf16, cfg.cpu_bf16)  # the encoder's (both engines)
        self.engine = MaskEngine(self.sam, cfg.amg_settings()) if cfg.engine == "batched" else None
        if self.engine is None:
            self.predictor = PrecomputedPredictor(self.sam)
            self.generator = SamAutomaticMaskGenerator(
                self.sam,
                points_per_side=cfg.points_per_side,
                points_per_batch=cfg.points_per_batch,
                pred_iou_thresh=cfg.pred_iou_thresh,
                stability_score_thresh=cfg.stability_score_thresh,
                stability_score_offset=cfg.stability_score_offset,
                box_nms_thresh=cfg.box_nms_thresh,
                crop_n_layers=cfg.crop_n_layers,
                crop_nms_thresh=cfg.crop_nms_thresh,
                crop_overlap_ratio=cfg.crop_overlap_ratio,
                crop_n_points_downscale_factor=cfg.crop_n_points_downscale_factor,
                min_mask_region_area=cfg.min_mask_region_area,
                output_mode="coco_rle",
            )
            self.generator.predictor = self.predictor

    def embed(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Reference engine: image-encoder features ``1xCxhxw`` and resized input size per image, batched."""
        return sam_image_features(self.sam, images, self.cfg.encoder_batch_size, self.bf16)

    @torch.inference_mode()
    def reference_records(self, image: np.ndarray, features: torch.Tensor, input_size) -> list[dict]:
        """segment-anything's generator on one image, highest predicted IoU first."""
        self.predictor.preload(image, features, input_size)
        # CUDA only: under a CPU's autocast the generator hands a bf16 tensor to numpy (TypeError)
        with bf16_autocast(self.device, self.bf16 and self.device.type == "cuda"):
            records = self.generator.generate(image)
        records.sort(key=lambda r: -r["predicted_iou"])
        return records

    def annotations(self, records: list[dict]) -> list[dict]:
        """The kept records (``min_mask_area``, ``max_masks_per_image``) as SA-1B annotations."""
        kept = [r for r in records if r["area"] >= max(self.cfg.min_mask_area, 1)]
        kept = kept[: self.cfg.max_masks_per_image]
        if not kept:
            raise RowFailure("no_masks", "SAM proposed no mask that passed the thresholds")
        return [sa1b_annotation(i, r) for i, r in enumerate(kept)]

    def process(self, out: dict[str, list]) -> None:
        idx = ok_indices(out)
        images = {i: image_from_jpeg(out["jpeg"][i]) for i in idx}
        if self.engine is not None:
            results = dict(zip(idx, self.engine.generate([images[i] for i in idx]), strict=True))
        else:
            feats = dict(zip(idx, self.embed([images[i] for i in idx]), strict=True)) if idx else {}

        def one(i):
            if self.engine is None:
                records = self.reference_records(images[i], *feats[i])
            elif results[i].failure:
                raise RowFailure(results[i].failure, "out of GPU memory even as a batch of one image")
            else:
                records = results[i].records
            return {"annotations_json": json.dumps(self.annotations(records))}

        map_rows(out, self.name, one, {"annotations_json": "[]"})
