"""Write: output shards made where the rows are, on the workers; the driver only counts keys.

Output shard ``N`` holds exactly the rows of downloaded shard ``N`` (written samples plus
failure records), so a resumed run redoes only shards without a commit marker and ends with the
same keys as an uninterrupted one. Rows reach the end of the graph in any order and batching, so
writing has two steps:

1. :func:`write_parts` (the graph's last stage, a Ray task on whichever worker holds the batch):
   the rows of one batch that belong to shard ``N`` become one *part*,
   ``SHARDS/_parts/NNNNN/<digest>.parquet`` (written atomically; the name is a digest of its keys,
   so a retried task rewrites the same part instead of adding a second one). Only the keys and
   the part's name go back to the driver.
2. When every key of shard ``N`` has been seen (:class:`ShardTracker`, on the driver),
   :func:`finalize_shard` (a Ray task) reads the parts, drops duplicate keys, writes the shard
   through :func:`ssam.format.write_shard` (atomic; ``stats.json`` last) and deletes the parts.

No image bytes or embeddings pass through the driver. Parts of a shard without a commit marker
are leftovers of an interrupted run and are deleted before a run starts (see
:func:`ssam.format.remove_incomplete`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssam import storage
from ssam.format import PARTS_DIR, Failure, Sample, ShardContent, stats_path, write_shard

from .common import OK, as_list, batch_len

TIMING_STAGES = ("decode", "dedup", "candidates", "masks", "labels")

PART_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("url", pa.string()),
        ("fail_stage", pa.string()),
        ("fail_detail", pa.string()),
        ("jpeg", pa.binary()),
        ("meta_json", pa.string()),
        ("emb", pa.binary()),
        *[(f"t_{s}", pa.float64()) for s in TIMING_STAGES],
    ]
)


def sample_meta(row: dict[str, Any], provenance: dict) -> dict:
    """One ok row -> its sample JSON as docs/FORMAT.md defines it."""
    return {
        "image": {
            "image_id": int(row["key"]) if str(row["key"]).isdigit() else 0,
            "key": row["key"],
            "file_name": f"{row['key']}.jpg",
            "width": int(row["width"]),
            "height": int(row["height"]),
            "url": row["url"],
            "caption": row["caption"],
            "sha256": row["sha256"],
            **({"phash": row["phash"]} if row.get("phash") else {}),
        },
        "candidates": json.loads(row["candidates_json"]),
        "annotations": json.loads(row["annotations_json"]),
        "provenance": provenance,
    }


def part_dir(shard_dir: str | Path, shard_id: int) -> str:
    return storage.join(shard_dir, PARTS_DIR, f"{shard_id:05d}")


def write_parts(batch: dict[str, Any], shard_dir: str, provenance: dict) -> dict[str, list]:
    """Graph stage: write the batch's rows as one part per shard; return ``shard_id, part, keys_json``."""
    cols = {k: as_list(v) for k, v in batch.items()}
    by_shard: dict[int, list[dict]] = defaultdict(list)
    for i in range(batch_len(cols)):
        row = {k: v[i] for k, v in cols.items()}
        by_shard[int(row["shard_id"])].append(row)
    out: dict[str, list] = {"shard_id": [], "part": [], "keys_json": []}
    for sid, rows in sorted(by_shard.items()):
        rows.sort(key=lambda r: r["key"])
        keys = [str(r["key"]) for r in rows]
        table = {
            "key": keys,
            "status": [r["status"] for r in rows],
            "url": [r["url"] or "" for r in rows],
            "fail_stage": [r["fail_stage"] or "" for r in rows],
            "fail_detail": [r["fail_detail"] or "" for r in rows],
            "jpeg": [r["jpeg"] if r["status"] == OK else None for r in rows],
            "meta_json": [
                json.dumps(sample_meta(r, provenance)) if r["status"] == OK else None for r in rows
            ],
            "emb": [(r.get("emb") or None) if r["status"] == OK else None for r in rows],
        }
        for s in TIMING_STAGES:
            table[f"t_{s}"] = [float(r.get(f"t_{s}") or 0.0) for r in rows]
        name = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20] + ".parquet"
        buf = io.BytesIO()
        pq.write_table(pa.table(table, schema=PART_SCHEMA), buf)
        storage.write_bytes(storage.join(part_dir(shard_dir, sid), name), buf.getvalue())  # atomic
        out["shard_id"].append(sid)
        out["part"].append(name)
        out["keys_json"].append(json.dumps(keys))
    return out


