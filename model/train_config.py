"""``ssam-train`` configuration: YAML -> typed, validated objects (same rules as the pipeline's)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ssam.configio import Section, load_validated


class TrainConfigError(ValueError):
    """The training config is wrong; the message names the file and the key."""


class ModelSection(Section):
    size: str = Field("vit_b", description="SAM size: vit_h, vit_l, vit_b, smoke")
    sam_checkpoint: str | None = Field(
        None,
        description="official SAM checkpoint to start from (path/URL; null: official for the size, none for smoke)",
    )
    init_checkpoint: str | None = Field(
        None, description="one of our Semantic-SAM checkpoints to start from instead"
    )
    random_init: bool = Field(
        False, description="start from random weights, no checkpoint (timing, from-scratch runs)"
    )
    clip_model: str = Field("ViT-B-32", description="open_clip model whose text space defines the labels")
    clip_pretrained: str | None = Field(
        "laion2b_s34b_b79k", description="its pretrained tag or file (null: smoke only)"
    )
    seed: int = Field(0, description="seed of random init (smoke) and of the smoke CLIP")

    @model_validator(mode="after")
    def _known_size(self):
        from .sam import SAM_SIZES

        if self.size not in SAM_SIZES:
            raise ValueError(f"unknown SAM size {self.size!r}; expected one of {sorted(SAM_SIZES)}")
        return self


class DataSection(Section):
    shards: list[str] = Field(
        [], description="our shard tars: files, folders (RUN/shards), globs; --shards overrides"
    )
    sa1b: list[str] = Field([], description="SA-1B tars (sa_*.jpg + sa_*.json), mixed in for mask quality")
    calibration_shards: list[str] = Field(
        [],
        description=(
            "tars never trained on (ours or SA-1B) for the predicted-IoU calibration fit; when set,"
            " nothing is held out of data.shards"
        ),
    )
    mix: dict[str, float] = Field(
        {"ours": 4.0, "sa1b": 1.0}, description="sampling weight per source (the seed used 4:1)"
    )
    masks_per_image: int = Field(
        8,
        ge=1,
        le=256,
        description="target masks (prompts) per image per step; an image with fewer masks has some prompted again",
    )
    min_mask_area: int = Field(16, ge=0, description="skip target masks smaller than this (pixels)")
    box_prompt_prob: float = Field(
        0.5, ge=0, le=1, description="chance a target is prompted by a box (else a point)"
    )
    background_points: int = Field(
        2,
        ge=0,
        le=64,
        description="point prompts per image outside every annotated mask; their predicted IoU is trained towards 0",
    )
    box_jitter: float = Field(
        0.1, ge=0, le=1, description="box corners move by up to this fraction of the side"
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="abort when more than this fraction of samples is bad"
    )
    hflip_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="chance a training image is mirrored left-right (its masks, points and boxes too)",
    )
    scale_range: tuple[float, float] = Field(
        (1.0, 1.0),
        description="large-scale jitter: the image's longest side is this fraction of the encoder input, drawn "
        "uniformly per image; smaller sits at a random place on the padded input, larger shows a random "
        "window of it; [1, 1]: no jitter, SAM's own layout (top-left, padded bottom-right)",
    )

    @model_validator(mode="after")
    def _scale_range(self):
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 4:
            raise ValueError(f"data.scale_range: expected 0 < low <= high <= 4, got {list(self.scale_range)}")
        return self

    @model_validator(mode="after")
    def _mix_sources(self):
        bad = set(self.mix) - {"ours", "sa1b"}
        if bad:
            raise ValueError(f"data.mix: unknown sources {sorted(bad)}; expected 'ours' and 'sa1b'")
        return self


class TrainSection(Section):
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="images per step (per worker)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps, then cosine decay to 0")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0: off)")
    freeze: list[str] = Field(
        ["image_encoder"],
        description="top-level modules kept frozen: image_encoder, prompt_encoder, mask_decoder",
    )
    bf16: bool = Field(True, description="bf16 autocast on CUDA")
    cpu_bf16: bool = Field(
        False,
        description="bf16 autocast on a CPU with AVX512-BF16 or AMX (x2.2-2.4 per vit_b step here; else float32)",
    )
    checkpoint_every: int = Field(500, ge=1, description="write checkpoints/last.pt every this many steps")
    log_every: int = Field(10, ge=1, description="log metrics every this many steps")
    focal_weight: float = Field(20.0, ge=0, description="mask focal loss weight (SAM: 20)")
    dice_weight: float = Field(1.0, ge=0, description="mask dice loss weight (SAM: 1)")
    iou_weight: float = Field(1.0, ge=0, description="predicted-IoU MSE weight")
    semantic_weight: float = Field(1.0, ge=0, description="contrastive loss weight (labelled masks)")
    semantic_min_iou: float = Field(
        0.5,
        ge=0,
        description=(
            "besides the trained output, other outputs covering a labelled mask at this IoU"
            " learn its name too (>1: off)"
        ),
    )
    score_weight: float = Field(
        1.0, ge=0, description="cosine-score MSE weight (labelled masks with embeddings)"
    )
    calibration_images: int = Field(
        64,
        ge=0,
        description=(
            "after training, automatic mode on this many images fits the predicted-IoU calibration"
            " written into model.pt (0: none, the raw IoU head); they are held out of training"
            " (calibration_holdout) or read from data.calibration_shards"
        ),
    )
    calibration_holdout: bool = Field(
        True,
        description=(
            "keep the calibration images out of training: the first calibration_images samples of"
            " data.shards (of data.sa1b when ours are not mixed in) in sorted order, when there are"
            " at least 8 times as many (smaller data, or false: fit on training images, on which a"
            " model trained for many epochs over-rates its masks)"
        ),
    )
    device: str = Field("auto", description="auto, cpu, cuda")

    @model_validator(mode="after")
    def _freeze_names(self):
        bad = set(self.freeze) - {"image_encoder", "prompt_encoder", "mask_decoder"}
        if bad:
            raise ValueError(f"train.freeze: unknown modules {sorted(bad)}")
        return self


class PredictSection(Section):
    """Automatic-mode thresholds written into ``model.pt``: ``ssam-predict`` and ``ssam-eval`` use
    them unless their flags say otherwise. SAM's own (0.88, 0.95) suit a model that starts from SAM;
    a small model trained from scratch has softer, less certain masks and needs lower ones."""

    pred_iou_thresh: float = Field(
        0.88,
        description="written into model.pt: automatic mode keeps masks whose predicted IoU is above this",
    )
    stability_score_thresh: float = Field(
        0.95, description="written into model.pt: automatic mode keeps masks whose stability is at least this"
    )


class TrainConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    predict: PredictSection = Field(default_factory=PredictSection)
    seed: int = Field(0, description="seed of sampling, prompts and shuffling")


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML, apply ``key=value`` overrides (values parsed as YAML), validate.

    Raises:
        TrainConfigError: naming the file and every bad key.
    """
    return load_validated(TrainConfig, path, list(overrides), TrainConfigError)
