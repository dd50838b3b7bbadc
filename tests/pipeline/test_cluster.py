"""The same pipeline on a Ray cluster of several nodes (started on this machine by the test), one of
them removed mid-run. (tests/pipeline/test_jobs.py spreads a run over two nodes started with ``ray
start``.)"""

import pytest
from conftest import REPO

from ssam.format import iter_run_samples, validate_run
from ssam.pipeline.config import load_config
from ssam.pipeline.run import run_pipeline


@pytest.fixture
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=3), c.add_node(num_cpus=3)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.mark.cluster
def test_a_worker_node_removed_mid_run_loses_and_duplicates_nothing(three_nodes, tmp_path):
    # Two worker nodes share the work; once the first shard is written, one of them is removed
    # (its raylet and workers killed). The run finishes on the other node -- or, if it cannot,
    # a rerun completes it -- with every row accounted for exactly once.
    cluster, nodes = three_nodes
    cfg = load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [
            f"output.dir={tmp_path / 'run'}",
            f"input.path={REPO / 'sample/pairs.parquet'}",
            f"ray.address={cluster.address}",
            "output.samples_per_shard=2",
            "ray.masks.max_workers=2",
            "ray.labels.max_workers=2",
        ],
    )
    removed = []

    def log(msg: str) -> None:
        if msg.startswith("shard ") and not removed:
            removed.append(nodes[0])
            cluster.remove_node(nodes[0])

    try:
        summary = run_pipeline(cfg, log=log)
    except Exception:  # noqa: BLE001 -- the documented recovery: run again
        summary = run_pipeline(cfg, log=lambda m: None)
    assert removed, "no shard was written before the node went"
    assert summary.totals["input_rows"] == summary.totals["written"] + summary.totals["failed"] == 12
    keys = [k for k, _, _ in iter_run_samples(tmp_path / "run")]
    assert len(keys) == len(set(keys)) == summary.totals["written"]
    assert validate_run(tmp_path / "run") == []
