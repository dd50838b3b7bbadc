"""Download: img2dataset's Python API fetches the filtered pairs into image shards.

img2dataset does the fetching it is good at (thread pools, timeouts, retries, per-row
``status`` / ``error_message``, sha256, its Ray distributor on a cluster, incremental resume).
It is run with ``disable_all_reencoding`` so the original bytes are kept: decoding, EXIF
rotation, pixel limits and the resize to SAM's longest side happen in :mod:`.decode`, where
an unsafe image is refused before it is decoded.

:func:`read_shard_batch` turns one downloaded shard back into rows -- the successes with
their bytes, the failures with img2dataset's error message -- so every row reaches the writer.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from ssam import storage
from ssam.configio import Section

from .common import OK


def resolve_file_url(url: str, base_dir: Path) -> str:
    """``file:images/a.jpg`` (relative) -> ``file:///abs/base_dir/images/a.jpg``; others unchanged."""
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc or url.startswith("file:/"):
        return url
    return (base_dir / parsed.path).resolve().as_uri()


def downloaded_shards(download_dir: str | os.PathLike) -> dict[int, str]:
    """Shards img2dataset finished (its ``_stats.json`` is written last), by id: their stems."""
    done = {}
    for p in storage.glob(storage.join(download_dir, "*_stats.json")):
        stem = storage.name(p).split("_")[0]
        if stem.isdigit():
            done[int(stem)] = storage.join(download_dir, stem)
    return dict(sorted(done.items()))


class DownloadConfig(Section):
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
    allow_networks: list[str] = Field(
        [],
        description="CIDR networks treated as public, e.g. [10.20.0.0/16] for an internal image store",
    )
    allow_file_urls: bool = Field(
        False, description="allow file:// URLs (relative ones resolve against the parquet's folder)"
    )
    resolve_hosts: bool = Field(
        True, description="resolve host names to refuse those that point at private addresses"
    )
    user_agent_token: str | None = Field(
        "ssam-factory", description="token added to img2dataset's user agent"
    )
    disallowed_header_directives: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that make a site opt out",
    )


class Downloader:
    """Runs img2dataset over the prepared ``download_input.parquet``."""

    name = "download"

    def __init__(self, cfg: DownloadConfig, samples_per_shard: int, image_size: int):
        self.cfg = cfg
        self.samples_per_shard = samples_per_shard
        self.image_size = image_size

    def __call__(self, input_parquet: str | os.PathLike, download_dir: str | os.PathLike) -> dict[int, str]:
        from img2dataset import download

        with storage.open_file(input_parquet) as f:
            if pq.ParquetFile(f).metadata.num_rows == 0:
                return {}
        d = self.cfg
        started = time.perf_counter()
        download(
            url_list=str(input_parquet),
            input_format="parquet",
            url_col="fetch_url",
            caption_col="caption",
            save_additional_columns=["source_url", "src_index"],
            output_folder=str(download_dir),
            output_format="webdataset",
            processes_count=d.processes_count,
            thread_count=d.thread_count,
            number_sample_per_shard=self.samples_per_shard,
            timeout=d.timeout_s,
            retries=d.retries,
            distributor=d.distributor,
            disable_all_reencoding=True,
            image_size=self.image_size,
            compute_hash="sha256",
            extract_exif=False,
            incremental_mode="incremental",
            user_agent_token=d.user_agent_token,
            disallowed_header_directives=d.disallowed_header_directives,
            enable_wandb=False,
        )
        self.seconds = time.perf_counter() - started
        return downloaded_shards(download_dir)


# The columns of a downloaded shard's rows, as the first graph stage receives them.
SHARD_COLUMNS = (
    "key",
    "shard_id",
    "url",
    "caption",
    "sha256",
    "image",
    "status",
    "fail_stage",
    "fail_detail",
    "t_download",
)


