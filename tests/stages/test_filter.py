import pytest

from ssam.stages.filter import FilterStage, check_url, clean_caption


def test_clean_caption_strips_html_urls_control_chars_and_limits_length():
    raw = "<b>A&amp;B</b> dog\x00\x07 on grass see https://x.example/y?z=1 \t\n now"
    assert clean_caption(raw, 200) == "A&B dog on grass see now"
    long = "word " * 1000
    out = clean_caption(long, 50)
    assert len(out) <= 50 and out.endswith("word") and "  " not in out


def test_clean_caption_handles_non_utf8_bytes_and_none():
    assert clean_caption(b"caf\xe9 \xff\xfe table", 100) == "caf table"
    assert clean_caption(None, 100) == ""


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1:8000/a.jpg", "url_refused"),
        ("http://localhost/a.jpg", "url_refused"),
        ("http://10.1.2.3/a.jpg", "url_refused"),
        ("http://192.168.0.10/a.jpg", "url_refused"),
        ("http://169.254.169.254/latest/meta-data", "url_refused"),
        ("http://[::1]/a.jpg", "url_refused"),
        ("file:///etc/passwd", "url_refused"),
        ("ftp://example.com/a.jpg", "bad_url"),
        ("javascript:alert(1)", "bad_url"),
        ("", "missing_url"),
        (None, "missing_url"),
        ("http://8.8.8.8/a.jpg", "ok"),
    ],
)
def test_check_url_refuses_private_loopback_and_file_urls(url, reason):
    assert check_url(url, allow_private_hosts=False, allow_file_urls=False, resolve_hosts=False)[0] == reason


def test_check_url_allows_what_config_allows():
    assert check_url("http://127.0.0.1/a.jpg", True, False, False)[0] == "ok"
    assert check_url("file:///tmp/a.jpg", False, True, False)[0] == "ok"


def test_check_url_refuses_trailing_dot_localhost():
    assert check_url("http://localhost./a.jpg", False, False, resolve_hosts=False)[0] == "url_refused"


def test_check_url_refuses_names_that_resolve_to_private_addresses(monkeypatch):
    # No DNS server can be run here, so the resolver's answer is scripted (a fake of DNS).
    from ssam.stages import filter as filter_mod

    answers = {"intranet.example.com": "10.0.0.5", "cdn.example.com": "93.184.216.34"}
    monkeypatch.setattr(
        filter_mod.socket, "getaddrinfo", lambda host, port: [(2, 1, 6, "", (answers[host], 0))]
    )
    filter_mod._host_addresses.cache_clear()
    reason, detail = check_url("http://intranet.example.com/a.jpg", False, False, resolve_hosts=True)
    assert reason == "url_refused" and "10.0.0.5" in detail
    assert check_url("http://cdn.example.com/a.jpg", False, False, resolve_hosts=True)[0] == "ok"
    assert check_url("http://intranet.example.com/a.jpg", False, False, resolve_hosts=False)[0] == "ok"
    filter_mod._host_addresses.cache_clear()


def test_filter_stage_marks_every_rejected_row_with_its_reason(smoke_cfg):
    smoke_cfg.filter.min_metadata_side = 100
    smoke_cfg.filter.min_similarity = 0.25
    smoke_cfg.filter.require_caption = True
    stage = FilterStage(smoke_cfg.filter, smoke_cfg.download)
    rows = {
        "url": [
            "http://8.8.8.8/1.jpg",
            "http://8.8.8.8/2.jpg",
            "http://8.8.8.8/3.jpg",
            "http://8.8.8.8/4.jpg",
            "http://8.8.8.8/1.jpg",
            "http://8.8.8.8/6.jpg",
            "http://8.8.8.8/7.jpg",
        ],
        "caption": ["a dog", "a cat", "a car", "<p> </p>", "a dog", "a bus", "a hat"],
        "width": [640, 50, 640, 640, 640, 640, 640],
        "height": [480, 480, 480, 480, 480, 480, 480],
        "nsfw": ["UNLIKELY", "UNLIKELY", "NSFW", "UNLIKELY", "UNLIKELY", "UNLIKELY", None],
        "similarity": [0.3, 0.3, 0.3, 0.3, 0.3, 0.1, None],
        "language": [None] * 7,
    }
    out = stage(rows)
    assert out["status"] == [
        "ok",
        "too_small",
        "nsfw",
        "empty_caption",
        "duplicate_url",
        "low_similarity",
        "ok",
    ]
    assert all(s == "filter" for s, st in zip(out["fail_stage"], out["status"], strict=True) if st != "ok")
    assert out["caption"][3] == ""


def test_filter_stage_resolves_each_distinct_host_once_concurrently(smoke_cfg, monkeypatch):
    import threading

    from ssam.stages import filter as filter_mod

    smoke_cfg.download.allow_private_hosts = False
    answers = {
        "a.example.com": "93.184.216.34",
        "b.example.com": "10.0.0.9",
        "c.example.com": "93.184.216.35",
    }
    calls, threads = [], set()

    def resolver(host, port):  # scripted DNS (no DNS server can run here)
        calls.append(host)
        threads.add(threading.get_ident())
        return [(2, 1, 6, "", (answers[host], 0))]

    monkeypatch.setattr(filter_mod.socket, "getaddrinfo", resolver)
    filter_mod._host_addresses.cache_clear()
    urls = [f"http://{h}/{i}.jpg" for i in range(2) for h in answers]
    n = len(urls)
    out = FilterStage(smoke_cfg.filter, smoke_cfg.download)(
        {
            "url": urls,
            "caption": ["x"] * n,
            "width": [None] * n,
            "height": [None] * n,
            "nsfw": [None] * n,
            "similarity": [None] * n,
            "language": [None] * n,
        }
    )
    assert sorted(calls) == sorted(answers)  # one lookup per distinct host
    assert threading.get_ident() not in threads  # done by the prefetch pool, not row by row
    assert out["status"] == ["ok", "url_refused", "ok"] * 2
    filter_mod._host_addresses.cache_clear()
