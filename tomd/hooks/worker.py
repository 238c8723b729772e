"""The hook worker: a persistent subprocess that imports the hook files and runs hooks.

User code never runs in the daemon, and neither does the per-run bookkeeping:
the worker claims due runs itself (tomd.hooks.dispatch), runs them, and
records them, over its own database connection. The daemon tells it when to
work and watches the clock::

    daemon (WorkerProcess)                       worker (worker_main)
      start ── python -m tomd.hooks.worker ────►  import hook files
            ◄── ("loaded", specs, problems) ─────
      work  ── ("work", claim_id, hook names) ──►  claim a batch, then per run:
                                                     [run id, deadline] → shared page
                                                     hook(ctx)  (async: on the worker's loop)
            ◄── ("log", level, name, line) …         ctx.log lines, as they happen
                                                     record done + actions | failures
            ◄── ("batch", counts, metrics, req) ──  after each claimed batch
            ◄── ("idle", counts) ─────────────────  nothing more is due
      pause ── ("pause",) ──────────────────────►  (stopping) give back the rest of the batch

The run in progress and its deadline sit in a small shared page
(:class:`RunSlot`), so the daemon learns of runs without a message each (a
hook failing fast on every event would otherwise cost the daemon more than
the hook), and can read which run was going even when the worker is stuck in
C code or dead. A run that outlives its deadline gets the worker killed
(SIGKILL); a worker that dies (``os._exit``, segfault, out of memory) is
noticed as the pipe closing. Either way the daemon records the failed attempt under the dead
worker's claim, gives its other claimed runs back, and starts a fresh worker
for the next run. The worker dies with the daemon (Linux PR_SET_PDEATHSIG,
plus a watchdog thread), so a killed daemon never leaves a hook running on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import mmap
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from tomd.hooks.dispatch import Claimed, Dispatcher, Limits, Outcome
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tomd.hooks")

__all__ = ["WorkerBoot", "WorkerProcess", "invoke"]


@dataclass(frozen=True)
class WorkerBoot:
    """What a worker needs to start (crosses the process boundary, so plain and picklable)."""

    paths: tuple[str, ...]
    database_url: str | None = None
    storage: Any = None  # tomd.config.Storage
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent_pid: int = 0
    limits: Any = None  # tomd.hooks.dispatch.Limits
    nice: int = 0  # added to the worker's niceness: hooks yield the CPU to the pipeline
    # tomd.hooks.api.facility_map(config): fills and checks the observations hooks request (no secrets);
    # None checks nothing
    facilities: dict[str, dict[str, Any]] | None = None


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


class RunSlot:
    """The worker's current run (id, absolute deadline) in a shared page, read by the daemon.

    A seqlock: the writer makes the sequence odd, writes, makes it even; a
    reader retries until it sees the same even sequence around its read.
    Deadlines are ``time.monotonic()`` values: CLOCK_MONOTONIC is one clock
    for every process on Linux.
    """

    _FMT = "<Qqd"  # sequence, run id (0: none), deadline
    # After it, written by the daemon only: until when the ingest counts as busy (monotonic; 0:
    # not busy). A pacing hint, not part of the seqlock: a torn read costs at most one pause.
    _BUSY = struct.calcsize(_FMT)
    SIZE = _BUSY + struct.calcsize("<d")

    def __init__(self, fd: int):
        self.mm = mmap.mmap(fd, self.SIZE)
        self.seq = 0

    @classmethod
    def create(cls) -> tuple[RunSlot, int]:
        fd = os.memfd_create("tomd-hook-run", 0) if hasattr(os, "memfd_create") else _temp_fd()
        os.ftruncate(fd, cls.SIZE)
        return cls(fd), fd

    def set(self, run_id: int, deadline: float) -> None:
        self.seq += 1
        struct.pack_into("<Q", self.mm, 0, self.seq)
        struct.pack_into("<qd", self.mm, 8, run_id, deadline)
        self.seq += 1
        struct.pack_into("<Q", self.mm, 0, self.seq)

    def clear(self) -> None:
        self.set(0, 0.0)

    def set_busy(self, until: float) -> None:
        """The daemon: the ingest committed; it counts as busy until ``until`` (monotonic)."""
        struct.pack_into("<d", self.mm, self._BUSY, until)

    def busy_until(self) -> float:
        return struct.unpack_from("<d", self.mm, self._BUSY)[0]

    def get(self) -> tuple[int, float]:
        """(run id, deadline); (0, 0.0) when no run is going."""
        for _ in range(1000):
            s1, run_id, deadline = struct.unpack_from(self._FMT, self.mm, 0)
            if s1 % 2 == 0 and struct.unpack_from("<Q", self.mm, 0)[0] == s1:
                return run_id, deadline
        return 0, 0.0

    def close(self) -> None:
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass


def _temp_fd() -> int:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="tomd-hook-run-")
    os.unlink(path)
    return fd


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
        if record.levelno < logging.WARNING and not _hook_logger(record.name):
            return  # a library's INFO (alembic, httpx, urllib3) is not the hook's output
        try:
            line = record.getMessage()
            if record.exc_info:
                line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            with self.send_lock:
                self.conn.send(("log", record.levelno, record.name, line))
        except Exception:  # noqa: BLE001 - logging must never break a hook
            pass


# Loggers whose INFO lines are the hooks' output: ctx.log (tomd.hooks.user), the worker's own
# lines about what a run did (tomd.hooks), and logging.getLogger(__name__) in a hook file.
HOOK_LOGGERS = ("tomd.hooks", "tomd_user_hooks")


def _hook_logger(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in HOOK_LOGGERS)


def worker_main(conn, boot: WorkerBoot, slot: RunSlot) -> None:
    """Entry point of the worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which stops us
    _die_with_parent(boot.parent_pid)
    if boot.nice:
        try:
            os.nice(boot.nice)
        except OSError:
            pass
    lock = threading.Lock()
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(conn, lock)]
    root.setLevel(logging.WARNING)  # libraries: warnings and errors only (the handler also drops their INFO)
    for name in HOOK_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)

    from tomd.hooks.api import HookContext, Reader, event_from_json
    from tomd.hooks.registry import load_hooks

    loaded = load_hooks(boot.paths)
    with lock:
        conn.send(("loaded", loaded.specs, loaded.problems))
    sessions = _lazy_sessions(boot.database_url)
    reader = Reader(sessions, _lazy_storage(boot.storage))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    user_log = logging.getLogger("tomd.hooks.user")
    specs = {s.name: s for s in loaded.specs}

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    ended: list[tuple[str, str, float]] = []  # (hook, outcome, seconds) since the last batch message
    requested = [False]

    def execute(h, c: Claimed, timeout: float) -> Outcome:
        t0 = time.monotonic()
        slot.set(c.run_id, t0 + timeout)
        try:
            event = event_from_json(c.event_json, where=f"outbox #{c.event_id}")
            ctx = HookContext(hook=c.hook, event=event, event_id=c.event_id, reader=reader, target_id=c.target_id,
                              settings=boot.settings.get(c.hook.split(".", 1)[0], {}), logger=user_log,
                              attempt=c.attempts + 1)
            invoke(loaded.functions[c.hook], ctx, loop)
            outcome = Outcome("ok", actions=ctx.actions, seconds=time.monotonic() - t0)
        except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are a hook's failures too
            outcome = Outcome("error", error=traceback.format_exc(), seconds=time.monotonic() - t0)
        slot.clear()
        return outcome

    def on_end(hook: str, outcome: str, seconds: float, req: bool) -> None:
        ended.append((hook, outcome, seconds))
        requested[0] = requested[0] or req

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if msg[0] == "stop":
            break
        if msg[0] != "work":
            continue
        _, claim_id, names = msg
        paused = False

        def should_stop() -> bool:
            nonlocal paused
            while not paused and conn.poll(0):
                if conn.recv()[0] in ("pause", "stop"):
                    paused = True
            return paused

        limits = boot.limits or Limits()
        d = Dispatcher(sessions, limits, {n: specs[n] for n in names if n in specs}, claim_id,
                       execute=execute, on_end=on_end, facilities=boot.facilities)
        counts: dict[str, int] = {}
        try:
            while not should_stop():
                t0 = time.monotonic()
                outcomes = d.run_batch(should_stop)
                _yield_to_ingest(slot, conn, limits.busy_share, time.monotonic() - t0)
                batch: dict[str, int] = {}
                for o in outcomes:
                    batch[o] = batch.get(o, 0) + 1
                if outcomes:  # one message per batch: what ran, for the counts and the metrics
                    send(("batch", batch, list(ended), requested[0]))
                    ended.clear()
                    requested[0] = False
                if not outcomes:
                    break
        except Exception:  # noqa: BLE001 - the database went away: the daemon retries later
            logging.getLogger("tomd.hooks").exception("hook worker: claiming or recording runs failed")
            counts["error"] = counts.get("error", 0) + 1
            try:
                d.release()
            except Exception:  # noqa: BLE001 - the leases run out on their own
                pass
        send(("idle", counts))
    os._exit(0)


