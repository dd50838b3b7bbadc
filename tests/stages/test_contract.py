"""The stage contract: declared columns, checked once per batch; each stage its own batch size."""

from __future__ import annotations

import pytest

from ssam.pipeline.graph import STAGES, _run_chain, stage_args
from ssam.stages.common import ROW_COLUMNS, Stage, StageContractError
from ssam.stages.decode import DecodeStage
from ssam.stages.download import SHARD_COLUMNS


def test_each_stage_reads_only_what_earlier_stages_wrote():
    available = set(SHARD_COLUMNS)
    for name, cls in STAGES:
        assert cls.name == name and cls.reads, f"{name} declares no columns"
        assert set(cls.reads) <= available, (
            f"{name} reads {set(cls.reads) - available}, not written before it"
        )
        available = (available | set(cls.writes)) - set(cls.drops)
    assert {"jpeg", "width", "height", "candidates_json", "annotations_json", "emb"} <= available
    assert "image" not in available  # the raw bytes are dropped after decoding


def test_each_stage_takes_its_own_section(smoke_cfg):
    for name, _ in STAGES:
        args = stage_args(smoke_cfg, name)
        assert args[0] is getattr(smoke_cfg, name)


def test_a_missing_column_stops_the_batch_with_its_name(smoke_cfg):
    stage = DecodeStage(smoke_cfg.decode)
    batch = {"key": ["a"], "status": ["ok"], "fail_stage": [""], "fail_detail": [""]}
    with pytest.raises(StageContractError, match=r"'decode' reads columns \['image'\]"):
        stage(batch)


class Recorder(Stage):
    name = "recorder"
    reads = ROW_COLUMNS
    writes = ("seen",)

    def __init__(self):
        self.sizes: list[int] = []

    def process(self, out):
        self.sizes.append(len(out["key"]))
        out["seen"] = [len(out["key"])] * len(out["key"])


def test_a_stage_that_forgets_a_declared_column_is_caught():
    class Forgetful(Recorder):
        def process(self, out):
            pass

    with pytest.raises(StageContractError, match="seen"):
        Forgetful()({c: ["x"] for c in ROW_COLUMNS})


def test_local_executor_gives_each_stage_its_own_batch_size():
    first, second = Recorder(), Recorder()
    batch = {c: [f"{c}{i}" for i in range(10)] for c in ROW_COLUMNS}
    out = _run_chain([(first, 4), (second, 3)], batch)
    assert first.sizes == [4, 4, 2] and second.sizes == [3, 3, 3, 1]
    assert out["key"] == batch["key"]  # every row, in order
    assert len(out["t_recorder"]) == 10


class Flaky(Stage):
    """Raises on the whole batch for its first ``fails`` calls (a model call, not a row)."""

    name, reads, writes = "flaky", ("key",), ("out",)

    def __init__(self, fails: int):
        self.fails = fails

    def process(self, batch):
        batch["out"] = [f"{k}!" for k in batch["key"]]  # written before the failure: must not leak
        if self.fails:
            self.fails -= 1
            raise RuntimeError("device lost")


def _rows():
    return {
        "key": ["a", "b", "c"],
        "status": ["ok", "decode_failed", "ok"],
        "fail_stage": ["", "decode", ""],
        "fail_detail": ["", "truncated", ""],
    }


def test_a_batch_that_raises_is_retried_then_its_rows_become_failure_records():
    once = Flaky(fails=1)(_rows())
    assert once["status"] == ["ok", "decode_failed", "ok"] and once["out"] == ["a!", "b!", "c!"]

    always = Flaky(fails=99)(_rows())
    assert always["status"] == ["stage_error", "decode_failed", "stage_error"]
    assert always["fail_stage"] == ["flaky", "decode", "flaky"]
    assert always["fail_detail"][0] == "batch of 3 failed 2 times: RuntimeError: device lost"
    assert always["fail_detail"][1] == "truncated"  # an earlier failure keeps its own record
    assert always["out"] == [None, None, None]  # the declared column exists, half-written values do not


def test_a_stage_that_always_raises_does_not_stop_the_run(tmp_path, monkeypatch):
    from conftest import REPO

    from ssam.format import iter_run_samples
    from ssam.pipeline.config import load_config
    from ssam.pipeline.run import run_pipeline
    from ssam.stages.labels import LabelStage

    def broken(self, batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(LabelStage, "process", broken)
    cfg = load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [
            f"output.dir={tmp_path / 'run'}",
            f"input.path={REPO / 'sample/pairs.parquet'}",
            "ray.executor=local",
        ],
    )
    summary = run_pipeline(cfg, log=lambda m: None)
    assert summary.totals["input_rows"] == 12 and summary.totals["by_reason"] == {"stage_error": 12}
    assert list(iter_run_samples(tmp_path / "run")) == []
