"""The hook worker: a persistent subprocess that imports the hook files and runs hooks.

User code never runs in the daemon. One worker process per runner slot lives
as long as the daemon; the daemon sends it one run at a time over a pipe and
waits at most the hook's timeout for the answer::

    daemon (WorkerProcess)                      worker (worker_main)
      start ── spawn ──────────────────────────►  import hook files
            ◄── ("loaded", specs, problems) ────
      run   ── ("run", hook, event, …) ─────────►  hook(ctx)  (async: on the worker's loop)
            ◄── ("log", level, line) … ─────────   ctx.log lines, as they happen
            ◄── ("ok", actions) | ("error", tb) ─

A run that outlives its timeout gets the worker killed (SIGKILL) and a fresh
one started for the next run; a worker that dies (``os._exit``, segfault,
out of memory) is noticed as the pipe closing. Either way the daemon records
a failed attempt and goes on. The worker dies with the daemon (Linux
PR_SET_PDEATHSIG, plus a watchdog thread elsewhere), so a killed daemon never
leaves a hook running on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("tomd.hooks")

__all__ = ["Outcome", "WorkerBoot", "WorkerProcess", "invoke"]


@dataclass(frozen=True)
class WorkerBoot:
    """What a worker needs to start (crosses the process boundary, so plain and picklable)."""

    paths: tuple[str, ...]
    database_url: str | None = None
    storage: Any = None  # tomd.config.Storage
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent_pid: int = 0


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | error | timeout | crash
    actions: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


def invoke(fn, ctx, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Call a hook: plain functions directly, coroutines on ``loop`` (a new one if None)."""
    result = fn(ctx)
    if inspect.isawaitable(result):
        if loop is None:
            asyncio.run(_awaited(result))
        else:
            loop.run_until_complete(_awaited(result))


async def _awaited(aw):
    return await aw


# ------------------------------------------------------------------ the worker


def _die_with_parent(parent_pid: int) -> None:
    try:  # Linux: the kernel kills us when the daemon's thread that started us exits
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the watchdog below does it
        pass

    def watchdog() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)
            time.sleep(0.5)

    if parent_pid and os.getppid() != parent_pid:
        os._exit(70)
    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


class _PipeLogHandler(logging.Handler):
    """Sends each log line to the daemon, which logs it with its own format."""

    def __init__(self, conn, lock: threading.Lock):
        super().__init__(logging.DEBUG)
        self.conn, self.send_lock = conn, lock  # not self.lock: logging.Handler holds that one in emit()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
            if record.exc_info:
                line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            with self.send_lock:
                self.conn.send(("log", record.levelno, record.name, line))
        except Exception:  # noqa: BLE001 - logging must never break a hook
            pass


