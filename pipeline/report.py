"""Statistics of a run for ``ssam-pipeline report``: one streaming pass over its committed shards.

Reads only what the format calls committed (shards with a ``NNNNN.stats.json``, via
``complete_shards``), so it works on a finished run and on one still being written. Memory does
not grow with the run: samples are read one at a time from each tar, distributions go into
fixed-bin histograms and counters, and the contact sheet is a reservoir sample of ``k`` samples.
Only the label counter grows, with the number of distinct labels (the vocabulary plus LLM phrases).

``pipeline/report_html.py`` turns a ``RunStats`` into the HTML page and its plots.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ssam.format import MANIFEST, complete_shards, iter_tar_samples, shard_name

# Order in which a row meets the stages: a failure at one stage means the row never reached the later ones.
STAGE_ORDER = ("filter", "download", "decode", "candidates", "masks", "labels")
SCORE_EDGES = np.linspace(0.0, 1.0, 41)  # label_score and predicted_iou histograms: 40 bins of 0.025
EXAMPLES_PER_REASON = 3
# Failure reasons the decontamination step writes (counted in their own line, 0 until it exists).
DEDUP_REASONS = ("near_duplicate", "eval_overlap")


@dataclass
class SheetSample:
    """One contact-sheet sample: what is needed to draw its overlay and link to it."""

    key: str
    shard: str
    jpeg: bytes
    meta: dict


@dataclass
class RunStats:
    """Everything the report shows, aggregated incrementally (``add_sample``, ``add_failures``...)."""

    run_dir: Path
    finished: bool | None = None  # manifest.finished; None: no manifest yet
    input_rows: int | None = None  # from work/prepared.json; None before the filter finished
    shards: list[str] = field(default_factory=list)
    smoke: bool = False
    provenance: dict = field(default_factory=dict)
    written: int = 0
    failures: Counter = field(default_factory=Counter)  # reason -> rows (filter + shard failure records)
    failure_examples: dict = field(default_factory=dict)  # reason -> [{"key", "url", "detail"}]
    stage_seconds: Counter = field(default_factory=Counter)  # stage -> summed per-row seconds
    stage_rows: Counter = field(default_factory=Counter)  # stage -> rows that reached it
    masks: int = 0
    labelled: int = 0
    masks_per_image: Counter = field(default_factory=Counter)  # mask count -> images
    labels: Counter = field(default_factory=Counter)  # label -> masks
    score_hist_labelled: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_EDGES) - 1, np.int64))
    score_hist_unlabelled: np.ndarray = field(
        default_factory=lambda: np.zeros(len(SCORE_EDGES) - 1, np.int64)
    )
    iou_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_EDGES) - 1, np.int64))
    images_without_candidates: int = 0
    candidates_by_source: Counter = field(default_factory=Counter)  # source -> candidates offered
    images_by_source: Counter = field(default_factory=Counter)  # source -> images with >= 1 such candidate
    wins_by_source: Counter = field(
        default_factory=Counter
    )  # source -> labelled masks whose label came from it
    sheet: list[SheetSample] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def pending(self) -> int | None:
        """Input rows neither written nor failed yet (a running run), or None when unknown."""
        return None if self.input_rows is None else max(self.input_rows - self.written - self.failed, 0)

    def dedup_counts(self) -> dict[str, int]:
        return {r: self.failures.get(r, 0) for r in DEDUP_REASONS}

    def add_failures(self, path: Path) -> None:
        """Count the failure records of one ``*.failures.parquet``, streamed in batches."""
        for batch in pq.ParquetFile(path).iter_batches(columns=["key", "url", "reason", "detail"]):
            for row in batch.to_pylist():
                self.failures[row["reason"]] += 1
                examples = self.failure_examples.setdefault(row["reason"], [])
                if len(examples) < EXAMPLES_PER_REASON:
                    examples.append({k: row[k] for k in ("key", "url", "detail")})

    def add_shard_stats(self, stats: dict) -> None:
        """Stage timings and the rows that reached each stage, from one shard's ``stats.json``."""
        self.smoke = self.smoke or bool(stats.get("provenance", {}).get("smoke"))
        self.provenance = self.provenance or stats.get("provenance", {})
        rows = int(stats.get("samples", 0)) + int(stats.get("failures", 0))
        failed_at = stats.get("failures_by_stage", {})
        for stage, seconds in stats.get("stage_seconds", {}).items():
            self.stage_seconds[stage] += float(seconds)
            before = STAGE_ORDER[: STAGE_ORDER.index(stage)] if stage in STAGE_ORDER else ()
            self.stage_rows[stage] += rows - sum(int(failed_at.get(s, 0)) for s in before)

    def add_sample(self, meta: dict) -> None:
        """One written sample's masks, labels, scores and candidates."""
        self.written += 1
        self.smoke = self.smoke or bool(meta.get("provenance", {}).get("smoke"))
        anns = meta["annotations"]
        self.masks += len(anns)
        self.masks_per_image[len(anns)] += 1
        source_of: dict[str, str] = {}
        for cand in meta.get("candidates", []):
            source_of.setdefault(cand["label"], cand.get("source", "unknown"))
            self.candidates_by_source[cand.get("source", "unknown")] += 1
        for source in set(source_of.values()):
            self.images_by_source[source] += 1
        self.images_without_candidates += not source_of
        labelled_scores, unlabelled_scores = [], []
        for ann in anns:
            if ann.get("label"):
                self.labelled += 1
                self.labels[ann["label"]] += 1
                self.wins_by_source[source_of.get(ann["label"], "unknown")] += 1
                labelled_scores.append(ann.get("label_score", 0.0))
            elif source_of:  # a null label with candidates: CLIP's best candidate was not good enough
                unlabelled_scores.append(ann.get("label_score", 0.0))
        self.score_hist_labelled += _hist(labelled_scores)
        self.score_hist_unlabelled += _hist(unlabelled_scores)
        self.iou_hist += _hist([a["predicted_iou"] for a in anns])


