"""A loopback HTTP server for download tests: serves given bytes at given paths, 404 otherwise."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    """``with ImageServer({"/a.jpg": (200, "image/jpeg", b"...")}) as srv: srv.url("/a.jpg")``.

    Binds 127.0.0.1 on a free port; stopped on exit.
    """

    def __init__(self, routes: dict[str, tuple[int, str, bytes]], delays: dict[str, float] | None = None):
        self.routes = routes
        self.delays = delays or {}  # path -> seconds to wait before answering
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's naming
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                time.sleep(server.delays.get(self.path, 0))
                status, ctype, body = server.routes.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
