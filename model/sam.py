"""SAM builders: a registry of sizes, assembled from segment-anything's own modules.

``vit_h | vit_l | vit_b`` are the official architectures (their checkpoints load as-is);
``smoke`` is a tiny seeded random SAM (2-layer, 64-wide encoder at 256 px) that exercises every
code path on a CPU in seconds. Its output is meaningless and marked ``smoke`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ssam.weights import WeightsUnavailable, fetch

_OFFICIAL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamSize:
    """One SAM architecture."""

    encoder_embed_dim: int  # ViT width
    encoder_depth: int  # ViT blocks
    encoder_num_heads: int
    global_attn_indexes: tuple[int, ...]  # blocks with global (not windowed) attention
    img_size: int = 1024  # input side after ResizeLongestSide + padding
    patch_size: int = 16
    prompt_dim: int = 256  # image-embedding channels = prompt/transformer width
    window_size: int = 14
    decoder_depth: int = 2  # two-way transformer blocks
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_hidden_dim: int = 256
    mask_in_chans: int = 16
    checkpoint_url: str | None = None  # official weights
    checkpoint_sha256: str | None = None
    smoke: bool = False


SAM_SIZES: dict[str, SamSize] = {}


def register_sam_size(name: str, size: SamSize) -> None:
    """Add a SAM size to the registry; a duplicate name is an error."""
    if name in SAM_SIZES:
        raise ValueError(f"SAM size '{name}' is already registered")
    SAM_SIZES[name] = size


register_sam_size(
    "vit_h",
    SamSize(
        1280,
        32,
        16,
        (7, 15, 23, 31),
        checkpoint_url=_OFFICIAL + "sam_vit_h_4b8939.pth",
        checkpoint_sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
)
register_sam_size(
    "vit_l",
    SamSize(
        1024,
        24,
        16,
        (5, 11, 17, 23),
        checkpoint_url=_OFFICIAL + "sam_vit_l_0b3195.pth",
        checkpoint_sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
)
register_sam_size(
    "vit_b",
    SamSize(
        768,
        12,
        12,
        (2, 5, 8, 11),
        checkpoint_url=_OFFICIAL + "sam_vit_b_01ec64.pth",
        checkpoint_sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
)
register_sam_size(
    "smoke",
    SamSize(
        64,
        2,
        2,
        (1,),
        img_size=256,
        prompt_dim=32,
        window_size=4,
        decoder_mlp_dim=64,
        decoder_heads=2,
        iou_hidden_dim=32,
        mask_in_chans=4,
        smoke=True,
    ),
)


def list_sam_sizes() -> list[str]:
    return sorted(SAM_SIZES)


def get_sam_size(name: str) -> SamSize:
    if name not in SAM_SIZES:
        raise KeyError(f"unknown SAM size '{name}'; registered: {list_sam_sizes()}")
    return SAM_SIZES[name]


def build_sam_modules(size: SamSize) -> tuple[ImageEncoderViT, PromptEncoder, TwoWayTransformer]:
    """The image encoder, prompt encoder and two-way transformer of one size (random init)."""
    grid = size.img_size // size.patch_size
    encoder = ImageEncoderViT(
        depth=size.encoder_depth,
        embed_dim=size.encoder_embed_dim,
        img_size=size.img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=size.encoder_num_heads,
        patch_size=size.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=size.global_attn_indexes,
        window_size=size.window_size,
        out_chans=size.prompt_dim,
    )
    prompt = PromptEncoder(
        embed_dim=size.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(size.img_size, size.img_size),
        mask_in_chans=size.mask_in_chans,
    )
    transformer = TwoWayTransformer(
        depth=size.decoder_depth,
        embedding_dim=size.prompt_dim,
        mlp_dim=size.decoder_mlp_dim,
        num_heads=size.decoder_heads,
    )
    return encoder, prompt, transformer


def build_sam(name: str, seed: int = 0) -> Sam:
    """A SAM of a registered size with seeded random weights (load a checkpoint on top)."""
    size = get_sam_size(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder, prompt, transformer = build_sam_modules(size)
        decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=transformer,
            transformer_dim=size.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=size.iou_hidden_dim,
        )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=prompt,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def resolve_sam_checkpoint(name: str, checkpoint: str | None) -> str | None:
    """The local checkpoint path for a size: the given path/URL, else the official URL (fetched once).

    Returns None for the smoke size without a checkpoint (seeded random weights).

    Raises:
        WeightsUnavailable: the file is missing and could not be fetched.
    """
    size = get_sam_size(name)
    if checkpoint is None:
        if size.smoke:
            return None
        if size.checkpoint_url is None:
            raise WeightsUnavailable(f"SAM '{name}' has no official checkpoint; set masks.sam_checkpoint")
        return str(fetch(size.checkpoint_url, size.checkpoint_sha256))
    sha = size.checkpoint_sha256 if checkpoint == size.checkpoint_url else None
    return str(fetch(checkpoint, sha))


def load_sam(name: str, checkpoint: str | None, seed: int = 0) -> tuple[Sam, dict]:
    """Build a SAM and load its weights (``weights_only=True``); return it with its provenance."""
    path = resolve_sam_checkpoint(name, checkpoint)
    sam = build_sam(name, seed=seed)
    provenance = {
        "name": name,
        "checkpoint": path,
        "checkpoint_sha256": None,
        "smoke": get_sam_size(name).smoke,
    }
    if path is not None:
        from ssam.weights import WeightsUnavailable, load_weights_file, sha256_file

        state = load_weights_file(path, f"SAM {name} checkpoint")
        try:
            sam.load_state_dict(state)
        except RuntimeError as e:  # another architecture's weights: keys or shapes do not fit
            raise WeightsUnavailable(
                f"SAM {name} checkpoint {path} does not fit {name}: {str(e)[:300]}"
            ) from e
        provenance["checkpoint_sha256"] = sha256_file(path)
    else:
        provenance["seed"] = seed
    return sam, provenance
