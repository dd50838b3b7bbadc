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
