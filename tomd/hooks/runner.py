"""The hook runner: outbox events → hook_runs rows → hooks, at least once, isolated.

::

    outbox (events, written in their stage's transaction)
       │ expand: one pending hook_runs row per (hook, event) of a kind it takes
       ▼         (INSERT … SELECT … ON CONFLICT DO NOTHING: many daemons, one row)
    hook_runs ── claim due rows with a lease (SKIP LOCKED / BEGIN IMMEDIATE), a batch at a time
       │
       ├─ user hook: the worker process claims, runs and records it (the daemon
       │   watches the clock: timeout → worker killed, the attempt recorded here);
       │   its recorded actions are applied in the transaction that marks it done
       └─ builtin: fn(session, event) in the daemon, inside that transaction
       ▼
    done (never again for that event) | pending again after a backoff | failed + traceback

**Commit order.** On PostgreSQL, outbox ids are taken when a row is inserted
but become visible at commit, so a transaction that started earlier can
commit an id *below* one already seen. A plain "highest id seen" cursor would
skip it for ever. The runner therefore keeps two cursors per hook: a fast one
(the highest id seen, scanned on every wake-up) and a slow one that trails by
``commit_window`` (the highest id seen that long ago), rescanned every
``commit_window / 4``. An event committed up to ``commit_window`` after a later
id was seen is still picked up; the unique (hook, event_id) pair and the
NOT EXISTS make rescans cost no duplicates. SQLite commits one writer at a
time, in id order, so it needs no slow pass. On start the cursors begin at the
first event written ``commit_window`` before the newest one the hook already
has (or at its registration).

**Which events a hook gets.** A hook is registered the first time a daemon
sees it: a ``hook.registered`` event is written and recorded as the hook's
first (done) run. It gets the events after that one; with
``@on(..., since="all")`` also every older event still in the outbox. A hook
removed and added back keeps its first registration, so it catches up on what
it missed while it was gone.

**Attempts.** ``attempts`` counts finished attempts (a daemon that dies
mid-run does not use one up: the run is claimed again when its lease ends).
A failure waits ``retry_backoff × 2^(attempt-1)`` (at most ``retry_max``,
with jitter) before the next attempt; after ``max_attempts`` the run is
``failed`` with its traceback in ``error`` and a ``hook.failed`` event.

**The pipeline first.** While ingest commits keep waking the runner (each
``wake()`` marks the ingest busy for ``busy_hold`` s, in the worker's shared
page), a worker spends at most ``busy_share`` of the wall clock on runs,
pausing between claimed batches. ``nice`` yields the worker's CPU but not its
database server process (PostgreSQL) nor the SQLite write lock, which a hook
failing on every event keeps busy with claims and failure records
(bench/hooks.py: +21.5% on a 1,000-alert ingest into PostgreSQL unpaced,
+8.3% paced). Runs wait, they are never dropped: the backlog is made up when
the ingest goes quiet.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tomd.hooks.dispatch import Claimed, Dispatcher, Limits, backoff
from tomd.hooks.registry import Registry
from tomd.hooks.worker import WorkerBoot, WorkerProcess
from tomd.logs import FailureLog

log = logging.getLogger("tomd.hooks")

__all__ = ["HookRunner", "RunnerSettings", "RunResult", "backoff"]


@dataclass(frozen=True)
class RunnerSettings:
    paths: tuple[str, ...] = ("hooks",)
    timeout: float = 60.0
    max_attempts: int = 5
    retry_backoff: float = 10.0
    retry_max: float = 3600.0
    workers: int = 1
    poll: float = 2.0
    commit_window: float = 120.0
    lease_margin: float = 30.0
    claim_batch: int = 20
    nice: int = 10
    # While events keep coming (a wake after each ingest commit, within ``busy_hold`` s), a worker
    # spends at most ``busy_share`` of the time on runs: the pipeline first (1.0: no pacing).
    busy_share: float = 0.2
    busy_hold: float = 1.0
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def limits(self) -> Limits:
        return Limits(timeout=self.timeout, max_attempts=self.max_attempts, retry_backoff=self.retry_backoff,
                      retry_max=self.retry_max, lease_margin=self.lease_margin, claim_batch=self.claim_batch,
                      busy_share=self.busy_share)

    @classmethod
    def from_config(cls, hooks) -> RunnerSettings:
        return cls(paths=tuple(hooks.paths), timeout=hooks.timeout, max_attempts=hooks.max_attempts,
                   retry_backoff=getattr(hooks, "retry_backoff", 10.0), retry_max=getattr(hooks, "retry_max", 3600.0),
                   workers=getattr(hooks, "workers", 1), poll=getattr(hooks, "poll", 2.0),
                   commit_window=getattr(hooks, "commit_window", 120.0), nice=getattr(hooks, "nice", 10),
                   busy_share=getattr(hooks, "busy_share", 0.2), busy_hold=getattr(hooks, "busy_hold", 1.0),
                   settings=dict(getattr(hooks, "settings", {}) or {}))


@dataclass
class RunResult:
    """Counts from :meth:`HookRunner.run_once`."""

    expanded: int = 0
    done: int = 0
    retried: int = 0
    failed: int = 0


class _Slot:
    """One worker process and the thread that feeds it."""

    def __init__(self, runner: HookRunner, index: int):
        self.index = index
        self.worker = WorkerProcess(runner._boot, name=f"tomd-hooks-{index}", load_timeout=runner.settings.timeout)
        self.generation = runner._generation
        self.thread: threading.Thread | None = None
        self.turns = 0


class _TurnOver:
    """A ``stop`` for WorkerProcess.work: ``is_set()`` asks ``check``."""

    def __init__(self, check: Callable[[], bool]):
        self.is_set = check


class HookRunner:
    """Feeds outbox events to hooks. Build with :meth:`from_config`; ``run(stop)`` in a thread.

    ``observer``: an object with ``observe_hook(hook, outcome, seconds)``
    (tomd.metrics.Metrics). ``on_request``: called after a commit that
    created observation intents (the daemon wakes its submitter).
    A daemon component (tomd.daemon.Component): ``name``, ``run(stop)``,
    ``wake()``, ``reload()``, ``ready()``.
    """

    name = "hooks"  # a daemon component

    def __init__(self, sessions, settings: RunnerSettings, *, database_url: str | None = None,
                 storage_config: Any = None, registry: Registry | None = None, observer: Any = None,
                 on_request: Callable[[], None] | None = None, worker_id: str | None = None,
                 facilities: Mapping[str, Any] | None = None):
        self.sessions = sessions
        self.settings = settings
        self.registry = registry or Registry()
        self.observer = observer
        self.on_request = on_request
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xffff:x}"
        self._boot = WorkerBoot(paths=tuple(settings.paths), database_url=database_url, storage=storage_config,
                                settings={k: dict(v) for k, v in settings.settings.items()}, parent_pid=os.getpid(),
                                limits=settings.limits, nice=settings.nice,
                                facilities=dict(facilities) if facilities is not None else None)
        self._generation = 0
        self._slots = [_Slot(self, i) for i in range(max(1, settings.workers))]
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._work_gen = 0
        self._wake = threading.Event()
        self._reload = threading.Event()
        self._started = False
        self._horizon: dict[str, int] = {}
        self._fast: dict[str, int] = {}
        self._slow: dict[str, int] = {}
        self._checkpoints: deque[tuple[float, int]] = deque()
        self._last_slow = 0.0
        self._ordered_commits: bool | None = None
        self.rng = random.Random()
        self._builtin_thread: threading.Thread | None = None
        # ``on_error(exc)``: told of every failed outbox read or hook step (the daemon counts
        # database errors); the log gets the first with its traceback, repeats in one line.
        self.on_error: Callable[[BaseException], None] | None = None
        self._outbox_failures = FailureLog(log, "hooks: reading the outbox", on_error=self._on_error)

    def _on_error(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(exc)

    @classmethod
    def from_config(cls, config, sessions, storage: Any = None, *, observer: Any = None,
                    registry: Registry | None = None, on_request: Callable[[], None] | None = None) -> HookRunner:
        """The runner ``[hooks]`` describes. ``storage`` is unused in the daemon (the worker opens
        its own store from ``[storage]``); accepted so every component is built alike."""
        bind = sessions.kw.get("bind")
        url = bind.url.render_as_string(hide_password=False) if bind is not None else None
        settings = RunnerSettings.from_config(config.hooks)
        if not getattr(config.hooks, "enabled", True):
            settings = dataclasses.replace(settings, paths=())  # no user hooks; builtins still run
        from tomd.hooks.api import facility_map  # hooks' requests: checked, with proposal and hours

        return cls(sessions, settings, database_url=url, storage_config=config.storage, registry=registry,
                   observer=observer, on_request=on_request, facilities=facility_map(config))

    # ---------------------------------------------------------------- control

    def start(self) -> None:
        """Load the hook files (in a worker) and register the hooks; idempotent."""
        if not self._started:
            self._load()
            self._started = True

    def wake(self) -> None:
        """New events were committed: look now rather than at the next poll.

        Also tells the workers that the ingest is busy (for ``busy_hold`` s):
        they pace themselves (``busy_share``), through their shared page."""
        until = time.monotonic() + self.settings.busy_hold
        for slot in self._slots:
            slot.worker.ingest_busy(until)
        self._wake.set()

    def reload(self) -> None:
        """Read the hook files again (SIGHUP). Safe from a signal handler: the run loop does it."""
        self._reload.set()
        self._wake.set()

    def ready(self) -> bool | str:
        """For /readyz: ready once the hooks are registered (a bad hook file does not make it unready)."""
        return True if self._started else "hooks not loaded yet"

    def close(self) -> None:
        for slot in self._slots:
            slot.worker.close()

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: expand new events, and let each slot's thread run due hooks."""
        self.start()
        for slot in self._slots:
            slot.thread = threading.Thread(target=self._slot_loop, args=(slot, stop), name=f"hooks-{slot.index}",
                                           daemon=True)
            slot.thread.start()
        self._builtin_thread = threading.Thread(target=self._builtin_loop, args=(stop,), name="hooks-builtin",
                                                daemon=True)
        self._builtin_thread.start()
        try:
            while not stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    self._load()
                try:
                    if self.expand():
                        self._notify_slots()
                    self._outbox_failures.ok()
                except Exception as exc:  # noqa: BLE001 - a database hiccup: try again at the next poll
                    self._outbox_failures.failed(exc)
                self._notify_slots()
                self._wake.wait(self.settings.poll)
                self._wake.clear()
        finally:
            self._notify_slots()
            for th in [s.thread for s in self._slots] + [self._builtin_thread]:
                if th is not None:
                    th.join(timeout=self.settings.timeout + 5)
            self.close()

    def run_once(self, *, max_runs: int | None = None) -> RunResult:
        """Expand, then run due hooks in this thread (slot 0) until none is due. For tests and tools."""
        self.start()
        result = RunResult(expanded=self.expand())
        n = 0
        while max_runs is None or n < max_runs:
            counts = self._builtin_batch(None)
            counts.update({k: counts.get(k, 0) + v for k, v in self._work(self._slots[0], None).items()})
            ran = sum(v for k, v in counts.items() if k in ("done", "retried", "failed", "lost", "killed"))
            if not ran:
                break
            n += ran
            for outcome in ("done", "retried", "failed"):
                setattr(result, outcome, getattr(result, outcome) + counts.get(outcome, 0))
        return result

    # ---------------------------------------------------------------- loading

    def _load(self) -> None:
        """Load the hook files in a short-lived worker; a failure keeps the hooks we had."""
        if not self.settings.paths:  # [hooks] enabled = false, or no paths: builtins only
            self.registry.set_user([], [])
            self._register()
            return
        loader = WorkerProcess(self._boot, name="tomd-hooks-loader", load_timeout=self.settings.timeout)
        try:
            loader.start()
        except RuntimeError as exc:
            log.error("hooks: %s", exc)
            if not self._started:
                self.registry.set_user([], loader.problems)
                self._register()
            return
        finally:
            loader.close()
        for p in loader.problems:
            log.error("hook file problem: %s", p)
        self.registry.set_user(loader.specs, loader.problems)
        with self._lock:
            self._generation += 1
        self._register()
        names = sorted(self.registry.all())
        log.info("hooks: %d loaded (%s)", len(names), ", ".join(names) or "none")

    def _register(self) -> None:
        """Record first sightings, then set each hook's horizon and cursors."""
        from tomd.db import repository as repo
        from tomd.db.models import utcnow
        from tomd.events import HookRegistered

        hooks = self.registry.all()
        with self.sessions.begin() as s:
            if self._ordered_commits is None:
                self._ordered_commits = s.get_bind().dialect.name == "sqlite"
            seen = repo.hooks_with_runs(s, list(hooks))
            for name, h in hooks.items():
                if name in seen:
                    continue
                eid = repo.add_event_id(s, HookRegistered(name, tuple(h.kinds), h.where))
                repo.add_hook_run(s, {"hook": name, "event_id": eid, "state": "done", "attempts": 0,
                                      "finished_at": utcnow()})
                log.info("hook %s registered (%s): it gets events after #%d", name, h.where, eid)
        with self.sessions.begin() as s:
            bounds = repo.hook_event_bounds(s, list(hooks))
            for name, h in hooks.items():
                first, last = bounds.get(name, (0, 0))
                horizon = 0 if h.since == "all" else first
                start = horizon
                if last > horizon and name not in self._fast:
                    ev = repo.get_outbox_event(s, last)
                    if ev is not None:
                        back = repo.outbox_first_id_since(
                            s, ev.created_at - timedelta(seconds=self.settings.commit_window))
                        start = max(horizon, (back or last) - 1)
                self._horizon[name] = horizon
                self._fast.setdefault(name, start)
                self._slow.setdefault(name, start)

    # ---------------------------------------------------------------- expand

    def expand(self) -> int:
        """Add pending runs for new events; returns how many."""
        from tomd.db import repository as repo
        from tomd.db.models import utcnow

        hooks = self.registry.all()
        if not hooks:
            return 0
        now_m = time.monotonic()
        slow = (not self._ordered_commits and self.settings.commit_window > 0
                and now_m - self._last_slow >= self.settings.commit_window / 4)
        added = 0
        with self.sessions.begin() as s:
            top = repo.outbox_max_id(s)
            now = utcnow()
            for name, h in hooks.items():
                cursor = self._slow if slow else self._fast
                after = max(cursor.get(name, 0), self._horizon.get(name, 0))
                if top <= after:
                    continue
                kinds = None if "*" in h.kinds else list(h.kinds)
                added += repo.expand_hook_runs(s, name, kinds, after, now)
        for name in hooks:
            self._fast[name] = max(self._fast.get(name, 0), top)
        self._checkpoints.append((now_m, top))
        if slow:
            self._last_slow = now_m
            old = None
            while self._checkpoints and self._checkpoints[0][0] <= now_m - self.settings.commit_window:
                old = self._checkpoints.popleft()[1]
            if old is not None:
                for name in hooks:
                    self._slow[name] = max(self._slow.get(name, 0), old)
        elif self._ordered_commits:
            self._checkpoints.clear()
        return added

    # ---------------------------------------------------------------- running

    def _notify_slots(self) -> None:
        with self._cv:
            self._work_gen += 1
            self._cv.notify_all()

    def _slot_loop(self, slot: _Slot, stop: threading.Event) -> None:
        self._loop(stop, lambda: self._work(slot, stop))

    def _builtin_loop(self, stop: threading.Event) -> None:
        if self.registry.builtins:
            self._loop(stop, lambda: self._builtin_batch(stop))

    def _loop(self, stop: threading.Event, step: Callable[[], dict[str, int]]) -> None:
        # One per loop: a slot whose worker still answers must not reset another loop's count.
        failures = FailureLog(log, f"hooks: running hooks ({threading.current_thread().name})",
                              on_error=self._on_error)
        while not stop.is_set():
            with self._cv:
                gen = self._work_gen
            try:
                counts = step()
                failures.ok()
            except Exception as exc:  # noqa: BLE001 - the database went away: wait, then try again
                failures.failed(exc)
                stop.wait(self.settings.poll)
                continue
            busy = any(counts.get(k) for k in ("done", "retried", "failed", "lost", "killed"))
            if not busy:
                with self._cv:
                    self._cv.wait_for(lambda: self._work_gen != gen or stop.is_set(), timeout=self.settings.poll)

    def _work(self, slot: _Slot, stop: threading.Event | None) -> dict[str, int]:
        """One turn of a worker: it runs due user-hook runs until none is due."""
        names = sorted(self.registry.user)
        if not names:
            return {}
        if slot.generation != self._generation:  # the files were reloaded: a fresh interpreter imports them
            slot.worker.kill()
            slot.generation = self._generation
        slot.turns += 1
        claim_id = f"{self.worker_id}/{slot.index}.{slot.turns}"  # fences this turn's claims, also against a killed worker
        counts: dict[str, int] = {}

        def on_kill(run_id: int, error: str) -> None:
            from tomd.db import repository as repo

            d = Dispatcher(self.sessions, self.settings.limits, self.registry.user, claim_id)
            row = None
            if run_id:
                with self.sessions() as s:
                    row = repo.claimed_hook_run(s, run_id, claim_id)
            if row is not None:
                run_id, hook, attempts, event_id, kind, target_id = row
                spec = self.registry.user.get(hook)
                if spec is not None:
                    timeout = spec.timeout or self.settings.timeout
                    if error.startswith("TimeoutError"):
                        error = f"TimeoutError: hook {hook} ran longer than {timeout:g} s and was killed"
                        self._observe(hook, "timeout", timeout)
                    else:
                        self._observe(hook, "failed", 0.0)
                    c = Claimed(run_id, hook, attempts, event_id, kind, 0, {}, target_id, None)
                    for o in d.record_failures([(spec, c, error)]):
                        counts[o] = counts.get(o, 0) + 1
            d.release()  # the rest of its batch: pending again, no attempt used

        # The turn ends (the worker gives back what it has not started) at stop, and when the
        # files are reloaded: a busy turn must not go on running the old code on new events.
        turn_over = _TurnOver(lambda: (stop is not None and stop.is_set()) or slot.generation != self._generation)
        got = slot.worker.work(claim_id, names, stop=turn_over, on_end=self._on_end, on_kill=on_kill)
        for k, v in got.items():
            counts[k] = counts.get(k, 0) + v
        return counts

    def _builtin_batch(self, stop: threading.Event | None) -> dict[str, int]:
        if not self.registry.builtins:
            return {}
        d = Dispatcher(self.sessions, self.settings.limits, self.registry.builtins, f"{self.worker_id}/builtin",
                       on_end=self._on_end, rng=self.rng)
        counts: dict[str, int] = {}
        while not (stop is not None and stop.is_set()):
            outcomes = d.run_batch(stop.is_set if stop is not None else None)
            if not outcomes:
                break
            for o in outcomes:
                counts[o] = counts.get(o, 0) + 1
        return counts

    def _on_end(self, hook: str, outcome: str, seconds: float, requested: bool) -> None:
        self._observe(hook, outcome, seconds)
        if requested and self.on_request is not None:
            self.on_request()

    def _observe(self, hook: str, outcome: str, seconds: float) -> None:
        if self.observer is not None:
            try:
                self.observer.observe_hook(hook, outcome, seconds)
            except Exception:  # noqa: BLE001 - metrics never break delivery
                log.debug("observe_hook failed", exc_info=True)
