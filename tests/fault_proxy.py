"""A small fault-injecting HTTP proxy for retry tests, placed in front of a real server.

Each incoming request takes the next action from the schedule: ``"429"``, ``"500"``, ``"hang"``
(sleep past the client's timeout, then drop the connection), ``"malformed"`` (200 with a cut-off
JSON body), or ``"pass"`` (forward to the upstream server). After the schedule, every request
passes. The proxy counts what it injected.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class FaultProxy:
    def __init__(self, upstream: str, schedule: list[str], hang_seconds: float = 3.0) -> None:
        self.upstream = upstream.rstrip("/")  # e.g. http://127.0.0.1:8000 (no /v1)
        self.schedule = list(schedule)
        self.hang_seconds = hang_seconds
        self.injected: dict[str, int] = {}
        self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _next(self) -> str:
                with proxy.lock:
                    action = proxy.schedule.pop(0) if proxy.schedule else "pass"
                    if action != "pass":
                        proxy.injected[action] = proxy.injected.get(action, 0) + 1
                    return action

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.path.endswith("/models"):
                    action = "pass"  # the reachability probe is not part of the schedule
                else:
                    action = self._next()
                if action == "429":
                    return self._reply(429, b'{"error": {"message": "slow down"}}',
                                       {"Retry-After": "0"})
                if action == "500":
                    return self._reply(500, b'{"error": {"message": "boom"}}')
                if action == "hang":
                    time.sleep(proxy.hang_seconds)
                    self.close_connection = True
                    return None
                if action == "malformed":
                    return self._reply(200, b'{"id": "x", "object": "chat.completion", "choices": [{')
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=method,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as resp:
                        data, status = resp.read(), resp.status
                except urllib.error.HTTPError as err:
                    data, status = err.read(), err.code
                with proxy.lock:
                    proxy.forwarded += 1
                return self._reply(status, data)

            def do_POST(self) -> None:
                self._handle("POST")

            def do_GET(self) -> None:
                self._handle("GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
