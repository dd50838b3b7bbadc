"""Near-duplicates and eval decontamination: the hash, the index, the stage, resume, one local run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import imagefiles
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image
from skimage import data

from ssam.format import iter_run_samples, validate_run, validate_sample
from ssam.stages.decode import DecodeConfig, DecodeStage, image_phash
from ssam.stages.dedup import DedupConfig, DedupStage, HammingIndex, hamming, main, read_hash_file

SMOKE = REPO / "configs/pipeline/smoke.yaml"


def dist(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def reencode(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


# ---- the hash --------------------------------------------------------------------------------


def test_copies_of_a_photo_hash_close_and_other_photos_far():
    photo = Image.fromarray(data.astronaut())
    h = image_phash(photo)
    assert len(h) == 16 and h == image_phash(photo.copy())  # 64 bits, deterministic
    copies = [
        photo.resize((200, 200)),
        reencode(photo, 40),
        reencode(photo.resize((300, 300)), 70),
        photo.convert("L").convert("RGB"),
        photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).convert("RGB"),
    ]
    assert max(dist(h, image_phash(c)) for c in copies) <= 2
    others = [Image.fromarray(getattr(data, n)()) for n in ("chelsea", "coffee", "rocket", "camera", "horse")]
    hashes = [h] + [image_phash(o) for o in others]
    pairs = [dist(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(pairs) >= 12, pairs


def test_decode_writes_the_phash_of_the_stored_image():
    rows = {
        "key": ["a", "b"],
        "status": ["ok", "ok"],
        "fail_stage": [""] * 2,
        "fail_detail": [""] * 2,
        "image": [imagefiles.jpeg(300), b""],
    }
    out = DecodeStage(DecodeConfig())(rows)
    assert out["status"] == ["ok", "decode_failed"] and out["phash"][1] == ""
    stored = Image.open(io.BytesIO(out["jpeg"][0]))
    assert dist(out["phash"][0], image_phash(stored)) <= 2  # hashed before the JPEG encoding


def test_sample_validation_accepts_phash_or_none_and_refuses_junk():
    from runfixtures import synthetic_meta

    meta = synthetic_meta("000001", [], [None])
    assert validate_sample(meta) == []  # older shards: no phash
    meta["image"]["phash"] = "c2924c5532bddfc8"
    assert validate_sample(meta) == []
    meta["image"]["phash"] = "C2924C55"
    assert any("phash" in e for e in validate_sample(meta))


# ---- the index -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_distance", [0, 3, 4, 7])
def test_index_finds_every_hash_within_the_distance_and_nothing_beyond(max_distance):
    rng = np.random.default_rng(max_distance)
    stored = rng.integers(0, 2**63, 3000, dtype=np.uint64) << np.uint64(1)
    stored[1000:1100] = stored[:100] ^ np.uint64(0b1011)  # clusters: several matches per query
    index = HammingIndex(max_distance, merge_every=512)  # part merged into buckets, part in the buffer
    for s in range(0, len(stored), 700):
        index.add(stored[s : s + 700], [str(i) for i in range(s, min(len(stored), s + 700))])
    queries = stored[rng.integers(0, len(stored), 300)].copy()
    for j, q in enumerate(queries):  # flip 0..9 random bits of each
        for b in rng.choice(64, size=j % 10, replace=False):
            queries[j] = q ^ (np.uint64(1) << np.uint64(b))
            q = queries[j]
    owner, ids, got_d = index.matches(queries)
    got = set(zip(owner.tolist(), ids.tolist(), strict=True))
    d = hamming(stored[None, :], queries[:, None])  # brute force, 300 x 3000
    want = set(zip(*np.nonzero(d <= max_distance), strict=True))
    assert got == {(int(a), int(b)) for a, b in want}
    assert (got_d <= max_distance).all()
    nearest = index.nearest(queries)
    for j in range(len(queries)):
        m = d[j].min()
        expected = (str(int(np.flatnonzero(d[j] == m)[0])), int(m)) if m <= max_distance else None
        assert nearest[j] == expected  # nearest, the earliest among equals


def test_index_never_matches_a_query_with_its_own_key():
    index = HammingIndex(4)
    index.add(np.array([5, 7], np.uint64), ["a", "b"])
    assert index.nearest(np.array([5], np.uint64), ["a"]) == [("b", 1)]
    assert index.nearest(np.array([5], np.uint64), ["x"]) == [("a", 0)]


# ---- the stage -------------------------------------------------------------------------------


PHOTO = image_phash(Image.fromarray(data.astronaut()))
SMALL = image_phash(Image.fromarray(data.astronaut()).resize((150, 150)))
OTHER = image_phash(Image.fromarray(data.coffee()))
CAT = image_phash(Image.fromarray(data.chelsea()))


def batch(keys, hashes, status=None):
    n = len(keys)
    return {
        "key": list(keys),
        "status": list(status or ["ok"] * n),
        "fail_stage": [""] * n,
        "fail_detail": [""] * n,
        "phash": list(hashes),
    }


def test_a_near_duplicate_names_the_kept_key_within_and_across_batches(tmp_path):
    stage = DedupStage(DedupConfig(), str(tmp_path / "state"))
    # rows are taken in key order within a batch: 0002 is earlier than 0005
    out = stage(
        batch(
            ["0005", "0002", "0003", "0004"], [SMALL, PHOTO, OTHER, ""], ["ok", "ok", "ok", "decode_failed"]
        )
    )
    assert out["status"] == ["near_duplicate", "ok", "ok", "decode_failed"]
    assert out["fail_stage"][0] == "dedup" and out["fail_detail"][0].startswith("kept 0002 (Hamming distance")
    later = stage(batch(["0010", "0011"], [PHOTO, CAT]))
    assert (
        later["status"] == ["near_duplicate", "ok"]
        and later["fail_detail"][0] == "kept 0002 (Hamming distance 0)"
    )
    again = stage(batch(["0002"], [PHOTO]))  # the same row again (a retried batch): still kept
    assert again["status"] == ["ok"]


def test_exclude_file_turns_matches_into_eval_overlap(tmp_path):
    exclude = tmp_path / "val.txt"
    exclude.write_text(f"# COCO val\n{PHOTO} val2017/000000000139.jpg\n\n{CAT}\n")
    assert read_hash_file(str(exclude))[1] == ["val2017/000000000139.jpg", CAT]
    cfg = DedupConfig(exclude_hashes=str(exclude))
    out = DedupStage(cfg, str(tmp_path / "state"))(batch(["1", "2", "3"], [SMALL, OTHER, CAT]))
    assert out["status"] == ["eval_overlap", "ok", "eval_overlap"]
    assert out["fail_detail"][0].startswith("matches val2017/000000000139.jpg (Hamming distance")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{PHOTO}\nnot-a-hash\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        read_hash_file(str(bad))


def test_the_off_switches(tmp_path, smoke_cfg):
    from ssam.pipeline.graph import stage_plan

    rows = batch(["1", "2"], [PHOTO, PHOTO])
    assert DedupStage(DedupConfig(enabled=False), str(tmp_path))(rows)["status"] == ["ok", "ok"]
    assert DedupStage(DedupConfig(max_distance=0), str(tmp_path))(rows)["status"] == ["ok", "ok"]
    assert DedupStage(DedupConfig(max_distance=None), str(tmp_path))(rows)["status"] == ["ok", "ok"]
    assert not list(tmp_path.iterdir())  # nothing logged when nothing is checked
    assert "dedup" not in [p[0] for p in stage_plan(smoke_cfg)]  # smoke.yaml: enabled: false
    smoke_cfg.dedup.enabled = True
    assert [p[0] for p in stage_plan(smoke_cfg)][:2] == ["decode", "dedup"]
    smoke_cfg.dedup.max_distance = 0
    assert "dedup" not in [p[0] for p in stage_plan(smoke_cfg)]


def test_one_dedup_worker_only():
    from ssam.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="dedup: max_workers must be 1"):
        load_config(SMOKE, ["ray.dedup.max_workers=2"])


def test_a_new_actor_remembers_what_earlier_ones_kept(tmp_path):
    state = str(tmp_path / "state")
    first = DedupStage(DedupConfig(), state)
    assert first(batch(["0000", "0001"], [PHOTO, OTHER]))["status"] == ["ok", "ok"]
    # killed; a new actor (a resumed run) sees the next shard and the first shard again
    second = DedupStage(DedupConfig(), state)
    assert len(second.index) == 2
    later = second(batch(["0100", "0101"], [SMALL, CAT]))
    assert later["status"] == ["near_duplicate", "ok"] and later["fail_detail"][0].startswith("kept 0000 ")
    redone = second(batch(["0000", "0001"], [PHOTO, OTHER]))  # shard 0 redone: same verdicts
    assert redone["status"] == ["ok", "ok"]
    third = DedupStage(DedupConfig(), state)
    assert sorted(set(third.index.keys)) == ["0000", "0001", "0101"]


def test_a_starting_actor_compacts_the_log_and_keeps_its_order(tmp_path, monkeypatch):
    import ssam.stages.dedup as dedup

    monkeypatch.setattr(dedup, "COMPACT_ABOVE", 2)
    state = tmp_path / "state"
    first = DedupStage(DedupConfig(), str(state))
    for key, h in [("0", PHOTO), ("1", OTHER), ("2", CAT), ("3", SMALL)]:
        first(batch([key], [h]))
    assert len(list(state.iterdir())) == 3 and first.index.keys == ["0", "1", "2"]
    second = DedupStage(DedupConfig(), str(state))
    assert [p.name for p in state.iterdir()] == ["00000002-all.parquet"]
    assert second.index.keys == ["0", "1", "2"]
    second(batch(["4"], [image_phash(Image.fromarray(data.rocket()))]))
    assert DedupStage(DedupConfig(), str(state)).index.keys == ["0", "1", "2", "4"]


# ---- one local run ---------------------------------------------------------------------------


def _input(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Four sample photos and, in the second shard, a smaller re-encoded copy of the first."""
    images = REPO / "sample/images"
    copy = tmp_path / "www" / "copy-of-horse.jpg"
    copy.parent.mkdir()
    horse = Image.open(images / "horse.jpg")
    horse.resize((horse.width * 3 // 4, horse.height * 3 // 4)).save(copy, "JPEG", quality=70)
    urls = {
        "horse": f"file://{images / 'horse.jpg'}",
        "coffee": f"file://{images / 'coffee.jpg'}",
        "copy": f"file://{copy}",
        "rocket": f"file://{images / 'rocket.jpg'}",
    }
    path = tmp_path / "pairs.parquet"
    n = len(urls)
    pq.write_table(
        pa.table(
            {
                "URL": list(urls.values()),
                "TEXT": [f"a photo of a {k}" for k in urls],
                "WIDTH": [640] * n,
                "HEIGHT": [480] * n,
                "NSFW": ["UNLIKELY"] * n,
                "similarity": [0.3] * n,
            }
        ),
        path,
    )
    return path, urls


def _outcomes(run: Path) -> dict[str, tuple[str, str, str]]:
    """url -> (outcome, key, detail) over samples and shard failure records."""
    seen = {m["image"]["url"]: ("written", k, m["image"]["phash"]) for k, m, _ in iter_run_samples(run)}
    for p in sorted((run / "shards").glob("*.failures.parquet")):
        for r in pq.read_table(p).to_pylist():
            assert r["url"] not in seen, f"{r['url']} twice"
            seen[r["url"]] = (r["reason"], r["key"], r["detail"])
    return seen


def test_local_run_marks_the_copy_and_the_excluded_photo_and_resumes(tmp_path, capsys):
    from ssam.pipeline.config import load_config
    from ssam.pipeline.run import run_pipeline

    path, urls = _input(tmp_path)
    val = tmp_path / "val"
    val.mkdir()
    (val / "rocket.jpg").write_bytes((REPO / "sample/images/rocket.jpg").read_bytes())
    assert main(["hash-folder", str(val), "--image-size", "512"]) == 0
    exclude = tmp_path / "val.phash.txt"
    exclude.write_text(capsys.readouterr().out)
    run = tmp_path / "run"
    cfg = load_config(
        SMOKE,
        [
            f"input.path={path}",
            f"output.dir={run}",
            "output.samples_per_shard=2",
            "ray.executor=local",
            "dedup.enabled=true",
            f"dedup.exclude_hashes={exclude}",
            "masks.points_per_side=4",
        ],
    )
    summary = run_pipeline(cfg, log=lambda m: None)
    first = _outcomes(run)
    horse_key = first[urls["horse"]][1]
    assert first[urls["horse"]][0] == first[urls["coffee"]][0] == "written"
    assert first[urls["copy"]][0] == "near_duplicate" and first[urls["copy"]][2].startswith(
        f"kept {horse_key} "
    )
    assert first[urls["rocket"]][0] == "eval_overlap" and "rocket.jpg" in first[urls["rocket"]][2]
    assert summary.totals["by_reason"] == {"near_duplicate": 1, "eval_overlap": 1}
    assert validate_run(run) == []

    # Killed with one shard written: shard 1 (the copy) -- the horse still counts as seen; shard 0
    # (the horse) -- the horse is kept again, not a duplicate of itself, and the copy points at it.
    for lost in ("00001", "00000"):
        for p in (run / "shards").glob(f"{lost}.*"):
            p.unlink()
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps(dict(manifest, finished=False)))
        again = run_pipeline(cfg, log=lambda m: None)
        assert _outcomes(run) == first, lost
        assert again.totals["input_rows"] == 4 and again.totals["written"] == 2
        assert validate_run(run) == []
