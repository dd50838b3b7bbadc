"""Pipeline configuration: YAML -> typed, validated objects.

Every key has a type, a default and a description; the README's config reference is generated
from these models (``ssam-pipeline config-reference``). A wrong key, type or value stops the run
before any work with :class:`ConfigError`, naming the file, the key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ssam.configio import config_rows, load_validated


class ConfigError(ValueError):
    """The configuration (file or --set) is wrong; the message names where and how."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputColumns(Section):
    url: str = Field("URL", description="column holding the image URL")
    caption: str = Field("TEXT", description="column holding the caption")
    width: str | None = Field(
        "WIDTH", description="column with the image width (metadata filter); null if absent"
    )
    height: str | None = Field("HEIGHT", description="column with the image height; null if absent")
    nsfw: str | None = Field("NSFW", description="column with LAION's NSFW tag; null if absent")
    similarity: str | None = Field(
        "similarity", description="column with the CLIP image-text similarity; null if absent"
    )
    language: str | None = Field(
        None, description="column with the caption language (LAION2B-multi: LANGUAGE)"
    )


class InputConfig(Section):
    path: list[str] = Field(..., description="parquet file(s), directory or glob of LAION-style pairs")
    columns: InputColumns = Field(
        default_factory=InputColumns, description="column names in the parquet (LAION's by default)"
    )
    limit: int | None = Field(None, ge=1, description="process at most this many input rows (in file order)")

    @model_validator(mode="before")
    @classmethod
    def _one_path(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("path"), str):
            v = dict(v, path=[v["path"]])
        return v


class OutputConfig(Section):
    dir: str = Field(..., description="run directory: shards/, downloads/, manifest.json")
    samples_per_shard: int = Field(
        1000, ge=1, le=1_000_000, description="input rows per shard (download and output)"
    )


class FilterConfig(Section):
    min_image_side: int = Field(
        0, ge=0, description="drop rows whose metadata width or height is below this (0: off)"
    )
    drop_nsfw: bool = Field(True, description="drop rows whose NSFW column is one of nsfw_tags")
    nsfw_tags: list[str] = Field(["NSFW", "UNSURE"], description="NSFW column values that drop a row")
    min_similarity: float | None = Field(None, description="drop rows with similarity below this (null: off)")
    languages: list[str] = Field(
        [], description="keep only these languages (needs columns.language; empty: all)"
    )
    max_caption_chars: int = Field(
        512, ge=16, le=100_000, description="captions are cleaned and cut to this length"
    )
    require_caption: bool = Field(False, description="drop rows whose cleaned caption is empty")


class DownloadConfig(Section):
    image_size: int = Field(
        1024, ge=64, le=8192, description="longest side of the stored image (SAM's input side)"
    )
    processes_count: int = Field(1, ge=1, description="img2dataset processes")
    thread_count: int = Field(16, ge=1, description="img2dataset threads per process")
    timeout_s: int = Field(10, ge=1, description="per-request timeout in seconds")
    retries: int = Field(1, ge=0, description="retries per URL")
    distributor: Literal["multiprocessing", "ray"] = Field(
        "multiprocessing", description="img2dataset distributor (ray on a cluster)"
    )
    allow_private_hosts: bool = Field(
        False, description="allow URLs on loopback, private and link-local addresses"
    )
    allow_file_urls: bool = Field(
        False, description="allow file:// URLs (relative ones resolve against the parquet's folder)"
    )
    resolve_hosts: bool = Field(
        True, description="resolve host names to refuse those that point at private addresses"
    )
    max_pixels: int = Field(
        64_000_000, ge=1, description="refuse images whose header declares more pixels (decompression bombs)"
    )
    min_image_side: int = Field(32, ge=1, description="fail decoded images whose shorter side is below this")
    jpeg_quality: int = Field(92, ge=50, le=100, description="quality of the stored JPEG")
    user_agent_token: str | None = Field(
        "ssam-factory", description="token added to img2dataset's user agent"
    )
    disallowed_header_directives: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that make a site opt out",
    )


class CandidatesConfig(Section):
    backend: Literal["vllm", "transformers", "none"] = Field(
        "transformers", description="LLM backend for caption expansion"
    )
    llm_model: str = Field(
        "Qwen/Qwen2.5-0.5B-Instruct", description="HF model id, local directory, or 'smoke'"
    )
    device: str = Field("auto", description="transformers backend device: auto, cpu, cuda")
    vocabulary: str | list[str] = Field(
        "lvis",
        description="caption nouns are matched against this: lvis, coco, objects365, ade20k, a file, or a list",
    )
    max_candidates: int = Field(
        24, ge=1, le=512, description="candidates kept per image (caption matches first)"
    )
    max_words: int = Field(4, ge=1, le=8, description="longest candidate phrase, in words")
    llm_vocabulary_only: bool = Field(
        False, description="keep only LLM phrases that contain a vocabulary name"
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="LLM tokens generated per prompt")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="LLM sampling temperature (0: greedy)")
    llm_batch_size: int = Field(32, ge=1, description="prompts per generate call")
    prompt_templates: list[str] = Field([], description="override the prompt templates; each needs {caption}")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model replica")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: fraction of GPU memory to use")

    @model_validator(mode="after")
    def _templates_have_caption(self):
        bad = [t for t in self.prompt_templates if "{caption}" not in t]
        if bad:
            raise ValueError(f"prompt template without {{caption}}: {bad[0]!r}")
        return self


