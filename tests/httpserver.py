"""A loopback HTTP server for download tests: serves given bytes at given paths, 404 otherwise."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    """``with ImageServer({"/a.jpg": (200, "image/jpeg", b"...")}) as srv: srv.url("/a.jpg")``.

    A route may carry a fourth element, extra headers (``{"Location": ...}`` for a redirect).
    Paths in ``held`` are answered only once :meth:`release` is called, or after ``hold_s``
    (counted in ``held_too_long``).
    Binds ``host`` (127.0.0.1, or another loopback address) on a free port; stopped on exit.
    """

    def __init__(
        self,
        routes: dict[str, tuple],
        delays: dict[str, float] | None = None,
        host: str = "127.0.0.1",
        held: set[str] | frozenset[str] = frozenset(),
        hold_s: float = 300.0,
    ):
        self.routes = routes
        self.delays = delays or {}  # path -> seconds to wait before answering
        self.held, self.released = set(held), threading.Event()
        self.hits: dict[str, int] = {}
        self.held_too_long = 0  # held requests answered because hold_s ran out, not release()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's naming
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                time.sleep(server.delays.get(self.path, 0))
                if self.path in server.held and not server.released.wait(hold_s):
                    server.held_too_long += 1
                status, ctype, body, *extra = server.routes.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():  # e.g. a redirect's Location
                    self.send_header(name, value)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.host = host
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def release(self) -> None:
        """Answer the held paths' requests, waiting and to come."""
        self.released.set()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()  # no held request keeps the server from closing
        self.httpd.shutdown()
        self.httpd.server_close()
