"""Semantic-SAM inference: masks from boxes, points or a point grid, named from any vocabulary.

Automatic mode is the project's one automatic-mask engine (:mod:`ssam.model.amg`, SAM's generator
recipe on the device, the same code and defaults as the pipeline's masks stage), run on
Semantic-SAM so that each mask also carries its semantic embedding. Each embedding is compared with
the vocabulary's CLIP text embeddings (prompt-ensembled): the nearest entry names it, with its
softmax probability at the model's learned temperature, or nothing below ``min_label_score``.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide

from .amg import AmgSettings, MaskEngine, sam_image_features, upscale_logits
from .semantic_sam import SemanticSam


class SemanticPredictor:
    """Holds one image's features; answers box, point and automatic queries."""

    def __init__(self, model: SemanticSam, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self._engine: MaskEngine | None = None

    @torch.inference_mode()
    def set_image(self, image_hwc: np.ndarray) -> None:
        # the masks stage's encoding (resize, normalise, pad, encode), for one image
        [(self.features, self.input_size)] = sam_image_features(self.model, [image_hwc], 1, bf16=False)
        self.original_size = image_hwc.shape[:2]
        self.image = image_hwc

    @torch.inference_mode()
    def _decode(self, boxes=None, points=None) -> tuple[torch.Tensor, ...]:
        if boxes is not None:
            b = torch.as_tensor(
                self.transform.apply_boxes(np.asarray(boxes, np.float32), self.original_size),
                device=self.device,
            )
            return self.model.decode(self.features, boxes=b)
        p = torch.as_tensor(
            self.transform.apply_coords(np.asarray(points, np.float32), self.original_size),
            device=self.device,
        )
        labels = torch.ones(len(p), 1, dtype=torch.int, device=self.device)
        return self.model.decode(self.features, points=(p[:, None, :], labels))

    def _upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        size = self.model.image_encoder.img_size
        return upscale_logits(low_res[:, 0], size, self.input_size, self.original_size)[:, None]

    @torch.inference_mode()
    def predict(self, boxes=None, points=None) -> tuple[np.ndarray, ...]:
        """One mask per box (XYXY) or point (XY), image coordinates: the multimask output with the
        highest predicted IoU. Returns masks NxHxW bool, iou N, semantic NxD, score N."""
        masks, iou, sem, score = self._decode(boxes=boxes, points=points)
        best = iou[:, 1:].argmax(1) + 1  # the raw head's choice, as segment-anything's predictor
        rows = torch.arange(len(best), device=best.device)
        logits = self._upscale(masks[rows, best][:, None])[:, 0]
        up, iou = logits > self.model.mask_threshold, iou[rows, best].float()
        cal = self.model.iou_calibration
        if cal is not None:
            stab = None
            if cal.uses_stability:  # as automatic mode computes it
                offset = AmgSettings().stability_score_offset
                stab = calculate_stability_score(logits.float(), self.model.mask_threshold, offset)
            iou = cal.apply(iou, stab)
        return (
            up.cpu().numpy(),
            iou.cpu().numpy(),  # float: numpy has no bf16 (callers' autocast)
            sem[rows, best].float().cpu().numpy(),
            score[rows, best].float().cpu().numpy(),
        )

    def generate(self, settings: AmgSettings | None = None) -> tuple[np.ndarray, ...]:
        """Automatic masks by the project's one engine (:class:`~ssam.model.amg.MaskEngine`, the same
        as the pipeline's masks stage), highest predicted IoU first.

        Returns masks NxHxW bool, iou N, semantic NxD, score N.
        """
        settings = settings or AmgSettings()
        if self._engine is None or self._engine.s != settings:
            self._engine = MaskEngine(self.model, settings)
        res = self._engine.generate([self.image], [self.features], return_masks=True)[0]
        if res.failure:
            raise RuntimeError(f"automatic masks failed: {res.failure}")
        h, w = self.original_size
        if not res.records:
            d = self.model.config.clip_dim
            return np.zeros((0, h, w), bool), np.zeros(0), np.zeros((0, d)), np.zeros(0)
        iou = np.array([r["predicted_iou"] for r in res.records])
        return res.masks, iou, res.semantic, res.score

    def name(
        self, semantic_nd: np.ndarray, vocab_emb_vd: np.ndarray, vocab: list[str], min_label_score: float
    ) -> tuple[list[str | None], np.ndarray]:
        """The nearest vocabulary entry per embedding and its probability (None below the threshold).

        The probability is the softmax over the vocabulary at the learned temperature, which the
        training's cross-entropy calibrates: of masks scored 0.5, about half are named right
        (docs/TRAINING.md); with K names, 1/K is no preference.
        """
        if len(semantic_nd) == 0:
            return [], np.zeros(0)
        scale = float(self.model.logit_scale.detach().exp().clamp(max=100))
        probs = torch.softmax(torch.from_numpy(scale * semantic_nd @ vocab_emb_vd.T).float(), dim=1).numpy()
        best = probs.argmax(1)
        p = probs[np.arange(len(best)), best]
        return [vocab[j] if pj >= min_label_score else None for j, pj in zip(best, p, strict=True)], p
