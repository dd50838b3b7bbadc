"""The stage graph: Ray Data ``map_batches`` actor pools, or a plain loop over the same stages.

Ray executor: downloaded shards -> read (tasks) -> decode -> candidates -> masks -> labels
(each an actor pool with the CPUs, GPUs, pool size and batch size from ``cfg.ray``), consumed by
the driver, which assembles and writes shards as they complete. Ray Data streams: memory is
bounded by the in-flight window, not the dataset size. The local executor runs the same stage
objects one batch at a time in this process (tests, debugging, the benchmark's baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ssam.stages.candidates import CandidatesStage
from ssam.stages.decode import DecodeStage
from ssam.stages.download import read_downloaded_shard, read_shard_batch
from ssam.stages.fused import MasksAndLabelsStage
from ssam.stages.labels import LabelStage
from ssam.stages.masks import MaskStage
from ssam.stages.write import ShardAssembler

from .config import PipelineConfig

STAGES: list[tuple[str, type]] = [
    ("decode", DecodeStage),
    ("candidates", CandidatesStage),
    ("masks", MaskStage),
    ("labels", LabelStage),
]


def stage_args(cfg: PipelineConfig, name: str) -> tuple:
    """A stage's constructor arguments: its own config section (and the seed for model stages)."""
    section = getattr(cfg, name)
    return (section,) if name == "decode" else (section, cfg.seed)


def stage_plan(cfg: PipelineConfig) -> list[tuple[str, type, tuple]]:
    """``(resources name, stage class, constructor args)`` in graph order.

    With ``ray.fuse_gpu_stages`` masks and labels become one stage on ``ray.masks``' resources.
    """
    plan = [(name, cls, stage_args(cfg, name)) for name, cls in STAGES]
    if cfg.ray.fuse_gpu_stages:
        plan = [p for p in plan if p[0] not in ("masks", "labels")]
        plan.append(("masks", MasksAndLabelsStage, (cfg.masks, cfg.labels, cfg.seed)))
    return plan


def _chunks(batch: dict[str, list], size: int):
    n = len(batch["key"]) if batch else 0
    for s in range(0, n, size):
        yield {k: v[s : s + size] for k, v in batch.items()}


def run_local(
    cfg: PipelineConfig,
    shard_stems: list[Path],
    assembler: ShardAssembler,
    on_shard: Callable[[int], None] = lambda s: None,
) -> None:
    """Sequential executor: the same stage objects, in this process, one batch at a time."""
    stages = [(cls(*args), getattr(cfg.ray, name).batch_size) for name, cls, args in stage_plan(cfg)]
    for stem in shard_stems:
        for sid in assembler.add(_run_chain(stages, read_downloaded_shard(stem))):
            on_shard(sid)


def _run_chain(stages: list[tuple[Callable, int]], batch: dict[str, list]) -> dict[str, list]:
    """Each stage over the rows in its own batch size (as its Ray actor pool would see them)."""
    for stage, size in stages:
        parts = [stage(chunk) for chunk in _chunks(batch, size)]
        batch = {k: [v for part in parts for v in part[k]] for k in parts[0]} if parts else batch
    return batch


def init_ray(cfg: PipelineConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=cfg.ray.address,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )


def build_dataset(cfg: PipelineConfig, shard_stems: list[Path]):
    """The lazy Ray Data graph over the given downloaded shards (nothing runs until consumed)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ds = ray.data.from_items(
        [{"shard_stem": str(s)} for s in shard_stems], override_num_blocks=len(shard_stems)
    )
    ds = ds.map_batches(read_shard_batch, batch_size=1, batch_format="numpy", num_cpus=0.1)
    for name, cls, args in stage_plan(cfg):
        r = getattr(cfg.ray, name)
        ds = ds.map_batches(
            cls,
            fn_constructor_args=args,
            batch_size=r.batch_size,
            batch_format="numpy",
            concurrency=(r.min_workers, r.max_workers),
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            resources=r.resources or None,
            udf_modifying_row_count=False,
        )
    return ds


def run_ray(
    cfg: PipelineConfig,
    shard_stems: list[Path],
    assembler: ShardAssembler,
    on_shard: Callable[[int], None] = lambda s: None,
) -> None:
    """Ray Data executor; the driver assembles and writes shards as their rows stream in."""
    init_ray(cfg)
    ds = build_dataset(cfg, shard_stems)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for sid in assembler.add(batch):
            on_shard(sid)
