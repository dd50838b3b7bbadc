"""Semantic-SAM: SAM plus semantic tokens whose output lives in CLIP's text-embedding space.

The image encoder, prompt encoder and two-way transformer are segment-anything's own. The mask
decoder is SAM's (same parameter names, so an official ``sam_vit_*.pth`` fills it) with two
additions in its token sequence::

    [iou token | 4 mask tokens | 4 semantic tokens | score token | prompt tokens]

Semantic token ``i``, plus an embedding of mask ``i``'s outline (:class:`MaskShape`), goes through
an MLP head into the CLIP text-embedding space (L2-normalised): the name of mask ``i``. The score
token predicts the cosine between that mask's CLIP crop embedding and its label's text embedding:
how nameable the mask is. A learned temperature
(``logit_scale``, CLIP-style, at most 100) scales cosine logits for the contrastive loss and
prediction; the softmax over a vocabulary at that temperature is the label's probability.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.utils.amg import batched_mask_to_box
from torch import nn
from torchvision.ops import roi_align

from ssam.io import atomic_path
from ssam.weights import load_weights_file

from .calibration import IouCalibration
from .sam import build_sam_modules, get_sam_size
from .two_way import image_tokens, two_way_forward, upscaled_mask_logits

CHECKPOINT_FORMAT = "ssam-semantic-sam"
LOGIT_SCALE_MAX = math.log(100.0)  # the temperature exp(logit_scale) stays at most 100, as in CLIP
CHECKPOINT_VERSION = 1


class MaskShape(nn.Module):
    """What each predicted mask looks like, as an input to the semantic head.

    Each low-res mask is cut to its own box (logit > 0; the whole frame if it has none), its
    probabilities resampled there to ``side x side`` (``roi_align``) and passed through a small MLP
    into the decoder's token width. Scale- and position-free, this is the outline the semantic
    token would otherwise have to recover from the image tokens alone (written here: no library
    has it). The masks are detached: naming does not pull on the masks. The last layer starts at
    zero, so an untrained ``MaskShape`` adds nothing (and a checkpoint from before it loads as it
    was, see :func:`load_model`).
    """

    def __init__(self, dim: int, side: int = 16):
        super().__init__()
        self.side = side
        self.mlp = nn.Sequential(nn.Linear(side * side, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """``P x K x H x W`` mask logits -> ``P x K x dim``."""
        p, k, h, w = masks.shape
        m = masks.detach().float().reshape(p * k, 1, h, w)
        on = m[:, 0] > 0
        exclusive_end = m.new_tensor([0.0, 0.0, 1.0, 1.0])  # batched_mask_to_box's x1, y1 are inclusive
        box = batched_mask_to_box(on).float() + exclusive_end
        empty = ~on.flatten(1).any(1)
        box = torch.where(empty[:, None], box.new_tensor([0.0, 0.0, w, h]), box)
        idx = torch.arange(p * k, device=m.device, dtype=box.dtype)[:, None]
        crop = roi_align(torch.sigmoid(m), torch.cat([idx, box], 1), (self.side, self.side), 1.0, 2, True)
        return self.mlp(crop.flatten(1).to(self.mlp[0].weight.dtype)).view(p, k, -1)


class SemanticMaskDecoder(MaskDecoder):
    """SAM's mask decoder plus semantic tokens, a score token and their heads."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        clip_dim: int,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        semantic_head_depth: int = 3,
    ):
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=transformer,
            num_multimask_outputs=num_multimask_outputs,
            iou_head_depth=iou_head_depth,
            iou_head_hidden_dim=iou_head_hidden_dim,
        )
        self.semantic_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.score_token = nn.Embedding(1, transformer_dim)
        self.semantic_head = MLP(transformer_dim, transformer_dim, clip_dim, semantic_head_depth)
        self.score_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        self.mask_shape = MaskShape(transformer_dim)

    def predict_all(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """All four outputs for P prompts.

        Args:
            image_embeddings: ``PxCxhxw`` (one row per prompt) or ``1xCxhxw`` (shared).
            image_pe: ``1xCxhxw``; sparse: ``PxNxC``; dense: ``PxCxhxw`` or ``1xCxhxw``.

        Returns:
            masks ``Px4xHxW`` (low-res logits), iou ``Px4``, semantic ``Px4xD`` (unit norm),
            score ``Px4`` (predicted cosine).
        """
        hs, src = self.run_transformer(image_embeddings, image_pe, sparse, dense)
        masks, semantic = self.masks_and_semantic(hs, src, image_embeddings.shape[-2:])
        iou, score = self.scores(hs)
        return masks, iou, semantic, score

    def run_transformer(self, image_embeddings, image_pe, sparse, dense) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer over P prompts (arguments as :meth:`predict_all`): the output
        tokens ``P x N x C`` and image tokens ``P x hw x C`` that the heads read."""
        out_tokens = torch.cat(
            [
                self.iou_token.weight,
                self.mask_tokens.weight,
                self.semantic_tokens.weight,
                self.score_token.weight,
            ],
            dim=0,
        )
        tokens = torch.cat((out_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        return two_way_forward(self.transformer, image_tokens(image_embeddings, dense), image_pe, tokens)

    def scores(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted IoU and predicted cosine ``P x 4`` each, from the output tokens alone."""
        k = self.num_mask_tokens
        return self.iou_prediction_head(hs[:, 0]), self.score_head(hs[:, 1 + 2 * k])

    def masks_and_semantic(self, hs, src, hw) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits ``P x 4 x 4h x 4w`` and unit semantic embeddings ``P x 4 x D`` of
        the transformer's outputs (``hw``: the image embedding's ``(h, w)``). The engine runs this
        only for prompts whose predicted IoU lets a mask through (model/amg.py)."""
        k = self.num_mask_tokens
        mask_out, sem_out = hs[:, 1 : 1 + k], hs[:, 1 + k : 1 + 2 * k]
        hyper = torch.stack([self.output_hypernetworks_mlps[i](mask_out[:, i]) for i in range(k)], dim=1)
        masks = upscaled_mask_logits(self.output_upscaling, hyper, src, tuple(hw))
        return masks, F.normalize(self.semantic_head(sem_out + self.mask_shape(masks)), dim=-1)


@dataclass(frozen=True)
class SemanticSamConfig:
    """What a checkpoint needs to rebuild the model."""

    sam_size: str  # a registered SAM size: vit_h, vit_l, vit_b, smoke
    clip_dim: int  # CLIP text-embedding width of the label space


class SemanticSam(Sam):
    """segment-anything's ``Sam`` with a :class:`SemanticMaskDecoder` and a learned temperature."""

    def __init__(
        self, config: SemanticSamConfig, image_encoder, prompt_encoder, mask_decoder: SemanticMaskDecoder
    ):
        super().__init__(
            image_encoder=image_encoder,
            prompt_encoder=prompt_encoder,
            mask_decoder=mask_decoder,
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
        self.config = config
        # CLIP's trained temperature (100), not its from-scratch start (1/0.07 = 14): the text side
        # is a trained CLIP whose names lie close together (cosine 0.8-0.99), and at 14 the logits
        # of two names can differ by only a few units, so no label could be learnt with confidence.
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_MAX))
        # the map ssam-train fitted from the IoU head's output to the IoU automatic-mode masks have
        # (model/calibration.py); None: the raw head. Applied by the mask engine and the predictor.
        self.iou_calibration = None

    def embed_images(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Normalised, padded ``Bx3xSxS`` images -> image-encoder features ``BxCxhxw``."""
        return self.image_encoder(images_bchw)

    def decode(
        self,
        features_1chw: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Outputs for P prompts on one image (points ``PxNx2`` + labels ``PxN``, or boxes ``Px4`` XYXY,
        in the padded input frame). Returns :meth:`SemanticMaskDecoder.predict_all`'s four tensors."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        return self.mask_decoder.predict_all(features_1chw, self.prompt_encoder.get_dense_pe(), sparse, dense)

    def forward(
        self, images_bchw: torch.Tensor, prompts: list[tuple[torch.Tensor | None, torch.Tensor | None]]
    ):
        """Training/inference entry (what DDP wraps): features once per image, then its prompts.

        Args:
            images_bchw: preprocessed images.
            prompts: per image ``(boxes Px4 XYXY or None, points Qx2 or None)`` in the input frame.

        Returns:
            Per image, the four outputs of :meth:`SemanticMaskDecoder.predict_all` for its boxes
            followed by its points (``P + Q`` rows); and the temperature ``exp(logit_scale)``
            (the trainer keeps it at most 100 by clamping the parameter, as CLIP does), returned
            so that its use in the loss is part of this forward (DDP tracks parameters through
            forward outputs).
        """
        if any(p.requires_grad for p in self.image_encoder.parameters()):
            feats = self.image_encoder(images_bchw)
        else:
            with torch.no_grad():
                feats = self.image_encoder(images_bchw)
        # Every prompt of the batch in one prompt-encoder call per kind and one decoder call: a box
        # and a lone point (padded by segment-anything) are both two sparse tokens, so they stack.
        # Per-image calls cost ~16 small decoder passes a step, dominated by per-op overhead. Rows
        # are grouped by image (its boxes, then its points) and each image's features broadcast
        # to its rows: only slices, concatenations and expands, whose gradients are deterministic
        # sums (an index gather's accumulating backward need not be).
        dev = feats.device
        boxes = [b if b is not None else torch.zeros(0, 4, device=dev) for b, _ in prompts]
        points = [p if p is not None else torch.zeros(0, 2, device=dev) for _, p in prompts]
        n_box, n_pt = [len(b) for b in boxes], [len(p) for p in points]
        box_sparse = pt_sparse = None
        if sum(n_box):
            box_sparse = self.prompt_encoder(points=None, boxes=torch.cat(boxes), masks=None)[0]
        if sum(n_pt):
            xy = torch.cat(points)[:, None, :]
            labels = torch.ones(len(xy), 1, dtype=torch.int, device=xy.device)
            pt_sparse = self.prompt_encoder(points=(xy, labels), boxes=None, masks=None)[0]
        box_parts = box_sparse.split(n_box) if box_sparse is not None else ()
        pt_parts = pt_sparse.split(n_pt) if pt_sparse is not None else ()
        sparse, image_rows = [], []
        for b in range(len(prompts)):
            if n_box[b]:
                sparse.append(box_parts[b])
            if n_pt[b]:
                sparse.append(pt_parts[b])
            if n_box[b] + n_pt[b]:
                image_rows.append(feats[b : b + 1].expand(n_box[b] + n_pt[b], -1, -1, -1))
        sparse = torch.cat(sparse)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            len(sparse), -1, *feats.shape[-2:]
        )
        outs = self.mask_decoder.predict_all(
            torch.cat(image_rows), self.prompt_encoder.get_dense_pe(), sparse, dense
        )
        sizes = [a + b for a, b in zip(n_box, n_pt, strict=True)]
        results = list(zip(*(t.split(sizes) for t in outs), strict=True))
        return results, self.logit_scale.exp()

    @staticmethod
    def new_parameter_names(model: SemanticSam) -> set[str]:
        """Parameters that SAM does not have (what a SAM checkpoint leaves missing)."""
        return {
            n
            for n, _ in model.named_parameters()
            if n == "logit_scale"
            or n.split(".")[1]
            in ("semantic_tokens", "score_token", "semantic_head", "score_head", "mask_shape")
        }


def build_semantic_sam(sam_size: str, clip_dim: int, seed: int = 0) -> SemanticSam:
    """A Semantic-SAM of a registered SAM size with seeded random weights."""
    size = get_sam_size(sam_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder, prompt, transformer = build_sam_modules(size)
        decoder = SemanticMaskDecoder(
            transformer_dim=size.prompt_dim,
            transformer=transformer,
            clip_dim=clip_dim,
            iou_head_hidden_dim=size.iou_hidden_dim,
        )
        return SemanticSam(SemanticSamConfig(sam_size, clip_dim), encoder, prompt, decoder)


class CheckpointError(ValueError):
    """A checkpoint is of the wrong kind or size; the message names the file and the keys."""


def load_sam_weights(model: SemanticSam, state: dict[str, torch.Tensor], source: str) -> set[str]:
    """Load an official SAM state dict; return the missing keys, which must be exactly the new ones.

    Raises:
        CheckpointError: unexpected keys, other missing keys, or shape mismatches, by name.
    """
    own = model.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if mismatched:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:5])
        raise CheckpointError(
            f"{source}: shapes do not match this model ({model.config.sam_size}): {details}"
        )
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
    expected_missing = SemanticSam.new_parameter_names(model)
    if unexpected or missing != expected_missing:
        raise CheckpointError(
            f"{source}: not a SAM {model.config.sam_size} checkpoint; unexpected keys "
            f"{sorted(unexpected)[:8]}, missing SAM keys {sorted(missing - expected_missing)[:8]}"
        )
    return missing


def save_model(path, model: SemanticSam, clip_info: dict, extra: dict | None = None) -> None:
    """Write ``{format, version, model_config, clip, state_dict, ...}`` atomically (temp + rename)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": asdict(model.config),
        "clip": dict(clip_info),
        "state_dict": model.state_dict(),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path) -> dict:
    """Load one of our checkpoints with ``weights_only=True``; refuse anything else by name."""
    payload = load_weights_file(path, error=CheckpointError, kind="checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        kind = (
            "a SAM state dict (use it as model.sam_checkpoint to initialise training)"
            if isinstance(payload, dict) and any(k.startswith("image_encoder.") for k in payload)
            else "not a Semantic-SAM checkpoint"
        )
        raise CheckpointError(f"{path}: {kind}")
    return payload


def load_model(path, device: str = "cpu") -> tuple[SemanticSam, dict]:
    """Rebuild a Semantic-SAM from one of our checkpoints; return it and the checkpoint payload."""
    payload = read_checkpoint(path)
    cfg = payload["model_config"]
    model = build_semantic_sam(cfg["sam_size"], cfg["clip_dim"])
    state = payload["state_dict"]
    if not any(k.startswith("mask_decoder.mask_shape.") for k in state):
        # written before MaskShape existed: keep its zero-initialised (adds nothing) weights
        state = {
            **{k: v for k, v in model.state_dict().items() if k.startswith("mask_decoder.mask_shape.")},
            **state,
        }
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit a {cfg['sam_size']} model: {str(e)[:300]}") from e
    try:  # checkpoints from before the calibration, or trained with it off, have none
        model.iou_calibration = IouCalibration.from_dict(payload.get("iou_calibration"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.to(device).eval(), payload