def read_downloaded_shard(shard_stem: str | os.PathLike) -> dict[str, list]:
    """All rows of one img2dataset shard as a batch: ok rows with ``image`` bytes, failures marked."""
    with storage.open_file(f"{os.fspath(shard_stem)}.parquet") as f:
        table = pq.read_table(f).to_pylist()
    images: dict[str, bytes] = {}
    tar_error = ""
    try:
        with (
            storage.open_file(f"{os.fspath(shard_stem)}.tar") as f,
            tarfile.open(fileobj=f, mode="r|") as tar,
        ):
            for m in tar:
                if m.isfile() and m.name.endswith(".jpg"):
                    images[m.name[: -len(".jpg")]] = tar.extractfile(m).read()
    except (OSError, tarfile.TarError) as e:
        tar_error = f"image tar unreadable: {e}"
    shard_id = int(storage.name(shard_stem))
    out: dict[str, list] = {c: [] for c in SHARD_COLUMNS}
    for row in table:
        key = row["key"]
        ok = row["status"] == "success"
        data = images.get(key, b"") if ok else b""
        status, stage, detail = OK, "", ""
        if not ok:
            status, stage, detail = "download_failed", "download", str(row.get("error_message") or "unknown")
        elif key not in images:
            status, stage, detail = "download_failed", "download", tar_error or "image missing from tar"
        out["key"].append(key)
        out["shard_id"].append(shard_id)
        out["url"].append(row.get("source_url") or row.get("url") or "")
        out["caption"].append(row.get("caption") or "")
        out["sha256"].append(row.get("sha256") or "")
        out["image"].append(data)
        out["status"].append(status)
        out["fail_stage"].append(stage)
        out["fail_detail"].append(detail[:500])
        out["t_download"].append(0.0)
    return out


DOWNLOAD_DONE = "download.done.json"  # written beside the shards when img2dataset has returned


def expected_shards(n_rows: int, samples_per_shard: int) -> dict[int, int]:
    """The shards img2dataset makes of ``n_rows`` input rows, ``{id: rows}``: it cuts its input
    into consecutive runs of ``samples_per_shard`` rows, numbered from 0, and writes every row
    of a run (fetched or failed) into that shard's parquet."""
    n = -(-n_rows // samples_per_shard)
    return {i: min(samples_per_shard, n_rows - i * samples_per_shard) for i in range(n)}


def wait_for_shard(shard_stem: str | os.PathLike, poll_s: float = 0.5) -> None:
    """Block until img2dataset has finished shard ``shard_stem`` (its ``_stats.json`` exists).

    Raises:
        RuntimeError: the download ended (its done marker exists) without this shard, or failed.
    """
    folder, stem = storage.parent(shard_stem), storage.name(shard_stem)
    stats, done = storage.join(folder, f"{stem}_stats.json"), storage.join(folder, DOWNLOAD_DONE)
    while not storage.exists(stats):
        if storage.exists(done):
            if storage.exists(stats):
                break
            error = storage.read_json(done).get("error")
            raise RuntimeError(
                f"the download ended without shard {stem}"
                + (f": img2dataset failed: {error}" if error else "")
            )
        time.sleep(poll_s)


def read_shard_batch(batch: dict) -> dict[str, list]:
    """Ray Data UDF (a task): a batch of ``{"shard_stem": [...]}`` -> all rows of those shards,
    each read as soon as img2dataset has finished it (the download runs alongside the graph)."""
    parts = []
    for s in batch["shard_stem"]:
        wait_for_shard(s)
        parts.append(read_downloaded_shard(s))
    return {k: [v for p in parts for v in p[k]] for k in parts[0]} if parts else {}


def write_download_input(rows: dict[str, list], path: str | os.PathLike) -> int:
    """Write the ok rows img2dataset will fetch; return their count. Atomic (temp name, rename)."""
    keep = [i for i, s in enumerate(rows["status"]) if s == OK]
    table = pa.table(
        {
            "fetch_url": pa.array([rows["fetch_url"][i] for i in keep], pa.string()),
            "caption": pa.array([rows["caption"][i] for i in keep], pa.string()),
            "source_url": pa.array([rows["url"][i] for i in keep], pa.string()),
            "src_index": pa.array([rows["src_index"][i] for i in keep], pa.int64()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(path, buf.getvalue())
    return len(keep)
