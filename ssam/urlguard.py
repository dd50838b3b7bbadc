"""Refuse connections to non-public addresses on every hop, where the connection is made.

The filter stage checks each URL's host before download, but a public URL can redirect to a
private one, and a name can resolve to a public address when checked and a private one when
fetched (DNS rebinding). :func:`install` closes both holes where they open: it wraps
``http.client.HTTPConnection.connect`` (which ``HTTPSConnection`` and urllib, img2dataset's
fetcher, go through) and checks the address the socket actually connected to, for every request
and every redirect. A refused connection raises ``ConnectionRefusedError``; img2dataset records
it as that row's download error.

img2dataset fetches in processes it spawns (its multiprocessing pool, or Ray tasks), so the
guard must start in those processes too: :func:`child_environment` gives the variables that make
any Python process started with them install it at start-up (through the ``sitecustomize`` in
``ssam/_guard_site``). Without a proxy, the address checked is the image host's; with one
(``HTTP(S)_PROXY``), it is the proxy's, which must then be public or in ``allow_networks``.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
from pathlib import Path

ENV = "SSAM_URL_GUARD"  # JSON: {"allow_networks": [...]}; set: install at interpreter start
SITE_DIR = str(Path(__file__).with_name("_guard_site"))


def is_private(addr: str) -> bool:
    """Loopback, private, link-local, reserved, multicast or unspecified."""
    ip = ipaddress.ip_address(addr.split("%")[0])
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def refused(addr: str, allow_networks: list[str] | tuple[str, ...] = ()) -> bool:
    """True when ``addr`` is non-public and in none of ``allow_networks`` (CIDR strings)."""
    if not is_private(addr):
        return False
    ip = ipaddress.ip_address(addr.split("%")[0])
    return not any(ip in ipaddress.ip_network(n, strict=False) for n in allow_networks)


_original_connect = http.client.HTTPConnection.connect


def install(allow_networks: list[str] | tuple[str, ...] = ()) -> None:
    """Check the peer address of every HTTP(S) connection this process makes (idempotent)."""
    allowed = tuple(allow_networks)

    def connect(self):
        _original_connect(self)
        peer = self.sock.getpeername()[0]
        if refused(peer, allowed):
            self.sock.close()
            raise ConnectionRefusedError(f"refused: {self.host} connected to non-public address {peer}")

    http.client.HTTPConnection.connect = connect


def uninstall() -> None:
    http.client.HTTPConnection.connect = _original_connect


def child_environment(allow_networks: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Variables under which every new Python process installs the guard at start-up."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        ENV: json.dumps({"allow_networks": list(allow_networks)}),
        "PYTHONPATH": SITE_DIR + (os.pathsep + path if path else ""),
    }


def install_from_env() -> None:
    """The start-up hook: install when :data:`ENV` is set."""
    spec = os.environ.get(ENV)
    if spec:
        install(json.loads(spec).get("allow_networks", ()))
