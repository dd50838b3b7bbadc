"""The stage graph: Ray Data ``map_batches`` actor pools, or a plain loop over the same stages.

Ray executor: downloaded shards -> read (tasks, each waiting for its shard's download) -> decode
-> candidates -> masks -> labels (each an actor pool with the CPUs, GPUs, pool size and batch size
from ``cfg.ray``) -> write (tasks: parts of shards on the workers). The driver receives only the
keys of each part and starts a task per complete shard (stages/write.py). Ray Data streams:
memory is bounded by the in-flight window, not the dataset size. The local executor runs the same stage
objects one batch at a time in this process (tests, debugging, the benchmark's baseline).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

from ssam import storage
from ssam.stages.candidates import CandidatesStage
from ssam.stages.decode import DecodeStage
from ssam.stages.dedup import DedupStage
from ssam.stages.download import read_downloaded_shard, read_shard_batch, wait_for_shard
from ssam.stages.fused import MasksAndLabelsStage
from ssam.stages.labels import LabelStage
from ssam.stages.masks import MaskStage
from ssam.stages.write import ShardTracker, finalize_shard, write_parts

from .config import ConfigError, PipelineConfig

STAGES: list[tuple[str, type]] = [
    ("decode", DecodeStage),
    ("dedup", DedupStage),
    ("candidates", CandidatesStage),
    ("masks", MaskStage),
    ("labels", LabelStage),
]


def stage_args(cfg: PipelineConfig, name: str) -> tuple:
    """A stage's constructor arguments: its own config section (and the seed for model stages,
    the folder of its kept hashes for dedup)."""
    section = getattr(cfg, name)
    if name == "dedup":
        return (section, storage.join(cfg.output.dir, "work", "dedup"))
    return (section,) if name == "decode" else (section, cfg.seed)


def stage_plan(cfg: PipelineConfig) -> list[tuple[str, type, tuple]]:
    """``(resources name, stage class, constructor args)`` in graph order.

    With ``ray.fuse_gpu_stages`` masks and labels become one stage on ``ray.masks``' resources.
    Dedup is left out when ``dedup`` checks nothing.
    """
    plan = [(name, cls, stage_args(cfg, name)) for name, cls in STAGES]
    if not cfg.dedup.active:
        plan = [p for p in plan if p[0] != "dedup"]
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
    shard_stems: list[str],
    tracker: ShardTracker,
    shard_dir: str,
    provenance: dict,
    on_shard: Callable[[int], None] = lambda s: None,
) -> None:
    """Sequential executor: the same stage objects, in this process, one batch at a time; each
    downloaded shard is taken as soon as img2dataset has finished it."""
    stages = [(cls(*args), getattr(cfg.ray, name).batch_size) for name, cls, args in stage_plan(cfg)]
    for stem in shard_stems:
        wait_for_shard(stem)
        rows = _run_chain(stages, read_downloaded_shard(stem))
        for part in _chunks(rows, cfg.ray.write.batch_size):
            for sid in tracker.add(write_parts(part, str(shard_dir), provenance)):
                tracker.record(finalize_shard(str(shard_dir), sid, provenance))
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
        # Under `ray job submit` the job already has a runtime env (its working_dir, our cwd):
        # passing another one here would replace it, and Ray would then delete the working_dir
        # under our feet (img2dataset's processes start from the cwd). Only a Ray of our own
        # gets ours.
        joining = cfg.ray.address is not None or "RAY_ADDRESS" in os.environ
        ray.init(
            address=cfg.ray.address,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env=None if joining else {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )


def build_dataset(cfg: PipelineConfig, shard_stems: list[str], shard_dir: str, provenance: dict):
    """The lazy Ray Data graph over the given shards (nothing runs until consumed): read (tasks
    that wait for their shard's download), the stages' actor pools, then the write tasks, whose
    output is only each part's keys."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.ray.preserve_order
    ds = ray.data.from_items(
        [{"shard_stem": str(s)} for s in shard_stems], override_num_blocks=len(shard_stems)
    )
    # A read task can wait minutes for its shard's download. Holding CPUs meanwhile, waiting reads
    # can leave the write tasks none on a cluster the pools fill (the smoke config on 2 CPUs), and
    # then no shard is written until the download ends: by default they hold none, and at most
    # ray.read.max_workers wait at once.
    rd = cfg.ray.read
    ds = ds.map_batches(
        read_shard_batch,
        batch_size=1,
        batch_format="numpy",
        num_cpus=rd.num_cpus,
        resources=rd.resources or None,
        # no more tasks than shards (Ray Data warns of a pool larger than its inputs)
        compute=ray.data.TaskPoolStrategy(size=max(1, min(rd.max_workers, len(shard_stems)))),
    )
    for name, cls, args in stage_plan(cfg):
        r = getattr(cfg.ray, name)
        ds = ds.map_batches(
            cls,
            fn_constructor_args=args,
            batch_size=r.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                min_size=r.min_workers, max_size=r.max_workers, max_tasks_in_flight_per_actor=r.max_in_flight
            ),
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            resources=r.resources or None,
            udf_modifying_row_count=False,
        )
    w = cfg.ray.write
    return ds.map_batches(
        write_parts,
        fn_kwargs={"shard_dir": str(shard_dir), "provenance": provenance},
        batch_size=w.batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=w.max_workers),
        num_cpus=w.num_cpus,
        resources=w.resources or None,
    )