def _yield_to_ingest(slot: RunSlot, conn, share: float, spent: float) -> None:
    """While the daemon's ingest is busy, keep this worker to ``share`` of the wall clock.

    ``nice`` yields the worker's CPU, but not what its runs cost elsewhere: its
    database connection's server process (PostgreSQL) and the write lock
    (SQLite) serve it at full priority, and a hook failing on every event
    keeps them busy with claims and failure records. So after a batch the
    worker pauses ``spent × (1 − share) / share`` (no longer than the ingest
    stays busy). Nothing is claimed while it pauses; runs are delayed, never
    dropped: attempts, backoff and timeouts are as before.
    """
    if not 0 < share < 1:
        return
    left = slot.busy_until() - time.monotonic()
    if left <= 0:
        return
    conn.poll(min(left, spent * (1 - share) / share))  # a pause or stop message ends it early


class _Lazy:
    def __init__(self, make):
        self._make, self._value = make, None

    def get(self):
        if self._value is None:
            self._value = self._make()
        return self._value


class _LazySessions:
    """A sessionmaker made on first use (a worker that only loads files never connects)."""

    def __init__(self, url: str):
        self._holder = _Lazy(lambda: _sessions(url))

    def __call__(self):
        return self._holder.get()()

    def begin(self):
        return self._holder.get().begin()


