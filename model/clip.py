"""CLIP through open_clip: any ``model_name`` + ``pretrained`` tag or local file, plus a smoke model.

The smoke model ``ssam-smoke-clip`` is an open_clip model config (2-layer towers, 32-d embeddings,
open_clip's bundled BPE tokenizer) registered with ``open_clip.add_model_config``; with no
``pretrained`` it gets seeded random weights. Real models require their weights
(``require_pretrained=True``): a missing download is an error, never random weights.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from ssam.device import bf16_autocast
from ssam.weights import WeightsUnavailable, cache_dir, offline, offline_reason

SMOKE_CLIP = "ssam-smoke-clip"
open_clip.add_model_config(Path(__file__).parent / "smoke" / f"{SMOKE_CLIP}.json")

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
)


@dataclass
class ClipBundle:
    """A loaded CLIP: model, its eval preprocessing, tokenizer and where it came from."""

    model: Any
    preprocess: Any  # PIL.Image -> (3, S, S) tensor
    tokenizer: Any
    embed_dim: int
    image_size: int
    provenance: dict = field(default_factory=dict)


def resolve_clip_weights(model_name: str, pretrained: str | None) -> str | None:
    """Make sure a CLIP's weights are on disk (fetching a pretrained tag once into the cache).

    Returns the local file for a file or tag, None for the smoke model without weights.

    Raises:
        WeightsUnavailable: unknown tag, missing file, or not cached and not fetchable.
        KeyError: unknown model name.
    """
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise KeyError(f"unknown open_clip model '{model_name}'")
    if pretrained is None:
        if model_name == SMOKE_CLIP:
            return None
        raise WeightsUnavailable(f"CLIP '{model_name}' needs labels.clip_pretrained (a tag or a file)")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    pcfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not pcfg:
        raise WeightsUnavailable(
            f"CLIP weights '{pretrained}' are neither a file nor a pretrained tag of {model_name} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
        )
    if offline():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return open_clip.download_pretrained(pcfg, cache_dir=str(cache_dir() / "open_clip"))
    except Exception as e:  # noqa: BLE001 -- hub and network errors come in many types; all mean "not here"
        hint = f" ({offline_reason()})" if offline() else ""
        raise WeightsUnavailable(
            f"CLIP {model_name}/{pretrained}: {str(e).splitlines()[0][:200]}{hint}"
        ) from e


class _NotLoadedOnPurpose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def load_clip(model_name: str, pretrained: str | None, seed: int = 0, device: str = "cpu") -> ClipBundle:
    """Create an open_clip model with its weights.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``) or ``ssam-smoke-clip``.
        pretrained: an open_clip pretrained tag, a local checkpoint file, or None (smoke only).
        seed: seed for the smoke model's random weights.

    Raises:
        WeightsUnavailable: the weights are neither cached nor fetchable (checked before the
            model is built).
        KeyError: unknown model name.
    """
    smoke = model_name == SMOKE_CLIP
    resolve_clip_weights(model_name, pretrained)
    quiet = _NotLoadedOnPurpose() if smoke and pretrained is None else None
    if quiet:  # open_clip warns (root logger) that no weights were loaded: the smoke model's are seeded
        logging.getLogger().addFilter(quiet)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=pretrained,
                device=device,
                cache_dir=str(cache_dir() / "open_clip"),
                require_pretrained=not smoke,
            )
        # a corrupt or mismatched checkpoint (torch raises an unpickling error for a corrupt one)
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
            raise WeightsUnavailable(f"CLIP {model_name}/{pretrained}: {e}") from e
        finally:
            if quiet:
                logging.getLogger().removeFilter(quiet)
    model.eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():  # the embedding width, whatever the tower's projection is
        embed_dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    provenance = {"name": model_name, "pretrained": pretrained, "embed_dim": embed_dim, "smoke": smoke}
    if smoke and pretrained is None:
        provenance["seed"] = seed
    return ClipBundle(model, preprocess, tokenizer, embed_dim, int(size), provenance)


@torch.no_grad()
def encode_texts(bundle: ClipBundle, labels: list[str], templates=DEFAULT_TEMPLATES) -> np.ndarray:
    """Prompt-ensembled, L2-normalised text embeddings, float32 ``[len(labels), D]``.

    Each label is put in every template, embedded, normalised, averaged, and normalised again
    (the ensembling of the CLIP paper).
    """
    if not labels:
        return np.zeros((0, bundle.embed_dim), np.float32)
    device = next(bundle.model.parameters()).device
    texts = [t.format(label) for label in labels for t in templates]
    emb = bundle.model.encode_text(bundle.tokenizer(texts).to(device)).float()
    emb = torch.nn.functional.normalize(emb, dim=-1).view(len(labels), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


@torch.no_grad()
def encode_images(
    bundle: ClipBundle, pixels_bchw: torch.Tensor, bf16: bool = False, encode=None
) -> np.ndarray:
    """L2-normalised image embeddings, float32 ``[B, D]``, of preprocessed images ``BxCxHxW``.

    ``bf16``: run the image tower under bfloat16 autocast (as ``ssam.device.use_bf16`` decided).
    ``encode``: what runs it (default ``bundle.model.encode_image``; e.g. a compiled one).
    """
    param = next(bundle.model.parameters())
    # under autocast the pixels stay float32 (autocast casts per op); otherwise the model's own dtype
    pixels = pixels_bchw.to(param.device, dtype=torch.float32 if bf16 else param.dtype)
    with bf16_autocast(param.device, bf16):
        emb = (bundle.model.encode_image if encode is None else encode)(pixels).float()
    return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
