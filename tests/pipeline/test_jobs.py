"""The path a user takes on a cluster: ``ray start`` (head + two worker nodes), then ``ray job
submit`` of ``ssam-pipeline run`` from the project's own environment, with token authentication;
the work spreads over both worker nodes."""

import json
import subprocess

import pytest
from conftest import REPO
from raycluster import BIN, RayCliCluster

from ssam.format import iter_run_samples, validate_run


@pytest.fixture
def cli_cluster():
    # The head only drives (0 CPUs); each worker node has two CPUs and a resource of its own.
    c = RayCliCluster(
        [{"num_cpus": 2, "resources": {"node_a": 1}}, {"num_cpus": 2, "resources": {"node_b": 1}}]
    ).start()
    yield c
    c.stop()
    assert c.processes() == [], "cluster processes left running"


def submit(c: RayCliCluster, *entrypoint: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            c.dashboard_url,
            "--working-dir",
            ".",
            "--",
            *entrypoint,
        ],
        cwd=REPO,
        env=env or c.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.cluster
def test_ray_job_submit_runs_the_pipeline_on_a_cli_started_cluster(cli_cluster, tmp_path):
    # The head has no CPU, masks may only run where node_a is, labels where node_b is, and the
    # download runs as Ray tasks: the job can finish only if both worker nodes did their part.
    out = tmp_path / "run"
    job = submit(
        cli_cluster,
        "ssam-pipeline", "run", "configs/pipeline/smoke.yaml", "--output", str(out),
        "--set", "ray.masks.resources={node_a: 1}", "--set", "ray.labels.resources={node_b: 1}",
        "--set", "download.distributor=ray", "--set", "output.samples_per_shard=6",
    )  # fmt: skip
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "input rows 12 = written 12 + failed 0  (adds up)" in log
    assert validate_run(out) == [] and len(list(iter_run_samples(out))) == 12
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["totals"]["written"] == 12

    # Token auth is enforced: the same submission with a wrong token is refused.
    bad = submit(
        cli_cluster, "echo", "hello", env={**cli_cluster.env, "RAY_AUTH_TOKEN": "0" * 32}, timeout=120
    )
    assert bad.returncode != 0 and "auth" in (bad.stdout + bad.stderr).lower()