class MasksConfig(Section):
    sam_model: str = Field("vit_h", description="SAM size: vit_h, vit_l, vit_b, smoke")
    sam_checkpoint: str | None = Field(
        None, description="checkpoint path or URL (null: the official one, fetched once)"
    )
    device: str = Field("auto", description="auto, cpu, cuda")
    bf16: bool = Field(True, description="bf16 autocast on CUDA")
    points_per_side: int = Field(32, ge=1, le=128, description="SAM point grid per side")
    points_per_batch: int = Field(64, ge=1, description="points decoded at once")
    pred_iou_thresh: float = Field(0.88, ge=0, le=1, description="minimum predicted IoU")
    stability_score_thresh: float = Field(0.95, ge=0, le=1, description="minimum stability score")
    stability_score_offset: float = Field(1.0, description="logit offset for the stability score")
    box_nms_thresh: float = Field(0.7, ge=0, le=1, description="box IoU for NMS between masks")
    crop_n_layers: int = Field(0, ge=0, le=3, description="extra crop layers")
    crop_nms_thresh: float = Field(0.7, ge=0, le=1, description="box IoU for NMS between crops")
    crop_overlap_ratio: float = Field(512 / 1500, ge=0, lt=1, description="overlap of crops")
    crop_n_points_downscale_factor: int = Field(1, ge=1, description="point-grid downscale per crop layer")
    min_mask_region_area: int = Field(
        0, ge=0, description="remove islands and holes smaller than this (pixels)"
    )
    max_masks_per_image: int = Field(
        256, ge=1, description="keep this many masks, highest predicted IoU first"
    )
    encoder_batch_size: int = Field(4, ge=1, description="images per image-encoder forward")
    torch_threads: int = Field(0, ge=0, description="torch CPU threads per actor (0: torch default)")

    @model_validator(mode="after")
    def _known_size(self):
        from ssam.model.sam import SAM_SIZES

        if self.sam_model not in SAM_SIZES:
            raise ValueError(f"unknown SAM size {self.sam_model!r}; expected one of {sorted(SAM_SIZES)}")
        return self


class LabelsConfig(Section):
    clip_model: str = Field("ViT-L-14", description="open_clip model name, or ssam-smoke-clip")
    clip_pretrained: str | None = Field(
        "datacomp_xl_s13b_b90k", description="open_clip pretrained tag or local file"
    )
    device: str = Field("auto", description="auto, cpu, cuda")
    background: Literal["dim", "blur", "none"] = Field(
        "dim", description="what happens to pixels outside the mask in the crop"
    )
    background_dim: float = Field(0.3, ge=0, le=1, description="'dim': outside pixels are multiplied by this")
    blur_radius: float = Field(8.0, ge=0, description="'blur': Gaussian radius in pixels")
    crop_padding: float = Field(0.1, ge=0, le=2, description="box padding, as a fraction of its size")
    prompt_templates: list[str] = Field(
        [], description="prompt ensemble; each needs {} (empty: built-in five)"
    )
    background_labels: list[str] = Field(
        ["background", "texture", "blurry photo"], description="labels that mean 'no object'"
    )
    logit_scale: float = Field(100.0, gt=0, description="softmax temperature applied to cosine similarities")
    score_threshold: float = Field(0.3, ge=0, le=1, description="label is null below this softmax score")
    margin_threshold: float = Field(
        0.05, ge=0, le=1, description="label is null when the runner-up is this close"
    )
    top_k: int = Field(3, ge=1, le=50, description="candidates kept in each annotation's topk")
    clip_batch_size: int = Field(64, ge=1, description="crops per CLIP forward")
    keep_embeddings: bool = Field(True, description="write KEY.emb.npy with the crop embeddings")


class StageResources(Section):
    num_cpus: float = Field(1, ge=0, description="CPUs per worker")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker (fractions share a GPU)")
    min_workers: int = Field(1, ge=1, description="actor pool minimum size")
    max_workers: int = Field(1, ge=1, description="actor pool maximum size")
    batch_size: int = Field(8, ge=1, description="rows per batch")
    resources: dict[str, float] = Field(
        {},
        description="custom Ray resources per worker, e.g. {big_gpu: 1} to pin a stage to nodes that have them",
    )


class RayConfig(Section):
    executor: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Data graph; local: plain loop, same stages"
    )
    address: str | None = Field(
        None, description="Ray address (null: in-process, or the cluster under ray job submit)"
    )
    preserve_order: bool = Field(
        True, description="keep row order so shards complete in turn (bounds memory)"
    )
    decode: StageResources = Field(default_factory=lambda: StageResources(max_workers=2, batch_size=16))
    candidates: StageResources = Field(default_factory=StageResources)
    masks: StageResources = Field(default_factory=StageResources)
    labels: StageResources = Field(default_factory=StageResources)

    @model_validator(mode="after")
    def _pools(self):
        for name in ("decode", "candidates", "masks", "labels"):
            r = getattr(self, name)
            if r.min_workers > r.max_workers:
                raise ValueError(f"{name}: min_workers {r.min_workers} > max_workers {r.max_workers}")
        return self


class PipelineConfig(Section):
    input: InputConfig
    output: OutputConfig
    filter: FilterConfig = Field(default_factory=FilterConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    seed: int = Field(0, description="seed for smoke weights and LLM sampling")

    @property
    def smoke(self) -> bool:
        """True when any model is a random smoke model: the output is then meaningless."""
        return (
            self.masks.sam_model == "smoke"
            or self.labels.clip_model == "ssam-smoke-clip"
            or (self.candidates.backend != "none" and self.candidates.llm_model == "smoke")
        )


# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML file, apply ``key=value`` overrides, validate.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key, wrong type or value -- the message
            names the file and every bad key.
    """
    return load_validated(PipelineConfig, path, list(overrides), ConfigError)


def config_reference(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Markdown rows for every leaf key of the pipeline config."""
    return config_rows(model, prefix)