def worker_main(conn, boot: WorkerBoot) -> None:
    """Entry point of the worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which stops us
    _die_with_parent(boot.parent_pid)
    lock = threading.Lock()
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(conn, lock)]
    root.setLevel(logging.INFO)

    from tomd.hooks.api import HookContext, Reader, event_from_json
    from tomd.hooks.registry import load_hooks

    loaded = load_hooks(boot.paths)
    with lock:
        conn.send(("loaded", loaded.specs, loaded.problems))
    reader = Reader(_lazy_sessions(boot.database_url), _lazy_storage(boot.storage))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    user_log = logging.getLogger("tomd.hooks.user")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if msg[0] == "stop":
            break
        _, hook, event_json, event_id, target_id, attempt = msg
        try:
            fn = loaded.functions.get(hook)
            if fn is None:
                raise LookupError(f"hook {hook} is not defined in the hook files any more")
            event = event_from_json(event_json, where=f"outbox #{event_id}")
            ctx = HookContext(hook=hook, event=event, event_id=event_id, reader=reader, target_id=target_id,
                              settings=boot.settings.get(hook.split(".", 1)[0], {}), logger=user_log,
                              attempt=attempt)
            invoke(fn, ctx, loop)
            reply = ("ok", ctx.actions)
        except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are a hook's failures too
            reply = ("error", traceback.format_exc())
        try:
            with lock:
                conn.send(reply)
        except Exception:  # noqa: BLE001 - e.g. unpicklable actions: report as the hook's error
            with lock:
                conn.send(("error", traceback.format_exc()))
    os._exit(0)


class _Lazy:
    def __init__(self, make):
        self._make, self._value = make, None

    def get(self):
        if self._value is None:
            self._value = self._make()
        return self._value


def _lazy_sessions(url: str | None):
    if not url:
        return None
    holder = _Lazy(lambda: _sessions(url))
    return lambda: holder.get()()


def _sessions(url: str):
    from tomd.db import migrate

    return migrate.sessions(migrate.connect(url, pool_size=2))


class _LazyStore:
    def __init__(self, cfg):
        self._holder = _Lazy(lambda: _store(cfg))

    def __getattr__(self, name):
        return getattr(self._holder.get(), name)


def _store(cfg):
    from tomd.storage import storage_from_config

    return storage_from_config(cfg)


def _lazy_storage(cfg):
    return _LazyStore(cfg) if cfg is not None else None


# ----------------------------------------------------------------- the daemon's side


class WorkerProcess:
    """The daemon's handle on one worker process; restarts it when needed."""

    def __init__(self, boot: WorkerBoot, *, name: str = "tomd-hooks", load_timeout: float = 60.0):
        self.boot = boot
        self.name = name
        self.load_timeout = load_timeout
        self.proc = None
        self.conn = None
        self.specs: list = []
        self.problems: list[str] = []
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process and wait for its hook list (a worker that cannot load is killed)."""
        self.kill()
        # A fresh interpreter (``python -m tomd.hooks.worker``), not fork: no daemon threads,
        # locks or connections inherited; not multiprocessing's spawn either, which would
        # re-run the daemon's __main__ script. The pipe is one end of a socket pair.
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "tomd.hooks.worker", str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         cwd=os.getcwd())
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.starts += 1
        boot = self.boot if self.boot.parent_pid else _with_parent(self.boot)
        deadline = time.monotonic() + self.load_timeout
        try:
            self.conn.send(("boot", boot))
        except OSError:
            pass  # died at once: reported below
        while True:
            msg = self._recv(deadline)
            if msg is None or msg[0] in ("timeout", "crash"):
                what = (f"did not load the hook files within {self.load_timeout:g} s" if msg is None
                        or msg[0] == "timeout" else f"died loading the hook files ({msg[1]})")
                self.kill()
                self.specs, self.problems = [], [f"hook worker {what}: no user hooks run"]
                raise RuntimeError(self.problems[0])
            if msg[0] == "loaded":
                self.specs, self.problems = list(msg[1]), list(msg[2])
                return

    def run(self, hook: str, event_json: dict[str, Any], event_id: int, target_id: int | None, attempt: int,
            timeout: float) -> Outcome:
        t0 = time.monotonic()
        if not self.alive:
            try:
                self.start()
            except RuntimeError as exc:
                return Outcome("crash", error=str(exc), seconds=time.monotonic() - t0)
        try:
            self.conn.send(("run", hook, event_json, event_id, target_id, attempt))
        except (OSError, ValueError) as exc:
            self.kill()
            return Outcome("crash", error=f"hook worker is gone: {exc}", seconds=time.monotonic() - t0)
        deadline = time.monotonic() + timeout
        msg = self._recv(deadline)
        seconds = time.monotonic() - t0
        if msg is None:
            self.kill()
            return Outcome("timeout", error=f"TimeoutError: hook {hook} ran longer than {timeout:g} s and was "
                                            f"killed", seconds=seconds)
        if msg[0] == "crash":
            return Outcome("crash", error=f"hook worker died running {hook}: {msg[1]}", seconds=seconds)
        if msg[0] == "ok":
            return Outcome("ok", actions=list(msg[1]), seconds=seconds)
        return Outcome("error", error=msg[1], seconds=seconds)

    def _recv(self, deadline: float):
        """The next non-log message; None at the deadline; ("crash", why) if the process died."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or not self.conn.poll(remaining):
                    return None
                msg = self.conn.recv()
            except (EOFError, OSError):
                return ("crash", self._exit_reason())
            if msg[0] == "log":
                _, level, name, line = msg
                logging.getLogger(name if name.startswith("tomd") else f"tomd.hooks.user.{name}").log(level, line)
                continue
            return msg

    def _exit_reason(self) -> str:
        if self.proc is None:
            return "not started"
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self._forget()
        if code is None:
            return "the pipe closed"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _forget(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.proc, self.conn = None, None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._forget()

    def close(self) -> None:
        """Ask the worker to stop; kill it if it does not."""
        if self.alive:
            try:
                self.conn.send(("stop",))
                self.proc.wait(2)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        self.kill()


def _with_parent(boot: WorkerBoot) -> WorkerBoot:
    from dataclasses import replace

    return replace(boot, parent_pid=os.getpid())


if __name__ == "__main__":  # python -m tomd.hooks.worker FD (started by WorkerProcess.start)
    _conn = Connection(int(sys.argv[1]))
    _msg = _conn.recv()
    worker_main(_conn, _msg[1])