def finalize_shard(shard_dir: str, shard_id: int, provenance: dict) -> dict:
    """Parts of one shard -> the shard (atomic); the parts are deleted after the commit.

    Returns ``{"shard_id", "outcomes", "stage_seconds", "stage_rows"}`` for the run's summary.
    """
    committed = stats_path(shard_dir, shard_id)
    if storage.exists(committed):
        # A retry of a task whose first attempt committed the shard and then died (its node went)
        # before returning, maybe while deleting the parts: the shard stands. Rebuilding it from
        # the parts left would overwrite it with fewer rows, or none.
        storage.rm(part_dir(shard_dir, shard_id), recursive=True)
        # Its rows per stage are not in the shard, so its timings count as unmeasured: seconds
        # without their rows would inflate the run's seconds per row.
        outcomes = storage.read_json(committed)["outcomes"]
        return {"shard_id": shard_id, "outcomes": outcomes, "stage_seconds": {}, "stage_rows": {}}
    parts = storage.glob(storage.join(part_dir(shard_dir, shard_id), "*.parquet"))
    rows: dict[str, dict] = {}
    for p in parts:
        with storage.open_file(p) as f:
            table = pq.read_table(f)
        for r in table.to_pylist():
            rows.setdefault(r["key"], r)  # a key written twice (a retried task) counts once
    content = ShardContent(shard_id)
    seconds: Counter = Counter()
    counted: Counter = Counter()
    for key in sorted(rows):
        r = rows[key]
        for stage in TIMING_STAGES:
            t = float(r[f"t_{stage}"] or 0.0)
            seconds[stage] += t
            counted[stage] += t > 0
        if r["status"] == OK:
            emb = np.load(io.BytesIO(r["emb"]), allow_pickle=False) if r["emb"] else None
            content.samples.append(Sample(key=key, jpeg=r["jpeg"], meta=json.loads(r["meta_json"]), emb=emb))
        else:
            content.failures.append(Failure(key, r["url"], r["fail_stage"], r["status"], r["fail_detail"]))
    outcomes = Counter({"written": len(content.samples)})
    outcomes.update(f.reason for f in content.failures)
    labelled = sum(1 for s in content.samples for a in s.meta["annotations"] if a.get("label"))
    content.stats = {
        "outcomes": dict(outcomes),
        "labelled": labelled,
        "failures_by_stage": dict(Counter(f.stage for f in content.failures)),
        "stage_seconds": {k: round(v, 4) for k, v in seconds.items() if counted[k]},  # stages that ran
        "provenance": provenance,
    }
    write_shard(shard_dir, content)
    storage.rm(part_dir(shard_dir, shard_id), recursive=True)
    if not storage.is_remote(shard_dir):
        with contextlib.suppress(OSError):  # the parts folder, once no shard is being written
            os.rmdir(storage.join(shard_dir, PARTS_DIR))
    return {
        "shard_id": shard_id,
        "outcomes": dict(outcomes),
        "stage_seconds": dict(seconds),
        "stage_rows": dict(counted),
    }


class ShardTracker:
    """The driver's book-keeping: which keys of each pending shard have been written as parts.

    Args:
        expected_rows: rows per pending shard id (from the download parquet).
    """

    def __init__(self, expected_rows: dict[int, int]):
        self.expected = dict(expected_rows)
        self.keys: dict[int, set[str]] = defaultdict(set)
        self.finalizing: set[int] = set()
        self.received_bytes = 0  # what the driver was sent (keys and part names), for the summary
        self.written: list[int] = []
        self.outcomes: Counter = Counter()
        self.stage_seconds: Counter = Counter()
        self.stage_rows: Counter = Counter()

    def add(self, parts: dict[str, Any]) -> list[int]:
        """Record written parts (``write_parts``' output); return the shards that are now complete."""
        cols = {k: as_list(v) for k, v in parts.items()}
        self.received_bytes += sum(len(str(v)) for vs in cols.values() for v in vs)
        done = []
        for sid, keys in zip(cols.get("shard_id", []), cols.get("keys_json", []), strict=True):
            sid = int(sid)
            if sid not in self.expected:
                raise ValueError(f"a part of shard {sid} arrived, which is not pending")
            self.keys[sid].update(json.loads(keys))
            if len(self.keys[sid]) >= self.expected[sid] and sid not in self.finalizing:
                self.finalizing.add(sid)
                done.append(sid)
        return done

    def record(self, result: dict) -> None:
        """Take one :func:`finalize_shard` result."""
        self.written.append(int(result["shard_id"]))
        self.keys.pop(int(result["shard_id"]), None)
        self.outcomes.update(result["outcomes"])
        self.stage_seconds.update(result["stage_seconds"])
        self.stage_rows.update(result["stage_rows"])

    def missing(self) -> dict[int, int]:
        """Pending shards not written: ``{shard: distinct rows received}``."""
        return {s: len(self.keys.get(s, ())) for s in self.expected if s not in self.written}


class ShardAssembler(ShardTracker):
    """Both steps in this process (the local executor, benchmarks): feed it finished rows; it
    writes parts and finalizes each shard when its last row arrives."""

    def __init__(self, shard_dir: str | Path, expected_rows: dict[int, int], provenance: dict):
        super().__init__(expected_rows)
        self.shard_dir, self.provenance = str(shard_dir), provenance

    def add(self, batch: dict[str, Any]) -> list[int]:
        """Take a batch of finished rows; return the ids of shards this completed and wrote."""
        done = super().add(write_parts(batch, self.shard_dir, self.provenance))
        for sid in done:
            self.record(finalize_shard(self.shard_dir, sid, self.provenance))
        return done
