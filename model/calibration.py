"""Calibration of the predicted IoU: a monotone map from the IoU head's output to the IoU a mask has.

SAM's IoU head is trained, per prompt, on the IoU of each of its three outputs with the *prompted*
mask. Automatic mode asks something else: how good is this mask of whatever object it covers. A head
trained from scratch answers that badly in two ways (docs/TRAINING.md, "IoU calibration"): all seeds
underrate good masks, and at some seeds an output learns to segment a neighbouring object, which the
head, rightly for its training target, scores as a miss while automatic mode keeps a good mask.

So after training, ``ssam-train`` runs automatic mode on images of its own training data, pairs each
mask's raw predicted IoU and stability score with its IoU against the best-matching annotation, and
fits an isotonic (monotone) regression of that IoU on ``(1 - w) * predicted IoU + w * stability``,
``w`` chosen among a few by the fit's error (a young head can rank masks worse than their
stability does); ``model.pt`` records the map and every automatic or prompted prediction goes
through it. A calibrated 0.8 is a mask whose IoU is typically 0.8. With ``w = 0`` the order of masks
(which one NMS keeps) is the raw head's; with ``w > 0`` it is that of the combined score.

The fit is the pool-adjacent-violators algorithm on the *median* of each block, not the mean: the
error measured (mean absolute) is minimised by the median, and a block holding both junk and good
masks is pulled towards whichever is the majority rather than left at a value neither has.
PAV is a few lines and no installed library here has it (scikit-learn's ``IsotonicRegression``
fits the mean), so it is written here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ssam.overlay import rle_ious

#: knots closer than this in raw IoU are merged (keeps the map small for tens of thousands of masks)
KNOT_SPACING = 1e-3
#: added per knot so that the map is strictly increasing: equal calibrated values would let NMS
#: break ties differently from the raw scores it ranked before
TIE_BREAK = 1e-6


def fit_isotonic_median(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A non-decreasing step fit of ``y`` on ``x`` minimising the absolute error (PAV with block
    medians), returned as knots ``(xs, ys)``: each block's median ``y`` at its mean ``x``."""
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    blocks: list[list] = []  # [ys of the block, sum of xs, median]
    for xi, yi in zip(x, y, strict=True):
        blocks.append([[yi], xi, yi])
        while len(blocks) > 1 and blocks[-2][2] > blocks[-1][2]:
            ys, sx, _ = blocks.pop()
            blocks[-1][0] += ys
            blocks[-1][1] += sx
            blocks[-1][2] = float(np.median(blocks[-1][0]))
    xs = np.array([b[1] / len(b[0]) for b in blocks])
    ys = np.array([b[2] for b in blocks])
    return xs, ys


#: weights of the stability score tried by :meth:`IouCalibration.fit` (0: the IoU head alone)
STABILITY_WEIGHTS = tuple(i / 10 for i in range(11))


