"""Masks and labels in one worker (``ray.fuse_gpu_stages: true``).

On a GPU node the two model stages can share one actor and one GPU: SAM's masks go straight to
CLIP in the same process, and the annotations (with their RLEs) and the image never cross Ray's
object store between the two. Both stages keep their own config sections, their own timing
columns and their own failure reasons.
"""

from __future__ import annotations

from typing import Any

from .common import Stage
from .labels import LabelsConfig, LabelStage
from .masks import MasksConfig, MaskStage


class MasksAndLabelsStage(Stage):
    """:class:`MaskStage` then :class:`LabelStage` on each batch, in one process."""

    name = "masks+labels"
    reads = (*MaskStage.reads, "candidates_json")
    writes = (*MaskStage.writes, *LabelStage.writes)

    def __init__(self, masks_cfg: MasksConfig, labels_cfg: LabelsConfig, seed: int = 0):
        self.masks = MaskStage(masks_cfg, seed)
        self.labels = LabelStage(labels_cfg, seed)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        return self.labels(self.masks(batch))  # each checks its own contract and records its time
