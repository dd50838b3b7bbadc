"""Input and output in object storage: a real S3 endpoint (moto's server) on loopback."""

import io

import httpserver
import imagefiles
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from s3server import S3Server

from ssam import storage
from ssam.format import PARTS_DIR, complete_shards, iter_run_samples, validate_run
from ssam.pipeline.cli import main
from ssam.pipeline.config import load_config
from ssam.pipeline.run import run_pipeline

SMOKE = REPO / "configs/pipeline/smoke.yaml"


@pytest.fixture
def s3(monkeypatch):
    import fsspec

    with S3Server() as srv:
        for k, v in srv.env.items():
            monkeypatch.setenv(k, v)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bkt")
        yield srv
    fsspec.filesystem("s3").clear_instance_cache()


def put_pairs(urls: list[str], path: str) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"a dog and a cat {i}" for i in range(len(urls))]}), buf)
    storage.write_bytes(path, buf.getvalue())


def run_cfg(inp: str, out: str, *extra: str):
    return load_config(
        SMOKE,
        [f"input.path={inp}", f"output.dir={out}", "download.allow_private_hosts=true",
         "output.samples_per_shard=2", *extra],
    )  # fmt: skip


def test_input_and_output_on_s3(s3, tmp_path):
    routes = {f"/{i}.jpg": (200, "image/jpeg", imagefiles.jpeg(100 + 20 * i)) for i in range(4)}
    with httpserver.ImageServer(routes) as srv:
        urls = [srv.url(f"/{i}.jpg") for i in range(4)] + [srv.url("/missing.jpg")]
        put_pairs(urls, "s3://bkt/laion/part-0.parquet")
        cfg = run_cfg("s3://bkt/laion/*.parquet", "s3://bkt/runs/one", "ray.executor=local")
        summary = run_pipeline(cfg, log=lambda m: None)
        t = summary.totals
        assert (t["input_rows"], t["written"], t["by_reason"]) == (5, 4, {"download_failed": 1})
        run = "s3://bkt/runs/one"
        assert complete_shards(f"{run}/shards") == [0, 1, 2] and validate_run(run) == []
        assert sorted(k for k, _, _ in iter_run_samples(run)) == sorted(
            pq.read_table(io.BytesIO(storage.read_bytes(f"{run}/downloads/00000.parquet")))
            .column("key")
            .to_pylist()
            + pq.read_table(io.BytesIO(storage.read_bytes(f"{run}/downloads/00001.parquet")))
            .column("key")
            .to_pylist()
        )
        assert not storage.listdir(f"{run}/shards/{PARTS_DIR}")  # every part removed after its shard
        assert storage.read_json(f"{run}/manifest.json")["finished"] is True
        assert main(["validate", run]) == 0
        assert main(["show", run, "--out", str(tmp_path / "overlays")]) == 0
        assert len(list((tmp_path / "overlays").glob("*.png"))) == 4

        # A shard whose marker is gone is incomplete: it alone is redone, from the cached download.
        storage.rm(f"{run}/shards/00001.stats.json")
        manifest = storage.read_json(f"{run}/manifest.json")
        storage.write_json(f"{run}/manifest.json", dict(manifest, finished=False))
        again = run_pipeline(cfg, log=lambda m: None)
        assert again.shards_written_now == [1] and validate_run(run) == []
        assert again.totals["written"] == 4 and len(list(iter_run_samples(run))) == 4


@pytest.mark.slow
def test_ray_workers_write_shards_to_s3(s3):
    import ray

    routes = {f"/{i}.jpg": (200, "image/jpeg", imagefiles.jpeg(100 + 20 * i)) for i in range(4)}
    ray.shutdown()
    ray.init(include_dashboard=False, runtime_env={"env_vars": dict(s3.env)})  # the workers' credentials
    try:
        with httpserver.ImageServer(routes) as srv:
            put_pairs([srv.url(f"/{i}.jpg") for i in range(4)], "s3://bkt/in.parquet")
            summary = run_pipeline(run_cfg("s3://bkt/in.parquet", "s3://bkt/runs/ray"), log=lambda m: None)
    finally:
        ray.shutdown()
    assert summary.totals["written"] == 4 and validate_run("s3://bkt/runs/ray") == []
    assert len(list(iter_run_samples("s3://bkt/runs/ray"))) == 4
