"""Losses of Semantic-SAM training.

Masks: SAM's recipe -- focal + dice (20:1) per multimask output, only the lowest-loss output is
trained, and MSE between each output's predicted IoU and its real IoU. Semantics, for labelled
masks only: a contrastive loss between the semantic embedding of the chosen output (and of every
other output that covers the labelled mask, see ``named_outputs``) and the CLIP text
embeddings of the names a mask could have had -- the batch's labels plus its images' candidates
(cross-entropy over *distinct* names, so two masks of the same label are positives of one class,
never negatives of each other; the softmax at the learned temperature is then the label
probability that prediction reports) -- and MSE between the predicted cosine score and CLIP's
cosine of the mask crop with its label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def dice_loss(logits_mhw: torch.Tensor, target_mhw: torch.Tensor) -> torch.Tensor:
    """Per-mask soft dice loss, ``[M]``."""
    p = logits_mhw.sigmoid().flatten(1)
    t = target_mhw.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def mask_iou(logits_mhw: torch.Tensor, target_mhw: torch.Tensor) -> torch.Tensor:
    """IoU of the binarised prediction with the target, per mask, ``[M]`` (no gradient)."""
    p = (logits_mhw > 0).flatten(1).float()
    t = target_mhw.flatten(1)
    inter = (p * t).sum(1)
    return inter / (p.sum(1) + t.sum(1) - inter).clamp(min=1)


def mask_losses(
    masks_mkhw: torch.Tensor,
    iou_pred_mk: torch.Tensor,
    target_mhw: torch.Tensor,
    focal_w: float,
    dice_w: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lowest-loss-output mask loss, IoU-head loss, the chosen output index ``[M]``, its IoU ``[M]``
    and every output's IoU with the target ``[M, K]`` (no gradient)."""
    m, k = masks_mkhw.shape[:2]
    target = target_mhw[:, None].expand(-1, k, -1, -1)
    focal = sigmoid_focal_loss(masks_mkhw, target, reduction="none").flatten(2).mean(2)  # (M, K)
    dice = dice_loss(masks_mkhw.flatten(0, 1), target.flatten(0, 1)).view(m, k)
    per_output = focal_w * focal + dice_w * dice
    best = per_output.argmin(1)
    with torch.no_grad():
        ious = mask_iou(masks_mkhw.flatten(0, 1), target.flatten(0, 1)).view(m, k)
    iou_loss = F.mse_loss(iou_pred_mk, ious)
    chosen = per_output.gather(1, best[:, None]).mean()
    return chosen, iou_loss, best, ious.gather(1, best[:, None])[:, 0], ious


def named_outputs(
    best_m: torch.Tensor, ious_mk: torch.Tensor, min_iou: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mask, output) pairs whose semantic embedding learns the mask's name: the chosen
    (lowest-loss) output of each mask, and any other output whose IoU with the target is at least
    ``min_iou`` (> 1: the chosen one only).

    Automatic mode keeps each of the three outputs of a point as a mask of its own, and the one
    that survives NMS for an object is often not the output training chose; an output that covers
    the object that well is the object, and should carry its name. Outputs that do not (a part, a
    larger whole) are left alone: their name may be another.

    Returns:
        row indices ``[P]`` into the M masks and output indices ``[P]``.
    """
    keep = ious_mk >= min_iou
    keep[torch.arange(len(best_m), device=best_m.device), best_m] = True
    rows, outs = keep.nonzero(as_tuple=True)
    return rows, outs


def semantic_losses(
    sem_md: torch.Tensor,
    score_m: torch.Tensor,
    labels: list[str],
    text_ld: torch.Tensor,
    label_index: dict[str, int],
    scale: torch.Tensor,
    crop_emb_md: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive loss, score loss and label accuracy for M labelled masks.

    Args:
        sem_md: unit semantic embeddings of the chosen outputs. score_m: their predicted cosines.
        labels: the M label strings. text_ld: unit text embeddings of the distinct class names
            (every label among them).
        label_index: label -> row of ``text_ld``. scale: the (learned) temperature, exp(logit_scale).
        crop_emb_md: CLIP crop embeddings (rows of KEY.emb.npy); NaN rows or None: no score target.
    """
    target = torch.tensor([label_index[lab] for lab in labels], device=sem_md.device)
    logits = scale * sem_md @ text_ld.T
    contrastive = F.cross_entropy(logits, target)
    accuracy = (logits.argmax(1) == target).float().mean()
    have = torch.isfinite(crop_emb_md).all(1) if crop_emb_md is not None else None
    if have is None or not bool(have.any()):
        return contrastive, torch.zeros((), device=sem_md.device), accuracy
    cos = (F.normalize(crop_emb_md[have], dim=-1) * text_ld[target[have]]).sum(-1)
    return contrastive, F.mse_loss(score_m[have], cos), accuracy
