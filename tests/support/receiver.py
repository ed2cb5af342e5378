"""A local HTTP receiver standing for healthchecks.io and webhooks: it records every request, and can be told
to answer 500 or to hang (never answer within the client's timeout)."""

from __future__ import annotations

import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Mode = Literal["ok", "500", "hang"]


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    at: float


class Receiver:
    """Serves on 127.0.0.1 (a free port) in a thread; `mode[prefix]` says how paths under `/prefix` answer."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.mode: dict[str, Mode] = {}
        self.hang_seconds = 30.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self._handle()

            def do_GET(self) -> None:
                self._handle()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urllib.parse.urlsplit(self.path)
                with receiver._lock:
                    receiver.requests.append(Received(self.command, parts.path, urllib.parse.parse_qs(parts.query),
                                                      body, time.monotonic()))
                mode = receiver.mode.get(parts.path.strip("/").split("/")[0], "ok")
                if mode == "hang":
                    receiver._stop.wait(receiver.hang_seconds)
                    return
                self.send_response(500 if mode == "500" else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def under(self, prefix: str) -> list[Received]:
        """The requests received under `/prefix`, in order."""
        with self._lock:
            return [r for r in self.requests if r.path.strip("/").split("/")[0] == prefix]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
