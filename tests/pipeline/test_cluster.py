"""The same pipeline on a Ray cluster of several nodes (started on this machine by the test)."""

import pytest
from conftest import REPO

from ssam.format import iter_run_samples, validate_run
from ssam.pipeline.config import load_config
from ssam.pipeline.run import run_pipeline


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )  # head only drives
    c.add_node(num_cpus=1, resources={"node_a": 1})
    c.add_node(num_cpus=1, resources={"node_b": 1})
    c.wait_for_nodes()
    ray.init(address=c.address)
    assert c.address.startswith("127.0.0.1:") and ray.util.get_node_ip_address() == "127.0.0.1"
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.mark.cluster
def test_pipeline_spreads_over_a_multi_node_cluster(cluster, tmp_path):
    # The head has no CPU, masks may only run where node_a is, labels where node_b is: the run can
    # finish only if the worker nodes did the work, both of them.
    cfg = load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [
            f"output.dir={tmp_path / 'run'}",
            f"input.path={REPO / 'sample/pairs.parquet'}",
            f"ray.address={cluster.address}",
            "download.distributor=ray",
            "output.samples_per_shard=6",
            "ray.masks.resources={node_a: 1}",
            "ray.labels.resources={node_b: 1}",
        ],
    )
    summary = run_pipeline(cfg, log=lambda m: None)
    assert summary.totals["input_rows"] == summary.totals["written"] == 12
    assert validate_run(tmp_path / "run") == [] and len(list(iter_run_samples(tmp_path / "run"))) == 12
