"""One pipeline run: check -> filter -> download -> graph -> shards -> manifest, resumable.

Run directory layout::

    RUN/manifest.json                 config, provenance, complete shards, totals (rewritten atomically)
    RUN/filter.failures.parquet       rows refused before download (same schema as shard failures)
    RUN/work/download_input.parquet   the rows handed to img2dataset
    RUN/downloads/NNNNN.{tar,parquet} img2dataset's image shards (original bytes, per-row status)
    RUN/shards/NNNNN.*                the output (docs/FORMAT.md)

Started again, a run skips what is complete: the filter output if present, img2dataset's done
shards (its incremental mode), and every output shard with a commit marker. A finished run does
nothing. The same ``output.dir`` with a different config is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ssam import storage
from ssam.format import FAILURE_SCHEMA, MANIFEST, complete_shards, remove_incomplete, stats_path
from ssam.stages.common import OK
from ssam.stages.download import (
    DOWNLOAD_DONE,
    Downloader,
    expected_shards,
    write_download_input,
)
from ssam.stages.filter import FilterStage
from ssam.stages.write import ShardTracker

from .config import ConfigError, PipelineConfig
from .inputs import check_inputs, iter_input_batches
from .preflight import check_models


@dataclass
class RunSummary:
    """What a run did; ``totals['input_rows'] == written + failed`` always."""

    run_dir: str
    totals: dict = field(default_factory=dict)
    shards_written_now: list[int] = field(default_factory=list)
    stage_rows_per_s: dict = field(default_factory=dict)
    wall_s: float = 0.0
    nothing_to_do: bool = False
    overlap: dict = field(default_factory=dict)  # seconds from the start: first shard written, download end

    def lines(self) -> list[str]:
        t = self.totals
        out = [f"run: {self.run_dir}"]
        if self.nothing_to_do:
            out.append("nothing to do: every shard is complete")
        out.append(
            f"input rows {t.get('input_rows', 0)} = written {t.get('written', 0)} + failed {t.get('failed', 0)}"
            f"  ({'adds up' if t.get('input_rows') == t.get('written', 0) + t.get('failed', 0) else 'DOES NOT ADD UP'})"
        )
        for reason, n in sorted(t.get("by_reason", {}).items(), key=lambda kv: -kv[1]):
            out.append(f"  {reason:<20} {n}")
        out.append(
            f"shards complete {t.get('shards', 0)}, written by this run {len(self.shards_written_now)}; "
            f"annotations {t.get('annotations', 0)}, labelled {t.get('labelled', 0)}"
        )
        for stage, rate in self.stage_rows_per_s.items():
            out.append(f"  {stage:<11} {rate:8.2f} rows/s per worker")
        if self.overlap.get("first_shard") is not None:
            end = self.overlap.get("download_end")
            out.append(
                f"first shard written after {self.overlap['first_shard']:.1f}s; download finished after "
                + (f"{end:.1f}s" if end is not None else "?")
            )
        if self.wall_s:
            out.append(
                f"wall {self.wall_s:.1f}s, {t.get('written_now', 0) / self.wall_s:.2f} images/s written"
            )
        return out


def config_fingerprint(cfg: PipelineConfig) -> str:
    """Hash of everything that changes the output (not Ray resources or the executor)."""
    data = cfg.model_dump(mode="json", exclude={"ray"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: PipelineConfig, run: str, files: list[str]) -> int:
    """Filter the input into ``work/download_input.parquet`` + ``filter.failures.parquet``; return input rows."""
    target = storage.join(run, "work", "download_input.parquet")
    failures_path = storage.join(run, "filter.failures.parquet")
    marker = storage.join(run, "work", "prepared.json")
    if storage.exists(marker):
        return storage.read_json(marker)["input_rows"]
    stage = FilterStage(cfg.filter, url_policy=cfg.download)
    merged: dict[str, list] = {k: [] for k in ("fetch_url", "caption", "url", "src_index", "status")}
    fails: list[dict] = []
    n_rows = 0
    for batch in iter_input_batches(cfg, files):
        out = stage(batch)
        n_rows += len(out["url"])
        for k in merged:
            merged[k] += out[k]
        fails += [
            {
                "key": f"input-{out['src_index'][i]}",
                "url": str(out["url"][i] or ""),
                "stage": "filter",
                "reason": s,
                "detail": out["fail_detail"][i],
            }
            for i, s in enumerate(out["status"])
            if s != OK
        ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(fails, schema=FAILURE_SCHEMA), buf)
    storage.write_bytes(failures_path, buf.getvalue())
    kept = write_download_input(merged, target)
    storage.write_json(marker, {"input_rows": n_rows, "kept": kept, "filtered": len(fails)})
    return n_rows


@dataclass
class DownloadProcess:
    """The img2dataset process :func:`start_download` started, and the thread watching it."""

    process: subprocess.Popen
    thread: threading.Thread

    def join(self) -> None:
        """Wait until the download has ended and ``DOWNLOAD_DONE`` is written."""
        self.thread.join()

    def stop(self, grace_s: float = 15.0) -> None:
        """End the download early, as Ctrl-C would: img2dataset's SIGINT handler stops its
        process pool and its logger and removes its temporary files (its Ray tasks end with its
        driver). Killed after ``grace_s``. A rerun downloads what is missing."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_download(
    downloader: Downloader, input_parquet: str, download_dir: str, ray_address: str | None = None
) -> DownloadProcess:
    """Run img2dataset in its own process (it installs signal handlers, which only the main
    thread of a process may do), watched by a thread of this one, so that the graph can label
    each shard as soon as it is complete. ``DOWNLOAD_DONE`` is written in ``download_dir`` when
    it ends, with the error if it failed; then ``downloader.error`` holds that error (or None)
    and ``downloader.finished_at`` the time. ``ray_address``: the cluster img2dataset's Ray
    distributor joins."""
    storage.makedirs(download_dir)
    storage.rm(storage.join(download_dir, DOWNLOAD_DONE))
    downloader.error, downloader.finished_at = None, None
    spec = {
        "cfg": downloader.cfg.model_dump(),
        "per_shard": downloader.samples_per_shard,
        "image_size": downloader.image_size,
        "input": str(input_parquet),
        "folder": str(download_dir),
        "ray_address": ray_address,
    }
    # A fresh interpreter that imports only what fetching needs (not multiprocessing's spawn,
    # which re-imports the caller's main script); its stderr is kept so that a crash says why.
    errors = tempfile.NamedTemporaryFile(prefix="ssam-img2dataset-", suffix=".stderr", delete=False)
    # cwd: a folder that stays. Under `ray job submit` ours is the job's working_dir, which Ray
    # can remove while the job runs; img2dataset's processes start from the cwd.
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssam.pipeline.download_process", json.dumps(spec)],
        stderr=errors,
        cwd=tempfile.gettempdir(),
    )

    def watch():
        proc.wait()
        errors.close()
        marker = storage.join(download_dir, DOWNLOAD_DONE)
        if not storage.exists(marker):  # died before it could say so
            tail = Path(errors.name).read_text(errors="replace")[-1500:].strip()
            storage.write_json(
                marker, {"error": f"img2dataset process died (exit code {proc.returncode}): {tail}"}
            )
        os.unlink(errors.name)
        downloader.error = storage.read_json(marker).get("error")
        downloader.finished_at = time.time()

    thread = threading.Thread(target=watch, name="img2dataset-watch", daemon=True)
    thread.start()
    return DownloadProcess(proc, thread)


