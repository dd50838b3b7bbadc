"""Dedup: near-duplicate images and eval-set overlap, by the 64-bit perceptual hash of decode.

An image whose ``phash`` (stages/decode.py::image_phash) is within ``dedup.max_distance`` bits of
an image the stage accepted **earlier** becomes a ``near_duplicate`` failure naming the kept key;
one within ``dedup.exclude_max_distance`` of a hash in ``dedup.exclude_hashes`` (e.g. COCO / LVIS
val images) becomes ``eval_overlap``. Both checks need one view of every image, so the stage runs
as a single actor (``ray.dedup.max_workers`` must be 1) that holds only hashes and keys.

"Earlier" is the order in which the actor receives rows: batches in arrival order, rows of a batch
in key order. The local executor and ``ray.preserve_order: true`` make that the input order; with
Ray's default it can differ between runs, so *which* copy is kept can differ, never *whether* a
group of near-duplicates keeps exactly one.

Exactly once, resume: before a batch leaves the stage, the hashes it kept are written to
``RUN/work/dedup/SEQ-DIGEST.parquet``, and a new actor (a resumed run, a restarted actor) loads
them all first. A row is never compared with its own key, so a batch processed twice (a retried
task, a shard redone after a kill) gets the same verdicts, and a shard written before a kill still
counts as seen. A kept key can still fail in a later stage (``no_masks``, ...).

Finding every earlier hash within ``d`` bits among millions is multi-index hashing: a hash is
four 16-bit chunks; two hashes within ``d`` bits agree within ``d // 4`` bits on at least one
chunk (pigeonhole), so each query probes, per chunk, the buckets within that radius and checks
the few candidates exactly.

Make an exclusion file from a folder of images (same decoding, same hash)::

    python -m ssam.stages.dedup hash-folder /data/coco/val2017 > coco-val.phash.txt
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from ssam import storage
from ssam.configio import Section

from .common import ROW_COLUMNS, RowFailure, Stage, map_rows, ok_indices
from .decode import DecodeConfig, decode_image, image_phash

CHUNK_BITS = 16
N_CHUNKS = 64 // CHUNK_BITS
LOG_SCHEMA = pa.schema([("key", pa.string()), ("phash", pa.uint64())])
COMPACT_ABOVE = 64  # log files a starting actor merges into one


def phash_to_int(hex_hash: str) -> int:
    """``"c2924c5532bddfc8"`` -> its 64-bit value; raises ValueError unless 16 hex digits."""
    if len(hex_hash) != 16:
        raise ValueError(f"a phash has 16 hex digits, got {hex_hash!r}")
    return int(hex_hash, 16)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _flip_masks(radius: int) -> np.ndarray:
    """Every 16-bit mask with at most ``radius`` bits set (the probes around a chunk value)."""
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(CHUNK_BITS), r)]
    return np.array(masks, np.int64)


def _chunk(hashes: np.ndarray, c: int) -> np.ndarray:
    return ((hashes >> np.uint64(c * CHUNK_BITS)) & np.uint64(0xFFFF)).astype(np.int64)


def _gather(ids: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``concat(ids[lo[j]:hi[j]])`` and the ``j`` each element came from, without a Python loop."""
    counts = hi - lo
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(lo)), counts)
    starts = np.cumsum(counts) - counts
    return ids[np.repeat(lo - starts, counts) + np.arange(total)], owner