def _hist(values: list[float]) -> np.ndarray:
    return np.histogram(np.clip(np.asarray(values, np.float64), 0.0, 1.0), SCORE_EDGES)[0]


class Reservoir:
    """Uniform sample of ``k`` items from a stream of unknown length (Algorithm R), seeded."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.seen, self.items = k, 0, []
        self.rng = random.Random(seed)

    def offer(self) -> int | None:
        """Slot the next item goes into, or None when it is not kept; call once per stream item."""
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(None)
            return len(self.items) - 1
        j = self.rng.randrange(self.seen)
        return j if j < self.k else None


def collect(run_dir: str | Path, sheet_size: int = 24, seed: int = 0) -> RunStats:
    """Aggregate a run's committed shards (and its filter failures) into a ``RunStats``.

    Args:
        run_dir: the run directory (``output.dir``).
        sheet_size: samples kept for the contact sheet (reservoir sample over the whole run).
        seed: seed of the reservoir sample.
    """
    run = Path(run_dir)
    stats = RunStats(run_dir=run)
    manifest = run / MANIFEST
    if manifest.exists():
        m = json.loads(manifest.read_text())
        stats.finished = bool(m.get("finished"))
        stats.provenance = m.get("provenance", {})
        stats.smoke = bool(stats.provenance.get("smoke"))
    prepared = run / "work" / "prepared.json"
    if prepared.exists():
        stats.input_rows = int(json.loads(prepared.read_text())["input_rows"])
    if (run / "filter.failures.parquet").exists():
        stats.add_failures(run / "filter.failures.parquet")
    reservoir = Reservoir(sheet_size, seed)
    shard_dir = run / "shards"
    for sid in complete_shards(shard_dir):  # listed once: shards committed later are not half-read
        stem = shard_name(sid)
        stats.shards.append(stem)
        stats.add_shard_stats(json.loads((shard_dir / f"{stem}.stats.json").read_text()))
        stats.add_failures(shard_dir / f"{stem}.failures.parquet")
        for raw in iter_tar_samples(shard_dir / f"{stem}.tar"):
            meta = json.loads(raw["json"])
            stats.add_sample(meta)
            slot = reservoir.offer()
            if slot is not None:
                reservoir.items[slot] = SheetSample(raw["__key__"], stem, raw["jpg"], meta)
    stats.sheet = sorted(reservoir.items, key=lambda s: s.key)
    return stats