def check_capacity(cfg: PipelineConfig) -> None:
    """Refuse a graph whose actor pools cannot all start on the cluster as it is: Ray Data would
    wait for them forever. (An autoscaling cluster that is still small: start it bigger, or lower
    ``ray.<stage>.min_workers`` / ``num_cpus``.)"""
    import ray

    have = ray.cluster_resources()
    need: dict[str, float] = {}
    for name, _, _ in stage_plan(cfg):
        r = getattr(cfg.ray, name)
        for res, amount in (("CPU", r.num_cpus), ("GPU", r.num_gpus), *r.resources.items()):
            need[res] = need.get(res, 0.0) + amount * r.min_workers
    w, rd = cfg.ray.write, cfg.ray.read
    for res, amount in (("CPU", w.num_cpus + rd.num_cpus), *w.resources.items(), *rd.resources.items()):
        need[res] = need.get(res, 0.0) + amount  # at least one write and one read task beside the pools
    if cfg.download.distributor == "ray":
        need["CPU"] = need.get("CPU", 0.0) + 1  # img2dataset's tasks (1 CPU each) fetch beside the graph
    short = {r: (n, have.get(r, 0.0)) for r, n in need.items() if n > have.get(r, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{r}: needs {n:g}, cluster has {h:g}" for r, (n, h) in short.items())
        raise ConfigError(
            f"the stages' actor pools (min_workers x resources in ray.*) do not fit the Ray cluster "
            f"({detail}); lower ray.<stage>.num_cpus / min_workers, or add nodes"
        )


def run_ray(
    cfg: PipelineConfig,
    shard_stems: list[str],
    tracker: ShardTracker,
    shard_dir: str,
    provenance: dict,
    on_shard: Callable[[int], None] = lambda s: None,
) -> None:
    """Ray Data executor. The workers write parts; the driver counts keys and, when a shard is
    complete, starts a task that writes it (:func:`finalize_shard`)."""
    import ray

    init_ray(cfg)
    w = cfg.ray.write
    finalize = ray.remote(finalize_shard).options(num_cpus=w.num_cpus, resources=w.resources or None)
    running: dict = {}

    def collect(timeout: float) -> None:
        ready, _ = ray.wait(
            list(running), num_returns=1 if timeout is None else len(running), timeout=timeout
        )
        for ref in ready:
            running.pop(ref)
            result = ray.get(ref)
            tracker.record(result)
            on_shard(int(result["shard_id"]))

    def poll() -> None:  # record the shards whose write task has ended, without waiting
        if running:
            collect(0)

    # Ray Data's hint that the write pool (ray.write.max_workers) is larger than the number of
    # blocks that reached it, which a small run shows: it costs nothing here (idle slots of a task
    # pool), and that number is not known when the graph is built.
    warnings.filterwarnings("ignore", message=WRITE_POOL_HINT, category=UserWarning)
    ds = build_dataset(cfg, shard_stems, shard_dir, provenance)
    for parts in _batches_while_polling(ds, poll):
        for sid in tracker.add(parts):
            running[finalize.remote(str(shard_dir), sid, provenance)] = sid
        poll()
    while running:
        collect(None)


_END = object()
WRITE_POOL_HINT = r"The maximum number of concurrent tasks for 'MapBatches\(write_parts\)'"


def _batches_while_polling(ds, poll: Callable[[], None], every_s: float = 0.5):
    """``ds.iter_batches`` (the parts' keys), with ``poll`` called at least every ``every_s`` while
    the next batch is awaited.

    The driver records a shard (manifest, progress, ``on_shard``) when its write task ends, which it
    learns by polling. Polled only between batches, a written shard went unreported for as long as
    the graph's next output took: until the download ended, when rows waited for it. So the batches
    are pulled by a thread of their own and handed over through a queue.
    """
    import queue
    import threading

    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item) -> bool:
        """Hand ``item`` over; False if the driver stopped first."""
        while not stop.is_set():
            try:
                handoff.put(item, timeout=every_s)
                return True
            except queue.Full:
                pass
        return False

    def pull() -> None:
        item = _END
        try:
            for parts in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if not offer(parts):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the driver's thread, which raises it
            item = e
        offer(item)

    puller = threading.Thread(target=pull, name="ssam-graph-output", daemon=True)
    puller.start()
    try:
        while True:
            try:
                item = handoff.get(timeout=every_s)
            except queue.Empty:
                poll()
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # a driver that stops early (an error) lets the puller go
        puller.join(timeout=5)