class HammingIndex:
    """64-bit hashes with keys; :meth:`nearest` finds, per query, the closest within ``max_distance``.

    Per chunk, the ids sorted by that chunk's value and bucket offsets (``starts[v]:starts[v+1]``);
    hashes added since the last merge sit in a small buffer that is compared exhaustively and
    merged into the buckets every ``merge_every`` additions. Memory: ~60 bytes per hash plus its key.
    """

    def __init__(self, max_distance: int, merge_every: int = 4096):
        self.max_distance, self.merge_every = max_distance, merge_every
        self._probes = _flip_masks(max_distance // N_CHUNKS)
        self._hashes = np.zeros(1024, np.uint64)
        self.keys: list[str] = []
        self._ids = [np.zeros(0, np.int64) for _ in range(N_CHUNKS)]
        self._starts = [np.zeros(2**CHUNK_BITS + 1, np.int64) for _ in range(N_CHUNKS)]
        self._merged = 0  # ids below this are in the buckets, the rest in the buffer

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def hashes(self) -> np.ndarray:
        return self._hashes[: len(self.keys)]

    def add(self, hashes: np.ndarray, keys: list[str]) -> None:
        n, m = len(self.keys), len(keys)
        if n + m > len(self._hashes):
            self._hashes = np.resize(self._hashes, max(2 * len(self._hashes), n + m))
        self._hashes[n : n + m] = hashes
        self.keys += keys
        if len(self.keys) - self._merged >= self.merge_every:
            self._merge()

    def _merge(self) -> None:
        new = np.arange(self._merged, len(self.keys))
        for c in range(N_CHUNKS):
            vals = _chunk(self._hashes[new], c)
            order = np.argsort(vals, kind="stable")
            vals, ids = vals[order], new[order]
            # each new id goes at the end of its bucket; np.insert keeps equal positions in order
            self._ids[c] = np.insert(self._ids[c], self._starts[c][vals + 1], ids)
            self._starts[c][1:] += np.cumsum(np.bincount(vals, minlength=2**CHUNK_BITS))
        self._merged = len(self.keys)

    def candidates(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(query index, id)`` pairs that may be within the distance (a superset, with repeats)."""
        owners, ids = [], []
        for c in range(N_CHUNKS):
            probes = (_chunk(queries, c)[:, None] ^ self._probes[None, :]).ravel()
            found, j = _gather(self._ids[c], self._starts[c][probes], self._starts[c][probes + 1])
            owners.append(j // len(self._probes))
            ids.append(found)
        buffered = np.arange(self._merged, len(self.keys))
        owners.append(np.repeat(np.arange(len(queries)), len(buffered)))
        ids.append(np.tile(buffered, len(queries)))
        return np.concatenate(owners), np.concatenate(ids)

    def matches(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every ``(query index, id, distance)`` within ``max_distance``, sorted by query, distance, id."""
        owner, ids = self.candidates(queries)
        dist = hamming(self._hashes[ids], queries[owner])
        keep = dist <= self.max_distance
        owner, ids, dist = owner[keep], ids[keep], dist[keep]
        order = np.lexsort((ids, dist, owner))
        return owner[order], ids[order], dist[order]

    def nearest(
        self, queries: np.ndarray, query_keys: list[str] | None = None
    ) -> list[tuple[str, int] | None]:
        """Per query, ``(key, distance)`` of the nearest hash within the distance (the earliest
        added among equals), never one stored under the query's own key; else None."""
        out: list[tuple[str, int] | None] = [None] * len(queries)
        if not len(self.keys) or not len(queries):
            return out
        for q, i, d in zip(*self.matches(np.asarray(queries, np.uint64)), strict=True):
            key = self.keys[i]
            if out[q] is None and (query_keys is None or key != query_keys[q]):
                out[q] = (key, int(d))
        return out


def read_hash_file(path: str) -> tuple[np.ndarray, list[str]]:
    """An exclusion file -> ``(hashes, names)``: one ``HEX [name]`` per line; ``#`` comments.

    Raises:
        ValueError: a line whose first word is not a 16-digit hex hash (file and line named).
    """
    hashes, names = [], []
    with storage.open_file(path, "rb") as f:
        for n, raw in enumerate(io.TextIOWrapper(f, "utf-8"), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            hex_hash, *name = line.split(None, 1)
            try:
                hashes.append(phash_to_int(hex_hash))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from e
            names.append(name[0] if name else hex_hash)
    return np.array(hashes, np.uint64), names


class DedupConfig(Section):
    """``dedup:`` near-duplicate images (perceptual hash) and eval-set decontamination."""

    enabled: bool = Field(True, description="false: no dedup stage at all (image.phash is still written)")
    max_distance: int | None = Field(
        4,
        ge=0,
        le=16,
        description="an image within this many bits (of 64) of an earlier image's phash fails as "
        "near_duplicate; 0 or null: no near-duplicate check",
    )
    exclude_hashes: str | None = Field(
        None,
        description="file of phashes to keep out (one hex per line, e.g. COCO/LVIS val: "
        "python -m ssam.stages.dedup hash-folder DIR); matches fail as eval_overlap",
    )
    exclude_max_distance: int = Field(
        4, ge=0, le=16, description="bits within which an image matches an exclude_hashes entry"
    )

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.max_distance or self.exclude_hashes)


class DedupStage(Stage):
    """Marks near-duplicates of earlier images and eval-set images; writes no column.

    Args:
        cfg: the ``dedup:`` section.
        state_dir: where the kept hashes are logged (``RUN/work/dedup``; local or object storage).
    """

    name = "dedup"
    reads = (*ROW_COLUMNS, "phash")

    def __init__(self, cfg: DedupConfig, state_dir: str):
        self.cfg, self.state_dir = cfg, state_dir
        on = cfg.enabled
        self.index = HammingIndex(cfg.max_distance) if on and cfg.max_distance else None
        self.exclude = None
        if on and cfg.exclude_hashes:
            self.exclude = HammingIndex(cfg.exclude_max_distance)
            self.exclude.add(*read_hash_file(cfg.exclude_hashes))
        self._seq = self._load_log() if self.index is not None else 0

    def _load_log(self) -> int:
        """Add every hash kept before (this run, earlier invocations) to the index; return the next
        log sequence number."""
        files = storage.glob(storage.join(self.state_dir, "*.parquet"))
        seen: set[str] = set()
        for path in files:
            with storage.open_file(path, "rb") as f:
                table = pq.read_table(f)
            keys, hashes = table.column("key").to_pylist(), table.column("phash").to_numpy()
            fresh = [i for i, k in enumerate(keys) if k not in seen]
            seen.update(keys)
            self.index.add(hashes[fresh], [keys[i] for i in fresh])
        last = max((int(storage.name(p).split("-")[0]) for p in files), default=-1)
        if len(files) > COMPACT_ABOVE:  # one file instead of many: the next start reads one object
            self._seq = last
            written = self._log(self.index.keys, self.index.hashes, "all")
            for path in files:
                if path != written:
                    storage.rm(path)
        return last + 1

    def _log(self, keys: list[str], hashes: np.ndarray, digest: str = "") -> str:
        """Persist kept hashes before their rows leave the stage (atomic). Loading reads the files
        in name order and keeps each key's first entry, so a retry or an interrupted compaction
        changes nothing."""
        buf = io.BytesIO()
        pq.write_table(pa.table({"key": keys, "phash": hashes}, schema=LOG_SCHEMA), buf)
        digest = digest or hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
        path = storage.join(self.state_dir, f"{self._seq:08d}-{digest}.parquet")
        storage.makedirs(self.state_dir)
        storage.write_bytes(path, buf.getvalue())
        self._seq += 1
        return path

    def verdicts(self, keys: list[str], hashes: np.ndarray) -> dict[int, RowFailure]:
        """Failures by position for rows in the order given; kept rows are logged and indexed."""
        failed: dict[int, RowFailure] = {}
        if self.exclude is not None:
            for j, hit in enumerate(self.exclude.nearest(hashes)):
                if hit:
                    failed[j] = RowFailure("eval_overlap", f"matches {hit[0]} (Hamming distance {hit[1]})")
        if self.index is None:
            return failed
        todo = [j for j in range(len(keys)) if j not in failed]
        earlier = self.index.nearest(hashes[todo], [keys[j] for j in todo])
        kept: list[int] = []
        for j, hit in zip(todo, earlier, strict=True):
            if kept:  # an earlier row of this batch, if nearer than the index's match
                d = hamming(hashes[kept], hashes[j])
                k = int(np.argmin(d))
                if d[k] <= self.index.max_distance and (hit is None or d[k] < hit[1]):
                    hit = (keys[kept[k]], int(d[k]))
            if hit is None:
                kept.append(j)
            else:
                failed[j] = RowFailure("near_duplicate", f"kept {hit[0]} (Hamming distance {hit[1]})")
        if kept:
            self._log([keys[j] for j in kept], hashes[kept])
            self.index.add(hashes[kept], [keys[j] for j in kept])
        return failed

    def process(self, out: dict[str, list]) -> None:
        rows = sorted((i for i in ok_indices(out) if out["phash"][i]), key=lambda i: str(out["key"][i]))
        hashes = np.array([phash_to_int(out["phash"][i]) for i in rows], np.uint64)
        failed = self.verdicts([str(out["key"][i]) for i in rows], hashes)
        by_row = {rows[j]: f for j, f in failed.items()}

        def one(i):
            if i in by_row:
                raise by_row[i]
            return {}

        map_rows(out, self.name, one, {})


# ---------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def hash_folder(folder: str | Path, decode: DecodeConfig | None = None):
    """Yield ``(relative path, phash or None)`` for every image under ``folder``, decoded exactly
    as the decode stage does (so the hashes match the pipeline's)."""
    c = decode or DecodeConfig()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            img = decode_image(path.read_bytes(), c.max_pixels, 1, c.image_size)
        except RowFailure:
            yield path.relative_to(root).as_posix(), None
            continue
        yield path.relative_to(root).as_posix(), image_phash(img)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssam.stages.dedup", description="perceptual hashes for dedup.exclude_hashes"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("hash-folder", help="print 'PHASH relative/path' for every image under DIR")
    hf.add_argument("folder", help="folder of images (searched recursively)")
    hf.add_argument(
        "--image-size", type=int, default=DecodeConfig().image_size, help="the run's decode.image_size"
    )
    args = parser.parse_args(argv)
    for rel, phash in hash_folder(args.folder, DecodeConfig(image_size=args.image_size)):
        if phash is None:
            print(f"skipped, not a decodable image: {rel}", file=sys.stderr)
        else:
            print(f"{phash} {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
