"""Pipeline configuration: YAML -> typed, validated objects.

Every key has a type, a default and a description; the README's config reference is generated
from these models (``ssam-pipeline config-reference``). A wrong key, type or value stops the run
before any work with :class:`ConfigError`, naming the file, the key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from ssam.configio import Section, config_rows, load_validated
from ssam.stages.candidates import CandidatesConfig
from ssam.stages.decode import DecodeConfig
from ssam.stages.dedup import DedupConfig
from ssam.stages.download import DownloadConfig
from ssam.stages.filter import FilterConfig
from ssam.stages.labels import LabelsConfig
from ssam.stages.masks import MasksConfig


class ConfigError(ValueError):
    """The configuration (file or --set) is wrong; the message names where and how."""


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
    path: list[str] = Field(
        ..., description="parquet file(s), directory or glob of LAION-style pairs; local or s3:// / gs://"
    )
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
    dir: str = Field(
        ..., description="run directory: shards/, downloads/, manifest.json; local or s3:// / gs://"
    )
    samples_per_shard: int = Field(
        1000, ge=1, le=1_000_000, description="input rows per shard (download and output)"
    )


class StageResources(Section):
    num_cpus: float = Field(1, ge=0, description="CPUs per worker")
    num_gpus: float = Field(0, ge=0, description="GPUs per worker (fractions share a GPU)")
    min_workers: int = Field(1, ge=1, description="actor pool minimum size")
    max_workers: int = Field(1, ge=1, description="actor pool maximum size")
    batch_size: int = Field(8, ge=1, description="rows per batch")
    max_in_flight: int = Field(
        2,
        ge=1,
        description="batches queued per actor (backpressure: bounds the blocks waiting at each stage, "
        "so a fast upstream pool cannot flood a slow GPU stage)",
    )
    resources: dict[str, float] = Field(
        {},
        description="custom Ray resources per worker, e.g. {big_gpu: 1} to pin a stage to nodes that have them",
    )


class ReadTasks(Section):
    num_cpus: float = Field(
        0,
        ge=0,
        description="CPUs per read task (0: a task that waits for its shard holds no CPU the stages' "
        "actors or the write tasks need, so shards are written while the download runs)",
    )
    max_workers: int = Field(
        4, ge=1, description="read tasks at once, each reading one downloaded shard (or waiting for it)"
    )
    resources: dict[str, float] = Field({}, description="custom Ray resources per read task")


class RayConfig(Section):
    executor: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Data graph; local: plain loop, same stages"
    )
    address: str | None = Field(
        None, description="Ray address (null: in-process, or the cluster under ray job submit)"
    )
    fuse_gpu_stages: bool = Field(
        False,
        description="masks and labels in one actor on ray.masks' resources: masks never cross the object store",
    )
    preserve_order: bool = Field(
        False,
        description="keep row order so shards complete in turn (memory is bounded either way: "
        "the driver holds only keys)",
    )
    read: ReadTasks = Field(
        default_factory=ReadTasks,
        description="the tasks that read img2dataset's shards into the graph as each is finished",
    )
    decode: StageResources = Field(default_factory=lambda: StageResources(max_workers=2, batch_size=16))
    dedup: StageResources = Field(
        default_factory=lambda: StageResources(num_cpus=0.25, batch_size=64),
        description="the dedup actor: one worker, always (it must see every image's hash); light",
    )
    candidates: StageResources = Field(default_factory=StageResources)
    masks: StageResources = Field(default_factory=StageResources)
    labels: StageResources = Field(default_factory=StageResources)
    write: StageResources = Field(
        default_factory=lambda: StageResources(num_cpus=0.25, max_workers=4, batch_size=64),
        description="the write tasks (parts of shards, then each shard): CPUs, resources, "
        "max_workers = tasks at once, batch_size = rows per part",
    )

    @model_validator(mode="after")
    def _pools(self):
        for name in ("decode", "dedup", "candidates", "masks", "labels", "write"):
            r = getattr(self, name)
            if r.min_workers > r.max_workers:
                raise ValueError(f"{name}: min_workers {r.min_workers} > max_workers {r.max_workers}")
        if self.dedup.max_workers != 1:
            raise ValueError("dedup: max_workers must be 1 (one actor sees every image's hash)")
        return self


class PipelineConfig(Section):
    input: InputConfig
    output: OutputConfig
    filter: FilterConfig = Field(default_factory=FilterConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    masks: MasksConfig = Field(default_factory=MasksConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    seed: int = Field(0, description="seed for smoke weights and LLM sampling")

    @model_validator(mode="after")
    def _background(self):
        # candidates.background_labels keeps such words off the candidate lists; the labels stage
        # scores every mask against them too, as "no object" (beside labels.background_labels).
        extra = [b for b in self.candidates.background_labels if b not in self.labels.background_labels]
        if extra:
            self.labels.background_labels = [*self.labels.background_labels, *extra]
        return self

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