def collect_totals(run: str, input_rows: int) -> dict:
    """Totals over every complete shard plus the filter failures."""
    by_reason: Counter = Counter()
    shard_dir = storage.join(run, "shards")
    ann = labelled = 0
    shards = complete_shards(shard_dir)  # one listing (a remote call in object storage)
    for sid in shards:
        stats = storage.read_json(stats_path(shard_dir, sid))
        by_reason.update(stats["outcomes"])
        ann += stats["annotations"]
        labelled += stats.get("labelled", 0)
    with storage.open_file(storage.join(run, "filter.failures.parquet")) as f:
        filt = pq.read_table(f, columns=["reason"]).column("reason").to_pylist()
    by_reason.update(filt)
    written = by_reason.pop("written", 0)
    return {
        "input_rows": input_rows,
        "written": written,
        "failed": sum(by_reason.values()),
        "by_reason": dict(by_reason),
        "shards": len(shards),
        "annotations": ann,
        "labelled": labelled,
    }


def run_pipeline(cfg: PipelineConfig, log=print) -> RunSummary:
    """Run (or resume) the pipeline described by ``cfg``.

    Raises:
        ConfigError, InputError, ModelsUnavailable: before any work is done.
        RuntimeError: the graph ended with rows missing (a bug, reported with the shards).
    """
    from .graph import check_capacity, init_ray, run_local, run_ray

    started = time.perf_counter()
    run = cfg.output.dir if storage.is_remote(cfg.output.dir) else str(Path(cfg.output.dir).resolve())
    manifest_path = storage.join(run, MANIFEST)
    fingerprint = config_fingerprint(cfg)
    previous = storage.read_json(manifest_path) if storage.exists(manifest_path) else None
    if previous and previous.get("config_fingerprint") != fingerprint:
        raise ConfigError(
            f"{run} holds a run made with a different configuration "
            f"(fingerprint {previous.get('config_fingerprint')} != {fingerprint}); use a new output.dir"
        )
    if previous and previous.get("finished"):
        return RunSummary(run, previous["totals"], nothing_to_do=True)
    files = check_inputs(cfg)  # schema errors stop the run before any model is touched or byte fetched
    provenance = check_models(cfg)
    if cfg.smoke:
        log(
            "*** SMOKE RUN: tiny random models; labels and masks are meaningless (marked smoke in every shard) ***"
        )
    storage.makedirs(run)
    manifest = {
        "config": cfg.model_dump(mode="json"),
        "config_fingerprint": fingerprint,
        "provenance": provenance,
        "finished": False,
        "shards": [],
        "totals": {},
    }
    storage.write_json(manifest_path, manifest)

    input_rows = prepare(cfg, run, files)
    if cfg.download.distributor == "ray" or cfg.ray.executor == "ray":
        init_ray(cfg)  # img2dataset's Ray distributor uses the Ray we join (a cluster under ray job submit)
    if cfg.ray.executor == "ray":
        check_capacity(cfg)  # before any download: pools that cannot start would wait forever
    shard_dir = storage.join(run, "shards")
    removed = remove_incomplete(shard_dir)
    if removed:
        log(f"removed {len(removed)} incomplete files from an interrupted run")
    done = set(complete_shards(shard_dir))
    kept = storage.read_json(storage.join(run, "work", "prepared.json"))["kept"]
    expected = expected_shards(kept, cfg.output.samples_per_shard)
    pending = {sid: n for sid, n in expected.items() if sid not in done}
    log(f"input: {input_rows} rows, {kept} to download in {len(expected)} shards "
        f"({len(done)} already complete, {len(pending)} to process)")  # fmt: skip
    downloads = storage.join(run, "downloads")
    tracker = ShardTracker(pending)
    timing = {"started": time.time()}

    def on_shard(sid: int) -> None:
        timing.setdefault("first_shard", time.time())
        log(f"shard {sid:05d} written")

    if pending:
        # img2dataset runs alongside the graph, which takes each shard as soon as it is complete
        downloader = Downloader(cfg.download, cfg.output.samples_per_shard, cfg.decode.image_size)
        ray_address = None
        if cfg.download.distributor == "ray":
            import ray

            ray_address = ray.get_runtime_context().gcs_address
        download_input = storage.join(run, "work", "download_input.parquet")
        download = start_download(downloader, download_input, downloads, ray_address)
        executor = run_ray if cfg.ray.executor == "ray" else run_local
        try:
            stems = [storage.join(downloads, f"{sid:05d}") for sid in sorted(pending)]
            executor(cfg, stems, tracker, shard_dir, provenance, on_shard=on_shard)
        except BaseException:
            # The graph failed (or Ctrl-C): nothing will read the rest of the download, so it is
            # stopped rather than waited for, which could take as long as the whole download.
            download.stop()
            raise
        finally:
            download.join()
        if downloader.error is not None:
            raise RuntimeError(f"img2dataset failed: {downloader.error}")
        timing["download_end"] = downloader.finished_at
    if tracker.missing():
        raise RuntimeError(f"rows missing after the graph finished: {tracker.missing()}")

    totals = collect_totals(run, input_rows)
    totals["written_now"] = tracker.outcomes.get("written", 0)
    written_bytes = sum(
        storage.size(storage.join(shard_dir, f"{sid:05d}{suffix}"))
        for sid in tracker.written
        for suffix in (".tar", ".parquet", ".failures.parquet", ".stats.json")
    )
    totals["driver_bytes_per_output_byte"] = round(tracker.received_bytes / max(written_bytes, 1), 6)
    manifest.update(finished=True, shards=[f"{s:05d}" for s in complete_shards(shard_dir)], totals=totals)
    storage.write_json(manifest_path, manifest)
    rates = {s: tracker.stage_rows[s] / sec for s, sec in tracker.stage_seconds.items() if sec > 0}
    overlap = {
        k: round(timing[k] - timing["started"], 2) for k in ("first_shard", "download_end") if timing.get(k)
    }
    return RunSummary(run, totals, tracker.written, rates, time.perf_counter() - started, overlap=overlap)
