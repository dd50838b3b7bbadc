"""The data plane: shards written by the workers (the driver sees only keys) while the download
runs, labelling that starts with the first downloaded shard, a killed actor survived, and parts
that stay exactly-once under retries."""

import json
import re
from pathlib import Path

import httpserver
import imagefiles
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from ssam.format import PARTS_DIR, iter_run_samples, remove_incomplete, validate_run
from ssam.pipeline import run as run_mod
from ssam.pipeline.config import load_config
from ssam.pipeline.run import run_pipeline
from ssam.stages.common import OK
from ssam.stages.write import PART_SCHEMA, ShardTracker, finalize_shard, part_dir, write_parts
from ssam.weights import WeightsUnavailable

SMOKE = REPO / "configs/pipeline/smoke.yaml"


def pairs(tmp_path, urls):
    path = tmp_path / "pairs.parquet"
    n = len(urls)
    pq.write_table(
        pa.table({"URL": urls, "TEXT": [f"a photo of a dog {i}" for i in range(n)], "WIDTH": [640] * n,
                  "HEIGHT": [480] * n}),
        path,
    )  # fmt: skip
    return path


def _children_running(fragment: str) -> list:
    """This process's descendants whose command line holds ``fragment`` (only this test's Ray and
    download, not another on the machine); one that exits while listed is passed over."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if fragment in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_labelling_starts_before_the_download_ends(tmp_path):
    # Three shards of two photos; the last shard's photos are served 12 s late, so the download
    # cannot end before the first shard could be labelled and written -- if the graph streams.
    routes = {f"/{i}.jpg": (200, "image/jpeg", imagefiles.jpeg(120 + 10 * i)) for i in range(6)}
    with httpserver.ImageServer(routes, {"/4.jpg": 12.0, "/5.jpg": 12.0}) as srv:
        cfg = load_config(
            SMOKE,
            [
                f"input.path={pairs(tmp_path, [srv.url(f'/{i}.jpg') for i in range(6)])}",
                f"output.dir={tmp_path / 'run'}",
                "download.allow_private_hosts=true",
                "download.timeout_s=30",
                "output.samples_per_shard=2",
                "ray.executor=local",
            ],
        )
        lines = []
        summary = run_pipeline(cfg, log=lines.append)
    assert summary.totals["written"] == 6
    assert summary.overlap["first_shard"] < summary.overlap["download_end"], summary.overlap
    assert any(line.startswith("first shard written after") for line in summary.lines())


def test_a_failed_graph_stops_the_download_instead_of_waiting_for_it_and_a_rerun_completes(tmp_path):
    # The labels stage cannot start (its CLIP checkpoint is corrupt) while the last shard's photos
    # are still held by the server: the run fails at once with that error, img2dataset is stopped,
    # not waited for, and a rerun with the checkpoint replaced downloads what is missing and writes
    # every row.
    import torch

    from ssam.model.clip import load_clip

    routes = {f"/{i}.jpg": (200, "image/jpeg", imagefiles.jpeg(120 + 10 * i)) for i in range(6)}
    overrides = [
        f"output.dir={tmp_path / 'run'}",
        "download.allow_private_hosts=true",
        "download.timeout_s=120",
        "output.samples_per_shard=2",
        "ray.executor=local",
    ]
    with httpserver.ImageServer(routes, held={"/4.jpg", "/5.jpg"}, hold_s=90) as srv:
        urls = [srv.url(f"/{i}.jpg") for i in range(6)]
        overrides.append(f"input.path={pairs(tmp_path, urls)}")
        corrupt = tmp_path / "clip.pt"
        corrupt.write_bytes(b"not a checkpoint")
        cfg = load_config(SMOKE, [*overrides, f"labels.clip_pretrained={corrupt}"])
        with pytest.raises(WeightsUnavailable, match=re.escape(f"CLIP ssam-smoke-clip/{corrupt}")):
            run_pipeline(cfg, log=lambda msg: None)
        assert srv.held_too_long == 0, "the failed run waited for the held downloads"
        assert _children_running("ssam.pipeline.download_process") == [], "img2dataset still runs"
        srv.release()
        # the checkpoint copied again, whole this time: the same configuration, so the run resumes
        torch.save(load_clip("ssam-smoke-clip", None).model.state_dict(), corrupt)
        summary = run_pipeline(cfg, log=lambda msg: None)
    assert summary.totals["input_rows"] == summary.totals["written"] == 6
    assert validate_run(tmp_path / "run") == []


def _row(key: str, sid: int, ok: bool) -> dict:
    return {
        "key": key, "shard_id": sid, "url": f"http://x/{key}.jpg", "caption": "a dog", "sha256": "",
        "status": OK if ok else "decode_failed", "fail_stage": "" if ok else "decode",
        "fail_detail": "" if ok else "truncated", "jpeg": imagefiles.jpeg(64) if ok else b"",
        "width": 64, "height": 64, "candidates_json": "[]", "annotations_json": "[]", "emb": b"",
        "t_decode": 0.01, "t_candidates": 0.0, "t_masks": 0.0, "t_labels": 0.0,
    }  # fmt: skip


def _batch(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_parts_are_exactly_once_under_retries_and_removed_when_interrupted(tmp_path):
    shards = tmp_path / "shards"
    a = [_row("000000000", 0, True), _row("000000001", 0, False)]
    b = [_row("000000002", 0, True)]
    tracker = ShardTracker({0: 3})
    assert tracker.add(write_parts(_batch(a), str(shards), {"smoke": True})) == []
    # A retried task writes the same rows again: the same part name, no second copy, no new keys.
    assert tracker.add(write_parts(_batch(a), str(shards), {"smoke": True})) == []
    assert len(list(Path(part_dir(shards, 0)).glob("*.parquet"))) == 1
    assert tracker.add(write_parts(_batch(b), str(shards), {"smoke": True})) == [0]
    assert pq.read_schema(next(Path(part_dir(shards, 0)).glob("*.parquet"))) == PART_SCHEMA
    tracker.record(finalize_shard(str(shards), 0, {"smoke": True}))
    assert tracker.missing() == {} and tracker.outcomes == {"written": 2, "decode_failed": 1}
    keys = [k for k, _, _ in iter_run_samples(tmp_path)]
    assert keys == ["000000000", "000000002"]
    failures = pq.read_table(shards / "00000.failures.parquet").to_pylist()
    assert [(f["key"], f["reason"]) for f in failures] == [("000000001", "decode_failed")]
    assert not Path(part_dir(shards, 0)).exists()
    # The task retried after its first attempt committed (its node died before it returned, the
    # parts half deleted): the shard stands, with all its rows.
    write_parts(_batch(b), str(shards), {"smoke": True})
    again = finalize_shard(str(shards), 0, {"smoke": True})
    assert again["outcomes"] == {"written": 2, "decode_failed": 1}
    assert [k for k, _, _ in iter_run_samples(tmp_path)] == ["000000000", "000000002"]
    assert not Path(part_dir(shards, 0)).exists()

    # An interrupted run leaves parts of shard 1: they are removed before the next run, as is
    # any shard file without its commit marker.
    write_parts(_batch([_row("000010000", 1, True)]), str(shards), {"smoke": True})
    removed = remove_incomplete(shards)
    assert removed == [f"{PARTS_DIR}/00001"] and not (shards / PARTS_DIR).exists()
    assert (shards / "00000.stats.json").exists()


@pytest.mark.slow
def test_workers_write_the_shards_and_a_killed_masks_actor_loses_no_row(tmp_path, ray_loopback, monkeypatch):
    """Ray executor: shards are written while the download runs, by the workers (the driver sees
    only the parts' keys); the masks actor, killed once the first shard is written, is restarted
    and every row is written once.

    The last three shards' photos are held by the server until then, so the download cannot end
    first, and the masks actor is alive at the kill with rows still to come (unheld, it could
    finish them all and be retired before the first shard is reported: nothing to kill).
    """
    import os
    import signal

    routes = {f"/{i}.jpg": (200, "image/jpeg", imagefiles.jpeg(120 + 10 * i)) for i in range(12)}
    seen_columns, received, killed = set(), [], []

    class Recording(ShardTracker):
        def add(self, parts):
            seen_columns.update(parts)
            received.append(sum(len(json.dumps([str(v) for v in vs])) for vs in parts.values()))
            return super().add(parts)

    monkeypatch.setattr(run_mod, "ShardTracker", Recording)
    held = {f"/{i}.jpg" for i in range(6, 12)}
    with httpserver.ImageServer(routes, held=held, hold_s=150) as srv:

        def log(msg: str) -> None:
            if msg.startswith("shard ") and not killed:
                for p in _children_running("MapBatches(MaskStage)"):
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                srv.release()

        cfg = load_config(
            SMOKE,
            [
                f"input.path={pairs(tmp_path, [srv.url(f'/{i}.jpg') for i in range(12)])}",
                f"output.dir={tmp_path / 'run'}",
                "download.allow_private_hosts=true",
                "download.timeout_s=300",  # longer than the holds
                "output.samples_per_shard=2",
                # A batch is a shard here: a stage waits for a whole batch (the smoke config's 4
                # rows, the write tasks' 64) while rows are still to come, held rows included.
                *(f"ray.{s}.batch_size=2" for s in ("decode", "candidates", "masks", "labels", "write")),
            ],
        )
        summary = run_pipeline(cfg, log=log)
    assert killed, "the masks actor was not found"
    # the first shard was reported while rows were still held (not once the holds ran out)
    assert srv.held_too_long == 0, "no shard was reported until the held downloads timed out"
    # under Ray too, labelling and writing do not wait for the download to end
    assert summary.overlap["first_shard"] < summary.overlap["download_end"], summary.overlap
    assert summary.totals["input_rows"] == summary.totals["written"] == 12
    keys = [k for k, _, _ in iter_run_samples(tmp_path / "run")]
    assert len(keys) == len(set(keys)) == 12 and validate_run(tmp_path / "run") == []
    # The driver received the parts' keys and names, never a row's image, masks or embedding.
    assert seen_columns == {"shard_id", "part", "keys_json"}
    output = sum(p.stat().st_size for p in (tmp_path / "run/shards").iterdir())
    assert sum(received) < 0.01 * output
    assert not (tmp_path / "run/shards" / PARTS_DIR).exists()  # parts are gone once shards are written


def test_the_driver_polls_for_written_shards_while_the_graph_output_waits_and_gets_its_errors(ray_loopback):
    # The driver learns that a shard's write task ended by polling; it must keep polling while the
    # graph's next output is still to come (rows waiting for their download), and an error of the
    # graph must still reach it.
    import time

    import ray

    from ssam.pipeline.graph import _batches_while_polling

    def slow(batch):
        time.sleep(2)
        if batch["id"][0] == 3:
            raise ValueError("row 3 is bad")
        return batch

    ds = ray.data.range(4, override_num_blocks=4).map_batches(slow, batch_size=1, num_cpus=1)
    polls, got = [], []
    with pytest.raises(Exception, match="row 3 is bad"):
        for batch in _batches_while_polling(ds, lambda: polls.append(time.monotonic()), every_s=0.1):
            got.extend(batch["id"].tolist())
    assert len(polls) >= 10, polls  # ~2 s waited before the first output
    assert set(got) <= {0, 1, 2}
