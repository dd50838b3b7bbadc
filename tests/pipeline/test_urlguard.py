"""Download safety on every hop: redirects and DNS answers are checked where the connection is
made (ssam.urlguard), in img2dataset's own fetching processes too."""

import socket
import urllib.error
import urllib.request

import httpserver
import imagefiles
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from ssam import urlguard
from ssam.format import iter_run_samples
from ssam.pipeline.config import load_config
from ssam.pipeline.run import run_pipeline


@pytest.fixture
def guard():
    yield urlguard.install
    urlguard.uninstall()


def test_a_name_that_resolves_to_a_private_address_at_connect_time_is_refused(guard, monkeypatch):
    # DNS rebinding: the filter saw a public answer; at fetch time the name points at loopback.
    real = socket.getaddrinfo

    def stub(host, *args, **kw):
        return real("127.0.0.1" if host == "rebind.test" else host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", stub)
    with httpserver.ImageServer({"/a.jpg": (200, "image/jpeg", imagefiles.jpeg(64))}) as srv:
        port = srv.httpd.server_address[1]
        guard()
        with pytest.raises(urllib.error.URLError, match="non-public address 127.0.0.1"):
            urllib.request.urlopen(f"http://rebind.test:{port}/a.jpg", timeout=5)
        assert srv.hits == {}  # refused before a request was sent
        guard(["127.0.0.0/8"])  # a trusted network passes
        assert urllib.request.urlopen(f"http://rebind.test:{port}/a.jpg", timeout=5).status == 200


def test_a_public_url_redirecting_to_a_private_address_is_refused_in_img2datasets_processes(tmp_path):
    # "Public" server on 127.0.0.2 (declared a trusted network); its /redirect points at a
    # private server on 127.0.0.1. The fetch runs in img2dataset's spawned processes.
    with httpserver.ImageServer({"/secret.jpg": (200, "image/jpeg", imagefiles.jpeg(90))}) as private:
        routes = {
            "/ok.jpg": (200, "image/jpeg", imagefiles.jpeg(80)),
            "/redirect.jpg": (302, "text/plain", b"", {"Location": private.url("/secret.jpg")}),
        }
        with httpserver.ImageServer(routes, host="127.0.0.2") as public:
            urls = [public.url("/ok.jpg"), public.url("/redirect.jpg")]
            path = tmp_path / "pairs.parquet"
            pq.write_table(pa.table({"URL": urls, "TEXT": ["a dog", "a cat"]}), path)
            cfg = load_config(
                REPO / "configs/pipeline/smoke.yaml",
                [
                    f"input.path={path}",
                    f"output.dir={tmp_path / 'run'}",
                    "download.allow_private_hosts=false",
                    "download.allow_networks=[127.0.0.2/32]",
                    "ray.executor=local",
                ],
            )
            summary = run_pipeline(cfg, log=lambda m: None)
            assert public.hits == {"/ok.jpg": 1, "/redirect.jpg": 1}
        assert private.hits == {}  # the redirect's connection was refused before any request
    assert summary.totals["written"] == 1 and summary.totals["by_reason"] == {"download_failed": 1}
    assert [m["image"]["url"] for _, m, _ in iter_run_samples(tmp_path / "run")] == [urls[0]]
    fails = pq.read_table(tmp_path / "run/shards/00000.failures.parquet").to_pylist()
    assert fails[0]["url"] == urls[1] and "non-public address 127.0.0.1" in fails[0]["detail"]