def _lazy_sessions(url: str | None):
    return _LazySessions(url) if url else None


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
        self.slot: RunSlot | None = None
        self._last_run = 0

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
        if self.slot is not None:
            self.slot.close()
        self.slot, slot_fd = RunSlot.create()
        try:
            # Its own session (and process group): a kill takes the programs a hook started with it.
            self.proc = subprocess.Popen([sys.executable, "-m", "tomd.hooks.worker", str(theirs.fileno()),
                                          str(slot_fd)], pass_fds=(theirs.fileno(), slot_fd),
                                         stdin=subprocess.DEVNULL, cwd=os.getcwd(), start_new_session=True)
        finally:
            theirs.close()
            os.close(slot_fd)
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

    def work(self, claim_id: str, hooks: list[str], *, stop=None,
             on_end: Callable[[str, str, float, bool], None] | None = None,
             on_kill: Callable[[int, str], None] | None = None) -> dict[str, int]:
        """Let the worker claim and run due runs of ``hooks`` until none is due; its outcome counts.

        Enforces each run's deadline (read from the shared :class:`RunSlot`):
        a worker still in a run at its deadline is killed, and
        ``on_kill(run id or 0, error)`` records that run and gives the
        claim's other runs back (also when the worker dies). With ``stop``
        set the worker is asked to give back what it has not started.
        """
        if not self.alive:
            try:
                self.start()
            except RuntimeError as exc:
                log.error("%s", exc)
                return {"error": 1}
        try:
            self.conn.send(("work", claim_id, list(hooks)))
        except (OSError, ValueError) as exc:
            run_id = self.slot.get()[0] if self.slot else 0
            self.kill()
            if on_kill:
                on_kill(run_id, f"hook worker is gone: {exc}")
            return {"error": 1}
        paused = False
        counts: dict[str, int] = {}
        while True:
            if stop is not None and stop.is_set() and not paused:
                paused = True
                try:
                    self.conn.send(("pause",))
                except (OSError, ValueError):
                    pass
            run_id, deadline = self.slot.get()
            now = time.monotonic()
            if run_id and now >= deadline:
                self.kill()
                if on_kill:
                    on_kill(run_id, "TimeoutError: the hook ran past its timeout and was killed")
                counts["killed"] = counts.get("killed", 0) + 1
                return counts
            wait = 0.1 if not run_id else max(0.001, min(0.1, deadline - now))
            msg = self._recv(time.monotonic() + wait)
            if msg is None:
                continue
            if msg[0] == "crash":
                if on_kill:
                    on_kill(self._last_run, f"hook worker died: {msg[1]}")
                counts["killed"] = counts.get("killed", 0) + 1
                return counts
            if msg[0] == "batch":
                for k, v in msg[1].items():
                    counts[k] = counts.get(k, 0) + v
                if on_end:
                    for i, (hook, outcome, seconds) in enumerate(msg[2]):
                        on_end(hook, outcome, seconds, bool(msg[3]) and i == 0)
            elif msg[0] == "idle":
                for k, v in msg[1].items():
                    counts[k] = counts.get(k, 0) + v
                return counts

    def ingest_busy(self, until: float) -> None:
        """Pace the worker until ``until`` (monotonic): the daemon's ingest is committing."""
        slot = self.slot
        if slot is not None:
            try:
                slot.set_busy(until)
            except ValueError:  # closed by a restart in another thread: the next wake reaches the new one
                pass

    def _recv(self, deadline: float):
        """The next non-log message; None at the deadline; ("crash", why) if the process died."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                if not self.conn.poll(max(0.0, remaining)):  # a message already here still counts
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
        self._last_run = self.slot.get()[0] if self.slot is not None else 0  # what it was running when it died
        if self.proc is None:
            return "not started"
        try:
            code = self.proc.wait(30)  # its pipe closed: it is exiting (slowly at nice 10 on a busy machine)
        except subprocess.TimeoutExpired:
            code = None
        self._kill_group()  # what the dead worker's hook started must not run on
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
        """Kill the worker and its process group: programs a hook started (and left hanging) too."""
        if self.proc is not None:
            self._kill_group()
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._forget()

    def _kill_group(self) -> None:
        # The worker leads its group (start_new_session); the group outlives it while a child lives.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

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
    _slot = RunSlot(int(sys.argv[2]))
    _msg = _conn.recv()
    worker_main(_conn, _msg[1], _slot)
