"""``ssam-pipeline report``: statistics of a real smoke run, the page, and the page in a real browser."""

import argparse
import functools
import json
import shutil
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import browser
import pytest
import runfixtures
from PIL import Image

from ssam.format import complete_shards, iter_run_samples
from ssam.pipeline.report import Reservoir, collect
from ssam.pipeline.report_cli import add_parser, main

PLOTS = (
    "accounting",
    "top",
    "tail",
    "masks",
    "score",
    "iou",
    "sources",
    "throughput",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return runfixtures.smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert cli(str(run_dir), "--output", str(out), "--samples", "6") == 0
    return out


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return main(parser.parse_args(["report", *argv]))


@pytest.mark.slow
def test_stats_match_the_run(run_dir):
    stats = collect(run_dir, sheet_size=5)
    totals = json.loads((run_dir / "manifest.json").read_text())["totals"]
    assert stats.finished and stats.smoke
    assert stats.input_rows == totals["input_rows"] == stats.written + stats.failed
    assert stats.written == totals["written"] == 12
    assert dict(stats.failures) == totals["by_reason"]
    assert set(stats.failures) == {"missing_url", "bad_url", "duplicate_url", "download_failed"}
    anns = [a for _, meta, _ in iter_run_samples(run_dir) for a in meta["annotations"]]
    assert stats.masks == len(anns) == sum(k * n for k, n in stats.masks_per_image.items())
    assert stats.labelled == totals["labelled"] == sum(stats.labels.values())
    assert stats.labels == Counter(a["label"] for a in anns if a["label"])
    assert stats.iou_hist.sum() == stats.masks
    assert stats.score_hist_labelled.sum() == stats.labelled
    assert stats.wins_by_source == {"caption": stats.labelled}  # the smoke LLM proposes nothing
    assert stats.stage_rows["decode"] == stats.written  # the download failure never reached decode
    assert set(stats.stage_seconds) == {"decode", "candidates", "masks", "labels"}
    assert len(stats.sheet) == 5 and len({s.key for s in stats.sheet}) == 5


@pytest.mark.slow
def test_page_has_every_section(run_dir, report_dir):
    page = (report_dir / "index.html").read_text()
    assert 'id="smoke-banner"' in page and "<title>[SMOKE]" in page
    assert "in progress" not in page
    for name in PLOTS:
        assert f'id="plot-{name}"' in page
    for png in (report_dir / "plots").glob("*.png"):
        assert Image.open(png).size[0] > 100
    assert len(list((report_dir / "plots").glob("*.png"))) == len(PLOTS)
    for reason in (
        "missing_url",
        "bad_url",
        "duplicate_url",
        "download_failed",
        "near_duplicate",
        "eval_overlap",
    ):
        assert reason in page
    keys = {k for k, _, _ in iter_run_samples(run_dir)}
    linked = [p.name.removesuffix(".json") for p in (report_dir / "samples").glob("*.json")]
    assert len(linked) == 6 and set(linked) <= keys
    for key in linked:
        assert f'href="samples/{key}.json"' in page and f'src="samples/{key}.thumb.jpg"' in page


@pytest.mark.slow
def test_running_run_reads_only_committed_shards(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    last = complete_shards(copy / "shards")[-1]
    (copy / "shards" / f"{last:05d}.stats.json").unlink()  # as if the writer were between renames
    (copy / "manifest.json").unlink()
    stats = collect(copy)
    removed = json.loads((run_dir / "shards" / f"{last:05d}.stats.json").read_text())
    missing = removed["samples"] + removed["failures"]
    assert stats.shards == [f"{s:05d}" for s in complete_shards(copy / "shards")]
    assert stats.finished is None and stats.pending == missing > 0
    assert stats.written + stats.failed + stats.pending == stats.input_rows
    assert cli(str(copy), "--output", str(tmp_path / "out"), "--samples", "2") == 0
    assert "Run in progress" in (tmp_path / "out" / "index.html").read_text()


def test_sources_wins_and_dedup_counts(tmp_path):
    run = runfixtures.write_synthetic_run(tmp_path / "run")
    stats = collect(run)
    assert not stats.smoke and stats.finished is None
    assert stats.candidates_by_source == {"caption": 2, "llm": 1}
    assert stats.images_by_source == {"caption": 2, "llm": 1}
    assert stats.wins_by_source == {"caption": 3, "llm": 1}
    assert stats.masks == 5 and stats.labelled == 4
    assert stats.score_hist_unlabelled.sum() == 1
    assert stats.dedup_counts() == {"near_duplicate": 1, "eval_overlap": 1}
    assert stats.failure_examples["near_duplicate"][0]["detail"] == "like 000010"
    assert cli(str(run), "--output", str(tmp_path / "out")) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert "smoke-banner" not in page and "<td>llm</td>" in page


def test_reservoir_is_uniform_and_bounded():
    kept = Counter()
    for seed in range(2000):
        r = Reservoir(5, seed)
        for item in range(20):
            slot = r.offer()
            if slot is not None:
                r.items[slot] = item
        assert len(r.items) == 5 and r.seen == 20
        kept.update(r.items)
    assert set(kept) == set(range(20))
    assert all(abs(n / 2000 - 0.25) < 0.05 for n in kept.values())  # each item kept with p = 5/20


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    if browser.find_chromium() is None:
        pytest.skip("no headless Chromium: run tests/install_browser.sh (apt chromium) or set SSAM_CHROMIUM")
    site = shutil.copytree(report_dir, tmp_path / "site")
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    try:
        with browser.Chromium() as chromium:
            errors, images = chromium.load(url)
            assert errors == []
            assert len(images) == len(PLOTS) + 6
            assert all(img["ok"] and img["width"] > 100 for img in images), images
            assert chromium.evaluate("document.getElementById('smoke-banner').offsetHeight") > 20
            (site / "plots" / "throughput.png").unlink()  # the check must see a broken plot
            errors, images = chromium.load(url)
            assert any("throughput.png" in e for e in errors)
            assert [img["src"] for img in images if not img["ok"]] == ["plots/throughput.png"]
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
