"""End to end: a loopback HTTP server serves good and bad files; the full graph runs on Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpserver
import imagefiles
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from PIL import Image

from ssam.format import complete_shards, iter_run_samples, validate_run
from ssam.pipeline.cli import main
from ssam.pipeline.config import ConfigError, load_config
from ssam.pipeline.run import run_pipeline

SMOKE = REPO / "configs/pipeline/smoke.yaml"

# path -> (HTTP status, content type, body, caption, expected outcome)
FILES = {
    "/photo.jpg": (200, "image/jpeg", imagefiles.jpeg(300), b"an astronaut with a flag", "written"),
    "/cmyk.jpg": (200, "image/jpeg", imagefiles.cmyk_jpeg(), b"a cmyk photo of a person", "written"),
    "/gray.png": (200, "image/png", imagefiles.gray_png(), b"a cameraman with a tripod", "written"),
    "/sixteen.png": (200, "image/png", imagefiles.png16(), b"a 16-bit ramp", "written"),
    "/alpha.png": (200, "image/png", imagefiles.rgba_png(), b"a red square", "written"),
    "/palette.png": (200, "image/png", imagefiles.palette_png(), b"a palette image", "written"),
    "/rotated.jpg": (
        200,
        "image/jpeg",
        imagefiles.exif_rotated_jpeg(),
        b"\xff\xfe caf\xe9 not utf-8",
        "written",
    ),
    "/huge-caption.jpg": (200, "image/jpeg", imagefiles.jpeg(200), b"dog " * 50_000, "written"),
    "/no-caption.jpg": (200, "image/jpeg", imagefiles.jpeg(220), b"", "written"),
    "/truncated.jpg": (200, "image/jpeg", imagefiles.truncated_jpeg(), b"a truncated file", "decode_failed"),
    "/empty.jpg": (200, "image/jpeg", b"", b"a 0-byte file", "decode_failed"),
    "/page.jpg": (200, "text/html", imagefiles.html_page(), b"html served as an image", "decode_failed"),
    "/bomb.png": (200, "image/png", imagefiles.bomb_png(), b"a decompression bomb", "decompression_bomb"),
    "/missing.jpg": (404, "text/plain", b"", b"a 404", "download_failed"),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    routes = {p: (s, t, b) for p, (s, t, b, _, _) in FILES.items()}
    with httpserver.ImageServer(routes) as srv:
        urls = [srv.url(p) for p in FILES]
        captions = [c for (_, _, _, c, _) in FILES.values()]
        expected = {srv.url(p): outcome for p, (*_, outcome) in FILES.items()}
        extra = [
            ("http://127.0.0.1:9/unreachable.jpg", b"nothing listens", "download_failed"),
            (srv.url("/photo.jpg"), b"the same url again", "duplicate_url"),
            ("file:///etc/passwd", b"a local file", "url_refused"),
            ("", b"no url", "missing_url"),
        ]
        for url, cap, outcome in extra:
            urls.append(url)
            captions.append(cap)
            expected.setdefault(url, outcome)
        path = tmp_path_factory.mktemp("input") / "pairs.parquet"
        pq.write_table(
            pa.table(
                {
                    "URL": urls,
                    "TEXT": pa.array(captions, pa.binary()),
                    "WIDTH": [640] * len(urls),
                    "HEIGHT": [480] * len(urls),
                    "NSFW": ["UNLIKELY"] * len(urls),
                    "similarity": [0.3] * len(urls),
                }
            ),
            path,
        )
        yield srv, path, expected, [o for *_, o in extra]


def outcomes(run: Path) -> dict:
    """url -> outcome, from every sample, shard failure record and filter failure record."""
    seen = {}
    for _, meta, _ in iter_run_samples(run):
        seen.setdefault(meta["image"]["url"], []).append("written")
    tables = [pq.read_table(p) for p in sorted((run / "shards").glob("*.failures.parquet"))]
    tables.append(pq.read_table(run / "filter.failures.parquet"))
    for t in tables:
        for row in t.to_pylist():
            seen.setdefault(row["url"], []).append(row["reason"])
    return seen


@pytest.mark.slow
def test_full_graph_on_ray_accounts_for_every_row(served, tmp_path, ray_loopback):
    srv, path, expected, extra_outcomes = served
    cfg = load_config(
        SMOKE,
        [
            f"input.path={path}",
            f"output.dir={tmp_path / 'run'}",
            "download.allow_file_urls=false",
            "download.timeout_s=3",
            "output.samples_per_shard=4",
        ],
    )
    summary = run_pipeline(cfg, log=lambda m: None)
    n = len(FILES) + len(extra_outcomes)
    t = summary.totals
    assert t["input_rows"] == n and t["written"] + t["failed"] == n
    assert t["written"] == sum(1 for *_, o in FILES.values() if o == "written")

    seen = outcomes(tmp_path / "run")
    dup_url = srv.url("/photo.jpg")
    assert sorted(seen.pop(dup_url)) == ["duplicate_url", "written"]  # first kept, second refused
    assert {u: o[0] for u, o in seen.items()} == {u: o for u, o in expected.items() if u != dup_url}
    assert validate_run(tmp_path / "run") == []

    samples = {m["image"]["url"]: (m, e) for _, m, e in iter_run_samples(tmp_path / "run")}
    rot = samples[srv.url("/rotated.jpg")][0]["image"]
    assert (rot["width"], rot["height"]) == (40, 80)  # EXIF rotation applied
    assert len(samples[srv.url("/huge-caption.jpg")][0]["image"]["caption"]) <= cfg.filter.max_caption_chars
    assert "caf" in samples[srv.url("/rotated.jpg")][0]["image"]["caption"]
    assert samples[srv.url("/no-caption.jpg")][0]["candidates"] == []
    photo, emb = samples[dup_url]
    # "an astronaut with a flag": the astronaut is LVIS's person (a synonym), with the words it came from
    assert photo["candidates"] == [
        {
            "label": "person",
            "source": "caption",
            "category_id": 793,
            "words": ["astronaut"],
            "template": None,
        },
        {"label": "flag", "source": "caption", "category_id": 451, "words": ["flag"], "template": None},
    ]
    assert photo["provenance"]["smoke"] is True and photo["provenance"]["sam"]["name"] == "smoke"
    assert {a["label"] for a in photo["annotations"]} <= {"person", "flag"}
    assert emb.shape[0] == len(photo["annotations"])
    reasons = {
        r
        for t in [pq.read_table(p) for p in (tmp_path / "run/shards").glob("*.failures.parquet")]
        for r in t.column("detail").to_pylist()
    }
    assert any("404" in r for r in reasons) and any(
        "HTML" in r for r in reasons
    )  # img2dataset's message kept

    # The overlay picture of one sample: the image, a smoke banner and the caption line.
    key = next(k for k, m, _ in iter_run_samples(tmp_path / "run") if m["image"]["url"] == dup_url)
    assert main(["show", str(tmp_path / "run"), "--key", key, "--out", str(tmp_path / "ov")]) == 0
    overlay = Image.open(tmp_path / "ov" / f"{key}.png")
    assert overlay.size == (photo["image"]["width"], photo["image"]["height"] + 28 + 24)
    assert overlay.getpixel((3, 3)) == (200, 20, 20)  # the red "SMOKE MODELS" banner

    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert (
        manifest["finished"]
        and manifest["totals"]["input_rows"] == n
        and len(manifest["shards"]) == t["shards"]
    )

    # Started again: nothing to do, nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run/shards").iterdir()}
    again = run_pipeline(cfg, log=lambda m: None)
    assert again.nothing_to_do and again.totals == manifest["totals"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run/shards").iterdir()} == mtimes

    # Same directory, different config: refused, not mixed.
    other = load_config(
        SMOKE, [f"input.path={path}", f"output.dir={tmp_path / 'run'}", "masks.points_per_side=4"]
    )
    with pytest.raises(ConfigError, match="different configuration"):
        run_pipeline(other, log=lambda m: None)


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_keys_none_twice(tmp_path, ray_loopback):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ssam.pipeline.cli",
        "run",
        str(SMOKE),
        "--output",
        str(run),
        "--input",
        str(REPO / "sample/pairs.parquet"),
        "--set",
        "ray.executor=local",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 240
    try:
        while not complete_shards(run / "shards") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_at_kill = complete_shards(run / "shards")
    assert 1 <= len(done_at_kill) < 3, done_at_kill  # killed mid-run (12 rows, 4 per shard)
    (run / "shards" / "00002.tar").write_bytes(b"half a shard")  # as if killed while writing
    (run / "shards" / ".tmp-00002-dead").mkdir()
    stale = run / "shards" / "_parts" / "00002"  # a part of a shard whose rows are redone
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "0123.parquet").write_bytes(b"not a part")

    cfg = load_config(
        SMOKE, [f"output.dir={run}", f"input.path={REPO / 'sample/pairs.parquet'}"]
    )  # Ray executor
    summary = run_pipeline(cfg, log=lambda m: None)
    assert sorted(summary.shards_written_now) == sorted(set(range(3)) - set(done_at_kill))
    keys = [k for k, _, _ in iter_run_samples(run)]
    expected = sorted(
        k for p in (run / "downloads").glob("*.parquet") for k in pq.read_table(p).column("key").to_pylist()
    )
    assert sorted(keys) == expected and len(keys) == len(set(keys)) == 12
    assert not list((run / "shards").glob(".tmp-*")) and validate_run(run) == []
    assert not (run / "shards" / "_parts").exists()
