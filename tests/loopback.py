"""A facility's HTTP API on loopback, for the client tests (no mocks): the server, its faults, its replies.

A subclass answers POSTs in ``handle`` and draws what goes wrong from
``next_fault``: the scripted ``faults`` first (one per request, in order), then
``chaos`` (a probability and a seeded ``random.Random``). The faults are the
ones that tell a client's retries apart: a 5xx or a 429 before anything
happened, a dropped connection, and, after the request took effect, an answer
that never comes (``hang_then_drop``), a drop, or a 5xx.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class LoopbackServer:
    """A context manager: a threaded HTTP server on 127.0.0.1 (a free port), ``url`` its address + ``path``."""

    FAULTS = ("500", "429", "drop", "accept_then_hang", "accept_then_drop", "accept_then_500")
    path = ""  # the API's path, appended to ``url``

    def __init__(self, hang_s: float = 600.0):
        # How long an "accept_then_hang" answer keeps the client waiting: far past any client
        # timeout, so the client's own timeout always ends the wait (leaving the server ends the hang).
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.faults: list[str] = []
        self.chaos: tuple[float, random.Random] | None = None
        self.stopping = threading.Event()  # ends the hangs at shutdown

    def __enter__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                server.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}{self.path}"
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    def next_fault(self, *, after_effect: bool = True) -> str | None:
        """The next scripted fault, else a chaos draw; ``after_effect`` False (a request that has no
        effect to lose) turns a drawn "accept_then_*" into a plain drop."""
        with self.lock:
            if self.faults:
                return self.faults.pop(0)
            if self.chaos and self.chaos[1].random() < self.chaos[0]:
                kind = self.chaos[1].choice(self.FAULTS)
                return kind if after_effect or not kind.startswith("accept") else "drop"
        return None

    def hang_then_drop(self, h: BaseHTTPRequestHandler) -> None:
        """The request took effect, the answer never comes (the client's timeout ends its wait; the
        hang itself lasts ``hang_s`` or until the server is left)."""
        self.stopping.wait(self.hang_s)
        self.drop(h)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, code: int, data: bytes, ctype: str = "application/json",
             headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def drop(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Gate:
    """A loopback HTTP proxy to ``upstream`` that holds the first call matching ``method`` and
    ``path`` (exact, or "PREFIX*") until ``release`` is set; ``arrived`` is set when that call is
    held. URLs of the upstream in JSON answers are rewritten to come back through the gate.
    An explicit synchronisation point: "a call is in flight" for as long as the test needs."""

    def __init__(self, upstream: str, method: str, path: str):
        self.upstream = urlsplit(upstream)
        self.arrived, self.release = threading.Event(), threading.Event()
        held = threading.Lock()  # taken by the one call that is held
        gate = self

        def matches(m: str, p: str) -> bool:
            return m == method and (p.startswith(path[:-1]) if path.endswith("*") else p == path)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if matches(self.command, urlsplit(self.path).path) and held.acquire(blocking=False):
                    gate.arrived.set()
                    gate.release.wait(300)
                conn = http.client.HTTPConnection(gate.upstream.hostname, gate.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data, status = resp.read(), resp.status
                    keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", "retry-after")}
                finally:
                    conn.close()
                if "json" in keep.get("Content-Type", ""):
                    data = data.replace(upstream.encode(), gate.url.encode())
                try:
                    self.send_response(status)
                    for k, v in keep.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