@dataclass
class IouCalibration:
    """A piecewise-linear, strictly increasing map (knots ``raw`` -> ``calibrated``, flat outside)
    of the raw score ``(1 - w) * predicted IoU + w * stability score``, ``w = stability_weight``."""

    raw: list[float]
    calibrated: list[float]
    stability_weight: float = 0.0
    masks: int = 0  # masks it was fitted on
    images: int = 0
    source: str = "training"  # the images': held-out, calibration_shards or training
    error_before: float | None = None  # mean |predicted - true IoU| on those masks, raw head
    error_after: float | None = None  # the same, calibrated

    @property
    def uses_stability(self) -> bool:
        return self.stability_weight > 0

    @classmethod
    def fit(
        cls,
        predicted: np.ndarray,
        true: np.ndarray,
        stability: np.ndarray | None = None,
        images: int = 0,
        source: str = "training",
    ) -> IouCalibration | None:
        """The map fitted on paired raw predictions and true IoUs; None without any pair.

        With ``stability`` (each mask's stability score), the raw score also weighs it, at the
        weight of :data:`STABILITY_WEIGHTS` whose map has the lowest error on these masks (the
        IoU head alone unless another is strictly better). A young head can rank masks worse than
        their stability does: seed 3 in docs/TRAINING.md rates good and bad masks alike.
        """
        predicted, true = np.asarray(predicted, float), np.asarray(true, float)
        if len(predicted) == 0:
            return None
        best = None
        for w in STABILITY_WEIGHTS if stability is not None else (0.0,):
            cal = cls._fit_map(predicted, true, stability, w)
            cal.error_after = float(np.abs(cal.apply_np(predicted, stability) - true).mean())
            if best is None or cal.error_after < best.error_after - 1e-9:
                best = cal
        best.masks, best.images, best.source = len(predicted), images, source
        best.error_before = float(np.abs(predicted - true).mean())
        return best

    @classmethod
    def _fit_map(cls, predicted, true, stability, w: float) -> IouCalibration:
        score = _score(predicted, stability, w, np)
        xs, ys = fit_isotonic_median(score, true)
        keep = np.r_[True, np.diff(xs) > KNOT_SPACING]  # merge near-duplicate knots (keep the first)
        xs = xs[keep]
        ys = np.clip(np.maximum.accumulate(ys[keep]), 0.0, 1.0) + TIE_BREAK * np.arange(len(xs))
        return cls([float(v) for v in xs], [float(v) for v in ys], w)

    def apply_np(self, predicted: np.ndarray, stability: np.ndarray | None = None) -> np.ndarray:
        return np.interp(_score(predicted, stability, self.stability_weight, np), self.raw, self.calibrated)

    def apply(self, predicted: torch.Tensor, stability: torch.Tensor | None = None) -> torch.Tensor:
        """The map on tensors of any (one) shape, on their device."""
        xs, ys = self._knots(predicted.device)
        r = _score(
            predicted.float(), None if stability is None else stability.float(), self.stability_weight, torch
        )
        if len(xs) == 1:
            return ys.expand_as(r).clone()
        i = torch.searchsorted(xs, r.contiguous()).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        t = ((r - x0) / (x1 - x0)).clamp(0, 1)
        return y0 + t * (y1 - y0)

    def _knots(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The knots as tensors on ``device``, made once per device (not a dataclass field: neither
        saved nor compared). The engine applies the map once per prompt batch, and a fresh copy to
        a GPU each time would make the host wait for it."""
        cache = self.__dict__.setdefault("_on_device", {})
        if device not in cache:
            knots = torch.tensor([self.raw, self.calibrated], dtype=torch.float32)
            cache[device] = tuple(knots.to(device))
        return cache[device]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> IouCalibration | None:
        if not d:
            return None
        raw, cal = d.get("raw"), d.get("calibrated")
        if not raw or not cal or len(raw) != len(cal) or bool(np.any(np.diff(raw) <= 0)):
            raise ValueError(
                f"iou_calibration: expected increasing 'raw' knots and as many 'calibrated' ({str(d)[:200]})"
            )
        return cls(**d)


def _score(predicted, stability, w: float, xp):
    """The raw score a calibration maps; ``xp`` is numpy or torch. An empty mask's stability is NaN
    (0 / 0): it counts as 0."""
    if w == 0:
        return predicted
    if stability is None:
        raise ValueError("this IoU calibration weighs the stability score: pass each mask's stability")
    return (1 - w) * predicted + w * xp.nan_to_num(stability, nan=0.0)


def best_match_ious(records: list[dict], annotations: list[dict]) -> np.ndarray:
    """Per predicted mask (``segmentation`` RLE), its IoU with the best-matching annotation (0 when
    the image has none): what ``ssam-eval`` compares the predicted IoU with (``match_metrics``)."""
    iou = rle_ious([r["segmentation"] for r in records], [a["segmentation"] for a in annotations])
    return iou.max(1) if iou.shape[1] else np.zeros(len(records))
