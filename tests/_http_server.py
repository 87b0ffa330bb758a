"""A tiny threaded HTTP file server on 127.0.0.1 for download tests.

``FileServer(root)`` serves the files of ``root`` at ``server.url(name)`` from a background thread
and counts the GET requests per file. ``mode`` changes how it answers, so one test can break the
server and then fix it:

- ``"ok"``: the file, with a correct ``Content-Length``;
- ``"truncate"``: announces ``Content-Length`` larger than the body, sends half the file and closes
  the connection (a download broken off mid-way);
- ``"error"``: answers ``500``.

``delay`` (seconds) pauses before the body is sent, so that two clients overlap in time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

Mode = Literal["ok", "truncate", "error"]


class FileServer:
    """Serve the files of ``root`` over HTTP on a free loopback port (use as a context manager)."""

    def __init__(self, root: Path, *, mode: Mode = "ok", delay: float = 0.0) -> None:
        self.root = Path(root)
        self.mode: Mode = mode
        self.delay = delay
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                name = unquote(urlparse(self.path).path).lstrip("/")
                with server._lock:
                    server.requests[name] += 1
                path = server.root / name
                if server.mode == "error":
                    self._send_status(500)
                    return
                if not path.is_file():
                    self._send_status(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if server.mode == "truncate":
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.delay:
                    time.sleep(server.delay)
                self.wfile.write(body)

            def _send_status(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        return Handler
