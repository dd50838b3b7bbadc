"""Filter: LAION metadata filters and caption cleaning, before anything is downloaded.

Input rows use our column names (``url``, ``caption``, ``width``, ``height``, ``nsfw``,
``similarity``, ``language``); the pipeline maps the parquet's own names onto them. Each row
leaves with ``status`` ``ok`` or a failure reason, and a cleaned caption.

Duplicate URLs are found with state kept on the stage object, so one instance must see the whole
input (the pipeline runs this stage in the driver; it is cheap next to the models).
"""

from __future__ import annotations

import hashlib
import html
import ipaddress
import re
import socket
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

from pydantic import Field

from ssam.configio import Section
from ssam.urlguard import refused

from .common import OK, Stage, batch_len, mark_failed
from .download import DownloadConfig

_TAG = re.compile(r"<[^>]{0,200}>")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_caption(text: Any, max_chars: int) -> str:
    """Caption text made safe: decoded, HTML unescaped and stripped, URLs and control characters
    removed, whitespace collapsed, cut at a word boundary to ``max_chars``."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = str(text)[: max_chars * 4]  # bound the work on huge captions before any regex
    text = _TAG.sub(" ", html.unescape(text))
    text = _URL.sub(" ", text)
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    text = _SPACE.sub(" ", text.replace("\ufffd", " ")).strip()
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0].strip()
    return text


@lru_cache(maxsize=65536)
def _host_addresses(host: str) -> tuple[str, ...]:
    try:
        return tuple({ai[4][0] for ai in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return ()  # unresolvable: left to the download, which will fail it


def check_url(
    url: str,
    allow_private_hosts: bool,
    allow_file_urls: bool,
    resolve_hosts: bool,
    allow_networks: list[str] | tuple[str, ...] = (),
) -> tuple[str, str]:
    """``("ok", "")`` or ``(reason, detail)`` for one URL.

    Refuses ``file://`` unless allowed, any other scheme but http(s), and hosts that are -- or
    resolve to -- loopback, private, link-local or reserved addresses unless allowed (all of
    them, or those in ``allow_networks``). What the host resolves to when it is fetched, and
    where redirects lead, is checked again at connect time (:mod:`ssam.urlguard`).
    """
    if not isinstance(url, str) or not url.strip():
        return "missing_url", "empty url"
    parsed = urlparse(url.strip())
    if parsed.scheme == "file":
        return (OK, "") if allow_file_urls else ("url_refused", "file:// URLs are not allowed")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "bad_url", f"unsupported url {url[:100]!r}"
    if allow_private_hosts:
        return OK, ""
    host = parsed.hostname.rstrip(".")  # "localhost." is localhost
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return "url_refused", f"host {host} is local"
    try:
        addrs: tuple[str, ...] = (str(ipaddress.ip_address(host)),)
    except ValueError:
        addrs = _host_addresses(host) if resolve_hosts else ()
    bad = [a for a in addrs if refused(a, allow_networks)]
    if bad:
        return "url_refused", f"host {host} resolves to non-public address {bad[0]}"
    return OK, ""


class FilterConfig(Section):
    min_metadata_side: int = Field(
        0, ge=0, description="drop rows whose metadata width or height is below this (0: off)"
    )
    drop_nsfw: bool = Field(True, description="drop rows whose NSFW column is one of nsfw_tags")
    nsfw_tags: list[str] = Field(["NSFW", "UNSURE"], description="NSFW column values that drop a row")
    min_similarity: float | None = Field(None, description="drop rows with similarity below this (null: off)")
    languages: list[str] = Field(
        [], description="keep only these languages (needs columns.language; empty: all)"
    )
    max_caption_chars: int = Field(
        512, ge=16, le=100_000, description="captions are cleaned and cut to this length"
    )
    require_caption: bool = Field(False, description="drop rows whose cleaned caption is empty")


class FilterStage(Stage):
    """LAION metadata filters + caption cleaning + URL safety + duplicate URLs.

    The first stage: it starts each row's bookkeeping (``status``, ``fail_stage``, ``fail_detail``).
    URL safety follows the download section (what may be fetched), the rest the filter section.
    """

    name = "filter"
    reads = ("url", "caption")
    writes = ("status", "fail_stage", "fail_detail")

    def __init__(self, cfg: FilterConfig, url_policy: DownloadConfig):
        self.cfg = cfg
        self.url_policy = url_policy
        self.max_chars = cfg.max_caption_chars
        self._seen: set[bytes] = set()

    def _reject(self, row: dict[str, Any]) -> tuple[str, str]:
        f = self.cfg
        u = self.url_policy
        reason, detail = check_url(
            row["url"], u.allow_private_hosts, u.allow_file_urls, u.resolve_hosts, u.allow_networks
        )
        if reason != OK:
            return reason, detail
        w, h = row.get("width"), row.get("height")
        if f.min_metadata_side and w is not None and h is not None and min(w, h) < f.min_metadata_side:
            return "too_small", f"{w}x{h} < {f.min_metadata_side}"
        nsfw = row.get("nsfw")
        if f.drop_nsfw and nsfw is not None and str(nsfw).upper() in {t.upper() for t in f.nsfw_tags}:
            return "nsfw", f"tag {nsfw}"
        sim = row.get("similarity")
        if f.min_similarity is not None and sim is not None and sim < f.min_similarity:
            return "low_similarity", f"{sim:.3f} < {f.min_similarity}"
        lang = row.get("language")
        if f.languages and lang is not None and lang not in f.languages:
            return "language", f"language {lang}"
        if f.require_caption and not row["caption"]:
            return "empty_caption", "caption empty after cleaning"
        digest = hashlib.blake2b(row["url"].strip().encode(), digest_size=12).digest()
        if digest in self._seen:
            return "duplicate_url", "url seen earlier in the input"
        self._seen.add(digest)
        return OK, ""

    def _prefetch_hosts(self, urls: list) -> None:
        """Resolve the batch's distinct host names concurrently into the lookup cache (one slow
        resolver answer must not serialise a whole LAION part file)."""
        if self.url_policy.allow_private_hosts or not self.url_policy.resolve_hosts:
            return
        hosts = {urlparse(u.strip()).hostname for u in urls if isinstance(u, str) and u.strip()}
        hosts = {h.rstrip(".") for h in hosts if h and not h.replace(".", "").isdigit() and ":" not in h}
        if len(hosts) > 1:
            with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
                list(pool.map(_host_addresses, hosts))

    def process(self, out: dict[str, list]) -> None:
        n = batch_len(out)
        self._prefetch_hosts(out.get("url", []))
        out["caption"] = [clean_caption(c, self.max_chars) for c in out.get("caption", [None] * n)]
        out["status"], out["fail_stage"], out["fail_detail"] = [OK] * n, [""] * n, [""] * n
        cols = list(out)
        for i in range(n):
            row = {c: out[c][i] for c in cols}
            reason, detail = self._reject(row)
            if reason != OK:
                mark_failed(out, i, self.name, reason, detail)
