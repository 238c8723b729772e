"""The operations HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

One stdlib ``ThreadingHTTPServer`` in a daemon thread, on ``[metrics]
listen``. It is bounded: at most ``max_concurrent`` requests are served at
once (more get 503 at once), a slow client is cut off after
``socket_timeout`` seconds, and every readiness check runs with a deadline
(a check still running from an earlier probe is waited on, not started
again, so a hung database never piles up threads).

- ``/healthz`` answers 200 while the process can serve HTTP (liveness).
- ``/readyz`` runs the checks (name → callable; a check passes when it
  returns anything but ``False`` or a string, and raises nothing) and
  answers 200 or 503 with a JSON body naming each check's result.
- ``/metrics`` is the Prometheus text exposition of one registry.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tomd.errors import redact

log = logging.getLogger(__name__)

Check = Callable[[], Any]

__all__ = ["Check", "HttpHandle", "Readiness", "consumers_check", "daemon_checks", "database_check",
           "parse_listen", "scheduler_check", "start_http", "stream_check", "thread_check"]


# ------------------------------------------------------------------ checks


class Readiness:
    """Runs named checks with a deadline each; one run of a check at a time."""

    def __init__(self, checks: Mapping[str, Check], *, timeout_s: float = 2.0, max_workers: int = 4):
        self.checks = dict(checks)
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tomd-readyz")
        self._running: dict[str, Future] = {}
        self._lock = threading.Lock()

    def _future(self, name: str, check: Check) -> Future:
        with self._lock:
            fut = self._running.get(name)
            if fut is None or fut.done():
                fut = self._pool.submit(check)
                self._running[name] = fut
            return fut

    def run(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        started = time.monotonic()
        futures = {name: self._future(name, check) for name, check in self.checks.items()}
        results: dict[str, dict[str, Any]] = {}
        for name, fut in futures.items():
            left = max(0.0, self.timeout_s - (time.monotonic() - started))
            try:
                value = fut.result(timeout=left)
            except FutureTimeout:
                results[name] = {"ok": False, "error": f"no answer within {self.timeout_s:g} s"}
                continue
            except Exception as exc:  # noqa: BLE001 - a failing check is an answer, not a crash
                results[name] = {"ok": False, "error": redact(f"{exc.__class__.__name__}: {exc}")[:500]}
                continue
            if value is False or isinstance(value, str):
                results[name] = {"ok": False, "error": redact(value if isinstance(value, str) else "failed")}
            else:
                results[name] = {"ok": True}
        return all(r["ok"] for r in results.values()), results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def database_check(engine: Any, *, statement_timeout_ms: int = 2000) -> Check:
    """``SELECT 1`` through ``engine`` (a SQLAlchemy Engine); on PostgreSQL
    with a statement timeout. The Readiness deadline also bounds the connect."""
    from sqlalchemy import text

    def check() -> bool:
        with engine.connect() as c:
            if engine.dialect.name == "postgresql":
                c.execute(text(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}"))
            c.execute(text("SELECT 1")).scalar_one()
        return True

    return check


def consumers_check(consumers: Mapping[str, Any]) -> Check:
    """Every consumer has joined its group (received an assignment, possibly
    empty: a member with no partitions in a group of many is a ready standby)."""

    def check() -> bool | str:
        waiting = [name for name, c in consumers.items() if c.stats.rebalances == 0]
        return f"not yet assigned: {', '.join(sorted(waiting))}" if waiting else True

    return check


def thread_check(threads: Callable[[], Mapping[str, threading.Thread | None]]) -> Check:
    """Every named thread is alive (a stopped stream or scheduler is not ready)."""

    def check() -> bool | str:
        dead = [name for name, t in threads().items() if t is None or not t.is_alive()]
        return f"not running: {', '.join(sorted(dead))}" if dead else True

    return check


def stream_check(runners: Callable[[], Mapping[str, tuple[threading.Thread | None, BaseException | None]]]) -> Check:
    """Every stream thread was started and is alive or ended without an error: a file stream
    returns once its files are read and is done, not down (``runners``: name → (thread, error))."""

    def check() -> bool | str:
        down = [name for name, (t, error) in runners().items()
                if t is None or error is not None or (not t.is_alive() and t.ident is None)]
        return f"not running: {', '.join(sorted(down))}" if down else True

    return check


def scheduler_check(scheduler: Any) -> Check:
    """``scheduler.ready()`` when it has one (``tomd.scheduler.Jobs``: running and its thread
    alive), else ``scheduler.running`` (an APScheduler scheduler, or anything with that attribute)."""
    ready = getattr(scheduler, "ready", None)
    if callable(ready):
        return ready
    return lambda: bool(getattr(scheduler, "running", False)) or "scheduler not running"


def daemon_checks(daemon: Any, *, scheduler: Any = None) -> dict[str, Check]:
    """The readiness checks of a ``tomd.daemon.Daemon``: the database answers, every
    consumer has its assignment, the stream threads live (or ended without an error), every component's thread
    lives and its own check passes, the checks added with ``Daemon.add_check`` (the
    scheduler's), and ``scheduler.running`` when a scheduler is given here.

    A failed database check also counts in ``tomd_database_errors_total{component="readyz"}``.
    """
    db = database_check(daemon.engine)
    metrics = getattr(daemon, "metrics", None)
    if metrics is not None:
        def db_counted() -> bool:
            try:
                return db()
            except Exception:
                metrics.observe_database_error("readyz")
                raise

        checks: dict[str, Check] = {"database": db_counted}
    else:
        checks = {"database": db}
    kafka = {r.stream.name: r.consumer for r in daemon.runners if hasattr(r.consumer.stats, "assigned")}
    if kafka:
        checks["consumers"] = consumers_check(kafka)
    if daemon.runners:
        checks["streams"] = stream_check(lambda: {r.stream.name: (r.thread, r.error) for r in daemon.runners})
    components = list(getattr(daemon, "components", ()))
    threaded = [c for c in components if c.threaded]
    if threaded:
        checks["components"] = thread_check(lambda: {c.name: c.thread for c in threaded})
    for c in components:
        if c.ready is not None:
            checks[f"component:{c.name}"] = c.ready
        elif not c.threaded:  # start()/shutdown(): ready while started without an error
            checks[f"component:{c.name}"] = (lambda c=c: (c.started and c.error is None) or "not started")
    checks.update(getattr(daemon, "checks", {}))
    if scheduler is not None:
        checks["scheduler"] = scheduler_check(scheduler)
    return checks


# -------------------------------------------------------------------- HTTP


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::]:9464"``, ``"0.0.0.0:0"`` → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16


@dataclass
class HttpHandle:
    server: _Server
    thread: threading.Thread
    readiness: Readiness

    @property
    def host(self) -> str:
        return self.server.server_address[0]

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)
        self.readiness.close()


def start_http(listen: str | tuple[str, int], registry: CollectorRegistry | None = None, *,
               checks: Mapping[str, Check] | None = None, check_timeout_s: float = 2.0,
               max_concurrent: int = 8, socket_timeout: float = 10.0) -> HttpHandle:
    """Serve ``/metrics`` (``registry``), ``/healthz`` and ``/readyz`` (``checks``)
    on ``listen`` in a daemon thread; port 0 picks a free port (``handle.port``)."""
    host, port = parse_listen(listen) if isinstance(listen, str) else listen
    readiness = Readiness(checks or {}, timeout_s=check_timeout_s)
    slots = threading.BoundedSemaphore(max_concurrent)

    class Handler(BaseHTTPRequestHandler):
        timeout = socket_timeout  # a client that stops sending is cut off
        server_version = "tomd"
        sys_version = ""

        def log_message(self, fmt: str, *args: Any) -> None:  # probes every few seconds: no log noise
            log.debug("http %s - " + fmt, self.client_address[0], *args)

        def _send(self, code: int, body: bytes, ctype: str, head: bool = False) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            if not slots.acquire(blocking=False):
                self._send(503, b"busy\n", "text/plain; charset=utf-8", head)
                return
            try:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = generate_latest(registry) if registry is not None else b""
                    self._send(200, body, CONTENT_TYPE_LATEST, head)
                elif path in ("/healthz", "/livez"):
                    self._send(200, b"ok\n", "text/plain; charset=utf-8", head)
                elif path == "/readyz":
                    ok, results = readiness.run()
                    doc = {"status": "ready" if ok else "not ready", "checks": results}
                    self._send(200 if ok else 503, (json.dumps(doc) + "\n").encode(), "application/json", head)
                elif path == "/":
                    self._send(200, b"tomd: /metrics /healthz /readyz\n", "text/plain; charset=utf-8", head)
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass
            finally:
                slots.release()

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._route(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._route(head=True)

    server_cls = _Server
    if ":" in host:
        server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    server = server_cls((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="tomd-http", daemon=True)
    thread.start()
    handle = HttpHandle(server, thread, readiness)
    log.info("serving /metrics, /healthz and /readyz on %s", handle.url)
    return handle
