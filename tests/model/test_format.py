import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from ssam.format import (
    Failure,
    Sample,
    ShardContent,
    complete_shards,
    iter_tar_samples,
    remove_incomplete,
    validate_sample,
    validate_shard,
    write_shard,
)


def _ann(i, h=8, w=10, label="cup"):
    m = np.zeros((h, w), np.uint8, order="F")
    m[2:5, 3:7] = 1
    rle = mask_utils.encode(m)
    return {
        "id": i,
        "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
        "bbox": [3.0, 2.0, 4.0, 3.0],
        "area": 12,
        "predicted_iou": 0.9,
        "stability_score": 0.95,
        "point_coords": [[4.0, 3.0]],
        "crop_box": [0.0, 0.0, float(w), float(h)],
        "label": label,
        "label_score": 0.5,
        "topk": [],
    }


def _sample(key, n_ann=2):
    meta = {
        "image": {
            "image_id": int(key),
            "key": key,
            "file_name": f"{key}.jpg",
            "width": 10,
            "height": 8,
            "url": "http://x/y.jpg",
            "caption": "a cup",
            "sha256": "0" * 64,
        },
        "candidates": [{"label": "cup", "source": "caption"}],
        "annotations": [_ann(i, label=None if i else "cup") for i in range(n_ann)],
        "provenance": {"sam": {"name": "smoke"}, "smoke": True, "pipeline_version": "0.1.0"},
    }
    emb = np.eye(n_ann, 4, dtype=np.float16)
    return Sample(key, b"\xff\xd8jpeg", meta, emb)


def test_shard_round_trip(tmp_path):
    content = ShardContent(
        3,
        [_sample("0030"), _sample("0031", 1)],
        [Failure("0032", "http://x", "decode", "decode_failed", "html")],
        {"outcomes": {"written": 2, "decode_failed": 1}},
    )
    write_shard(tmp_path, content)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00003.failures.parquet",
        "00003.parquet",
        "00003.stats.json",
        "00003.tar",
    ]
    assert validate_shard(tmp_path, 3) == []
    samples = list(iter_tar_samples(tmp_path / "00003.tar"))
    assert [s["__key__"] for s in samples] == ["0030", "0031"]
    assert json.loads(samples[0]["json"]) == content.samples[0].meta
    assert set(samples[0]) == {"__key__", "jpg", "json", "emb.npy"}
    rows = pq.read_table(tmp_path / "00003.parquet").to_pylist()
    assert [(r["key"], r["ann_id"], r["label"]) for r in rows] == [
        ("0030", 0, "cup"),
        ("0030", 1, None),
        ("0031", 0, "cup"),
    ]
    assert pq.read_table(tmp_path / "00003.failures.parquet").to_pylist()[0]["reason"] == "decode_failed"
    stats = json.loads((tmp_path / "00003.stats.json").read_text())
    assert stats["samples"] == 2 and stats["annotations"] == 3 and stats["failures"] == 1


def test_invalid_sample_publishes_nothing(tmp_path):
    bad = _sample("0001")
    bad.meta["annotations"][0]["area"] = 999
    with pytest.raises(ValueError, match="area 999"):
        write_shard(tmp_path, ShardContent(0, [_sample("0000"), bad]))
    assert list(tmp_path.iterdir()) == []


def test_incomplete_shards_are_invisible_and_removed(tmp_path):
    write_shard(tmp_path, ShardContent(0, [_sample("0000")]))
    (tmp_path / "00001.tar").write_bytes(b"half")  # killed before its stats.json
    (tmp_path / ".tmp-00002-abcd").mkdir()
    assert complete_shards(tmp_path) == [0]
    assert sorted(remove_incomplete(tmp_path)) == [".tmp-00002-abcd", "00001.tar"]
    assert complete_shards(tmp_path) == [0] and validate_shard(tmp_path, 0) == []


def test_validator_reports_what_is_wrong():
    meta = _sample("0000").meta
    assert validate_sample(meta) == []
    broken = json.loads(json.dumps(meta))
    broken["annotations"][0]["segmentation"]["size"] = [9, 10]
    del broken["annotations"][1]["bbox"]
    errs = validate_sample(broken)
    assert any("size [9, 10]" in e for e in errs) and any("missing 'bbox'" in e for e in errs)
    assert validate_sample({"image": {}}) == [
        "missing top-level key 'candidates'",
        "missing top-level key 'annotations'",
        "missing top-level key 'provenance'",
    ]
    assert "shape" in validate_sample(meta, np.zeros((5, 4), np.float16))[0]


def test_sa1b_json_is_a_valid_unlabelled_sample():
    sa1b = {
        "image": {"image_id": 7, "width": 10, "height": 8, "file_name": "sa_7.jpg"},
        "annotations": [{k: v for k, v in _ann(0).items() if k not in ("label", "label_score", "topk")}],
    }
    assert validate_sample(sa1b, labelled=False) == []


def test_truncated_tar_is_reported(tmp_path):
    write_shard(tmp_path, ShardContent(0, [_sample("0000"), _sample("0001")]))
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[:700])
    assert any("tar" in e or "JSON" in e or "parquet" in e for e in validate_shard(tmp_path, 0))


def test_every_failure_reason_is_known_and_documented():
    """The reasons the code emits are the ones FAILURE_REASONS lists, and the README and FORMAT.md explain each."""
    import re

    from ssam.format import FAILURE_REASONS

    REPO = Path(__file__).resolve().parents[2]

    code = "\n".join(p.read_text() for d in ("stages", "pipeline", "model") for p in (REPO / d).glob("*.py"))
    emitted = set(re.findall(r'RowFailure\(\s*"([a-z_]+)"', code))
    emitted |= set(re.findall(r'return "([a-z_]+)", ', (REPO / "stages/filter.py").read_text()))
    emitted |= set(re.findall(r'"(gpu_oom|stage_error|download_failed)"', code))
    assert emitted and emitted <= set(FAILURE_REASONS), emitted - set(FAILURE_REASONS)
    readme, fmt = (REPO / "README.md").read_text(), (REPO / "docs/FORMAT.md").read_text()
    for reason in FAILURE_REASONS:
        assert f"`{reason}`" in readme and f"`{reason}`" in fmt, reason
