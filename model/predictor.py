"""Semantic-SAM inference: masks from boxes, points or a point grid, named from any vocabulary.

Automatic mode follows SAM's mask generator (a ``points_per_side`` grid, the three multimask
outputs per point, predicted-IoU and stability filtering, box NMS), using segment-anything's own
helpers for the grid, stability score and boxes. Each mask's semantic embedding is compared with
the vocabulary's CLIP text embeddings (prompt-ensembled): the nearest entry names it, with its
softmax probability at the model's learned temperature, or nothing below ``min_label_score``.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from .semantic_sam import SemanticSam


class SemanticPredictor:
    """Holds one image's features; answers box, point and automatic queries."""

    def __init__(self, model: SemanticSam, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @torch.inference_mode()
    def set_image(self, image_hwc: np.ndarray) -> None:
        img = self.transform.apply_image(image_hwc)
        self.original_size = image_hwc.shape[:2]
        self.input_size = img.shape[:2]
        x = self.model.preprocess(torch.as_tensor(img, device=self.device).permute(2, 0, 1).float()[None])
        self.features = self.model.image_encoder(x)

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
        return self.model.postprocess_masks(low_res, self.input_size, self.original_size)

    @torch.inference_mode()
    def predict(self, boxes=None, points=None) -> tuple[np.ndarray, ...]:
        """One mask per box (XYXY) or point (XY), image coordinates: the multimask output with the
        highest predicted IoU. Returns masks NxHxW bool, iou N, semantic NxD, score N."""
        masks, iou, sem, score = self._decode(boxes=boxes, points=points)
        best = iou[:, 1:].argmax(1) + 1
        rows = torch.arange(len(best), device=best.device)
        up = self._upscale(masks[rows, best][:, None])[:, 0] > self.model.mask_threshold
        return (
            up.cpu().numpy(),
            iou[rows, best].cpu().numpy(),
            sem[rows, best].cpu().numpy(),
            score[rows, best].cpu().numpy(),
        )

    @torch.inference_mode()
    def generate(
        self,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.9,
        box_nms_thresh: float = 0.7,
        max_masks: int = 200,
    ):
        """Automatic masks (SAM's recipe); returns masks NxHxW bool, iou N, semantic NxD, score N."""
        h, w = self.original_size
        grid = build_point_grid(points_per_side) * np.array([[w, h]])
        keep_masks, keep_iou, keep_sem, keep_score = [], [], [], []
        for s in range(0, len(grid), points_per_batch):
            masks, iou, sem, score = self._decode(points=grid[s : s + points_per_batch])
            masks, iou, sem, score = (
                masks[:, 1:].flatten(0, 1),
                iou[:, 1:].flatten(),
                sem[:, 1:].flatten(0, 1),
                score[:, 1:].flatten(),
            )
            ok = iou > pred_iou_thresh
            stab = calculate_stability_score(masks, self.model.mask_threshold, 1.0)
            ok &= stab >= stability_score_thresh
            if ok.any():
                up = self._upscale(masks[ok][:, None])[:, 0] > self.model.mask_threshold
                nonempty = up.flatten(1).any(1)
                keep_masks.append(up[nonempty])
                keep_iou.append(iou[ok][nonempty])
                keep_sem.append(sem[ok][nonempty])
                keep_score.append(score[ok][nonempty])
        if not keep_masks:
            d = self.model.config.clip_dim
            return np.zeros((0, h, w), bool), np.zeros(0), np.zeros((0, d)), np.zeros(0)
        masks, iou, sem, score = (torch.cat(x) for x in (keep_masks, keep_iou, keep_sem, keep_score))
        keep = batched_nms(
            batched_mask_to_box(masks).float(), iou.float(), torch.zeros_like(iou), box_nms_thresh
        )
        keep = keep[:max_masks]
        return (
            masks[keep].cpu().numpy(),
            iou[keep].cpu().numpy(),
            sem[keep].cpu().numpy(),
            score[keep].cpu().numpy(),
        )

    def name(
        self, semantic_nd: np.ndarray, vocab_emb_vd: np.ndarray, vocab: list[str], min_label_score: float
    ) -> tuple[list[str | None], np.ndarray]:
        """The nearest vocabulary entry per embedding and its softmax probability (None below the threshold)."""
        if len(semantic_nd) == 0:
            return [], np.zeros(0)
        scale = float(self.model.logit_scale.detach().exp().clamp(max=100))
        probs = torch.softmax(torch.from_numpy(scale * semantic_nd @ vocab_emb_vd.T).float(), dim=1).numpy()
        best = probs.argmax(1)
        p = probs[np.arange(len(best)), best]
        return [vocab[j] if pj >= min_label_score else None for j, pj in zip(best, p, strict=True)], p
