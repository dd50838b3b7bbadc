"""Write: gathers the rows of each input shard and writes the output shard once all have arrived.

Output shard ``N`` holds exactly the rows of downloaded shard ``N`` (written samples plus
failure records), so a resumed run redoes only shards without a commit marker and ends with the
same keys as an uninterrupted one. Rows may arrive in any order and in any batching; memory holds
only the shards still being assembled. Writing goes through :func:`ssam.format.write_shard`
(atomic).
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ssam.format import Failure, Sample, ShardContent, write_shard

from .common import OK, as_list, batch_len

TIMING_STAGES = ("decode", "candidates", "masks", "labels")


def sample_from_row(row: dict[str, Any], provenance: dict) -> Sample:
    """One ok row -> a sample as docs/FORMAT.md defines it."""
    emb = np.load(io.BytesIO(row["emb"]), allow_pickle=False) if row.get("emb") else None
    meta = {
        "image": {
            "image_id": int(row["key"]) if str(row["key"]).isdigit() else 0,
            "key": row["key"],
            "file_name": f"{row['key']}.jpg",
            "width": int(row["width"]),
            "height": int(row["height"]),
            "url": row["url"],
            "caption": row["caption"],
            "sha256": row["sha256"],
        },
        "candidates": json.loads(row["candidates_json"]),
        "annotations": json.loads(row["annotations_json"]),
        "provenance": provenance,
    }
    return Sample(key=row["key"], jpeg=row["jpeg"], meta=meta, emb=emb)


class ShardAssembler:
    """Feed it batches; it writes each shard when its last row arrives.

    Args:
        shard_dir: output directory for shards.
        expected_rows: rows per pending shard id (from the download parquet).
        provenance: the models' provenance, copied into every sample and stats file.
    """

    name = "write"

    def __init__(self, shard_dir: str | Path, expected_rows: dict[int, int], provenance: dict):
        self.shard_dir = Path(shard_dir)
        self.expected = dict(expected_rows)
        self.provenance = provenance
        self.rows: dict[int, list[dict]] = defaultdict(list)
        self.written: list[int] = []
        self.outcomes: Counter = Counter()
        self.stage_seconds: Counter = Counter()
        self.stage_rows: Counter = Counter()

    def _write(self, shard_id: int) -> None:
        rows = sorted(self.rows.pop(shard_id), key=lambda r: r["key"])
        content = ShardContent(shard_id)
        seconds: Counter = Counter()
        for r in rows:
            for stage in TIMING_STAGES:
                t = float(r.get(f"t_{stage}") or 0.0)
                seconds[stage] += t
                self.stage_rows[stage] += t > 0
            if r["status"] == OK:
                content.samples.append(sample_from_row(r, self.provenance))
            else:
                content.failures.append(
                    Failure(r["key"], r["url"], r["fail_stage"], r["status"], r["fail_detail"])
                )
        outcomes = Counter({"written": len(content.samples)})
        outcomes.update(f.reason for f in content.failures)
        labelled = sum(1 for s in content.samples for a in s.meta["annotations"] if a.get("label"))
        content.stats = {
            "outcomes": dict(outcomes),
            "labelled": labelled,
            "failures_by_stage": dict(Counter(f.stage for f in content.failures)),
            "stage_seconds": {k: round(v, 4) for k, v in seconds.items()},
            "provenance": self.provenance,
        }
        write_shard(self.shard_dir, content)
        self.outcomes.update(outcomes)
        self.stage_seconds.update(seconds)
        self.written.append(shard_id)

    def add(self, batch: dict[str, Any]) -> list[int]:
        """Take a batch of finished rows; return the ids of shards this completed and wrote."""
        cols = {k: as_list(v) for k, v in batch.items()}
        done = []
        for i in range(batch_len(cols)):
            row = {k: v[i] for k, v in cols.items()}
            sid = int(row["shard_id"])
            if sid not in self.expected:
                raise ValueError(f"row {row['key']} belongs to shard {sid}, which is not pending")
            self.rows[sid].append(row)
            if len(self.rows[sid]) == self.expected[sid]:
                self._write(sid)
                done.append(sid)
        return done

    def missing(self) -> dict[int, int]:
        """Pending shards that did not receive all their rows: ``{shard: rows received}``."""
        return {s: len(self.rows.get(s, [])) for s in self.expected if s not in self.written}
