"""The hook runner: outbox events → hook_runs rows → hooks, at least once, isolated.

::

    outbox (events, written in their stage's transaction)
       │ expand: one pending hook_runs row per (hook, event) of a kind it takes
       ▼         (INSERT … SELECT … ON CONFLICT DO NOTHING: many daemons, one row)
    hook_runs ── claim one due row with a lease (SKIP LOCKED / BEGIN IMMEDIATE)
       │
       ├─ user hook: the worker process runs it (timeout → worker killed);
       │   its recorded actions are applied in the transaction that marks it done
       └─ builtin: fn(session, event) inside the transaction that marks it done
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
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tomd.hooks.registry import Builtin, HookSpec, Registry
from tomd.hooks.worker import Outcome, WorkerBoot, WorkerProcess

log = logging.getLogger("tomd.hooks")

__all__ = ["HookRunner", "RunnerSettings", "RunResult"]


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
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, hooks) -> RunnerSettings:
        return cls(paths=tuple(hooks.paths), timeout=hooks.timeout, max_attempts=hooks.max_attempts,
                   retry_backoff=getattr(hooks, "retry_backoff", 10.0), retry_max=getattr(hooks, "retry_max", 3600.0),
                   workers=getattr(hooks, "workers", 1), poll=getattr(hooks, "poll", 2.0),
                   commit_window=getattr(hooks, "commit_window", 120.0),
                   settings=dict(getattr(hooks, "settings", {}) or {}))


@dataclass
class RunResult:
    """Counts from :meth:`HookRunner.run_once`."""

    expanded: int = 0
    done: int = 0
    retried: int = 0
    failed: int = 0


def backoff(attempt: int, base: float, cap: float, rng: random.Random = random) -> float:  # type: ignore[assignment]
    """Seconds before attempt ``attempt + 1``: base·2^(attempt-1), capped, with jitter in [½, 1]×."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return delay * (0.5 + 0.5 * rng.random())


class _Slot:
    """One worker process and the thread that feeds it."""

    def __init__(self, runner: HookRunner, index: int):
        self.index = index
        self.worker = WorkerProcess(runner._boot, name=f"tomd-hooks-{index}", load_timeout=runner.settings.timeout)
        self.generation = runner._generation
        self.thread: threading.Thread | None = None


class HookRunner:
    """Feeds outbox events to hooks. Build with :meth:`from_config`; ``run(stop)`` in a thread.

    ``observer``: an object with ``observe_hook(hook, outcome, seconds)``
    (tomd.metrics.Metrics). ``on_request``: called after a commit that
    created observation intents (the daemon wakes its submitter).
    """

    def __init__(self, sessions, settings: RunnerSettings, *, database_url: str | None = None,
                 storage_config: Any = None, registry: Registry | None = None, observer: Any = None,
                 on_request: Callable[[], None] | None = None, worker_id: str | None = None):
        self.sessions = sessions
        self.settings = settings
        self.registry = registry or Registry()
        self.observer = observer
        self.on_request = on_request
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xffff:x}"
        self._boot = WorkerBoot(paths=tuple(settings.paths), database_url=database_url, storage=storage_config,
                                settings={k: dict(v) for k, v in settings.settings.items()}, parent_pid=os.getpid())
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
        self._builtin_error = ""

    @classmethod
    def from_config(cls, config, sessions, storage: Any = None, *, observer: Any = None,
                    registry: Registry | None = None, on_request: Callable[[], None] | None = None) -> HookRunner:
        """The runner ``[hooks]`` describes. ``storage`` is unused in the daemon (the worker opens
        its own store from ``[storage]``); accepted so every component is built alike."""
        bind = sessions.kw.get("bind")
        url = bind.url.render_as_string(hide_password=False) if bind is not None else None
        return cls(sessions, RunnerSettings.from_config(config.hooks), database_url=url,
                   storage_config=config.storage, registry=registry, observer=observer, on_request=on_request)

    # ---------------------------------------------------------------- control

    def start(self) -> None:
        """Load the hook files (in a worker) and register the hooks; idempotent."""
        if not self._started:
            self._load()
            self._started = True

    def wake(self) -> None:
        """New events were committed: look now rather than at the next poll."""
        self._wake.set()

    def reload(self) -> None:
        """Read the hook files again (SIGHUP). Safe from a signal handler: the run loop does it."""
        self._reload.set()
        self._wake.set()

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
        try:
            while not stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    self._load()
                try:
                    if self.expand():
                        self._notify_slots()
                except Exception:  # noqa: BLE001 - a database hiccup: try again at the next poll
                    log.exception("hooks: reading the outbox failed; retrying in %.0f s", self.settings.poll)
                self._notify_slots()
                self._wake.wait(self.settings.poll)
                self._wake.clear()
        finally:
            self._notify_slots()
            for slot in self._slots:
                if slot.thread is not None:
                    slot.thread.join(timeout=self.settings.timeout + 5)
            self.close()

    def run_once(self, *, max_runs: int | None = None) -> RunResult:
        """Expand, then run due hooks in this thread (slot 0) until none is due. For tests and tools."""
        self.start()
        result = RunResult(expanded=self.expand())
        slot = self._slots[0]
        n = 0
        while max_runs is None or n < max_runs:
            outcomes = self._run_batch(slot)
            if not outcomes:
                break
            n += len(outcomes)
            for outcome in outcomes:
                if outcome != "lost":  # another daemon took the run over after our lease ended
                    setattr(result, outcome, getattr(result, outcome) + 1)
        return result

    # ---------------------------------------------------------------- loading

    def _load(self) -> None:
        """Load the hook files in a short-lived worker; a failure keeps the hooks we had."""
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
        while not stop.is_set():
            with self._cv:
                gen = self._work_gen
            try:
                outcomes = self._run_batch(slot, stop)
            except Exception:  # noqa: BLE001 - the database went away: wait, then try again
                log.exception("hooks: running a hook failed; retrying in %.0f s", self.settings.poll)
                stop.wait(self.settings.poll)
                continue
            if not outcomes:
                with self._cv:
                    self._cv.wait_for(lambda: self._work_gen != gen or stop.is_set(), timeout=self.settings.poll)

    def _hook_timeout(self, h: HookSpec | Builtin) -> float:
        return h.timeout or self.settings.timeout

    def _run_batch(self, slot: _Slot, stop: threading.Event | None = None) -> list[str]:
        """Claim up to ``claim_batch`` due runs and run them in turn; returns their outcomes
        ("done", "retried", "failed", "lost": the claim was lost); empty if none was due.

        One claim transaction per batch, and failed attempts recorded together,
        keep the runner's share of the database small while a hook fails on
        everything. A success is recorded at once (with its actions), so a
        crash repeats at most the run in flight. Before each run, its lease is
        extended if it might end before the run's timeout.
        """
        from tomd.db import repository as repo
        from tomd.db.models import utcnow

        hooks = self.registry.all()
        now = utcnow()
        lease = {n: now + timedelta(seconds=self._hook_timeout(h) + self.settings.lease_margin)
                 for n, h in hooks.items()}
        with self.sessions.begin() as s:
            claimed = repo.claim_hook_runs(s, self.worker_id, list(hooks), now=now, lease=lease,
                                           limit=self.settings.claim_batch)
        outcomes: list[str] = []
        failures: list[tuple] = []
        try:
            for i, (run_id, name, attempts, event_id, kind, version, payload, target_id, until) in enumerate(claimed):
                h = hooks.get(name) or self.registry.get(name)
                if h is None or (stop is not None and stop.is_set()):
                    self._release([c[0] for c in claimed[i:]])
                    break
                timeout = self._hook_timeout(h)
                now = utcnow()
                if until - now < timedelta(seconds=timeout + self.settings.lease_margin / 2):
                    rest = {c[0]: now + timedelta(seconds=self._hook_timeout(hooks.get(c[1], h))
                                                  + self.settings.lease_margin) for c in claimed[i:]}
                    with self.sessions.begin() as s:
                        kept = repo.extend_hook_leases(s, self.worker_id, rest)
                    claimed[i:] = [c[:8] + (rest[c[0]],) for c in claimed[i:]]
                    if run_id not in kept:
                        outcomes.append("lost")
                        continue
                event_json = {"kind": kind, "version": version, "payload": payload}
                if isinstance(h, Builtin):
                    outcome = self._run_builtin(h, run_id, attempts, event_id, event_json, target_id)
                    if outcome is not None:
                        outcomes.append(outcome)
                        continue
                    failures.append((h, run_id, attempts, event_id, kind, target_id, self._builtin_error))
                    continue
                if slot.generation != self._generation:  # files reloaded: a fresh interpreter imports them
                    slot.worker.kill()
                    slot.generation = self._generation
                result = slot.worker.run(name, event_json, event_id, target_id, attempts + 1, timeout)
                if result.status == "ok":
                    try:
                        applied = self._finish_ok(run_id, attempts, name, event_id, result.actions)
                    except Exception:  # noqa: BLE001 - e.g. an action on a target that is gone
                        result = Outcome("error", error="applying the hook's actions failed:\n"
                                         + traceback.format_exc(), seconds=result.seconds)
                    else:
                        self._observe(name, "ok", result.seconds)
                        outcomes.append("done" if applied else "lost")
                        continue
                self._observe(name, "timeout" if result.status == "timeout" else "failed", result.seconds)
                failures.append((h, run_id, attempts, event_id, kind, target_id, result.error))
        finally:
            if failures:
                outcomes.extend(self._finish_failed(failures))
        return outcomes

    def _release(self, run_ids: list[int]) -> None:
        """Give claimed runs back (stopping): pending again at once, attempts unchanged."""
        from tomd.db import repository as repo

        with self.sessions.begin() as s:
            for run_id in run_ids:
                repo.finish_hook_run(s, run_id, self.worker_id, {"state": "pending", "claimed_by": None,
                                                                 "claimed_until": None})

    def _run_builtin(self, h: Builtin, run_id: int, attempts: int, event_id: int, event_json: dict,
                     target_id: int | None) -> str | None:
        """Run a builtin inside its done transaction: "done" / "lost", or None if it raised
        (the traceback is left in ``_builtin_error`` for the batch's failure records)."""
        from tomd.db import repository as repo
        from tomd.db.models import utcnow
        from tomd.hooks.api import event_from_json

        t0 = time.monotonic()
        try:
            event = event_from_json(event_json, where=f"outbox #{event_id}")
            with self.sessions.begin() as s:
                if not repo.finish_hook_run(s, run_id, self.worker_id, {
                        "state": "done", "attempts": attempts + 1, "finished_at": utcnow(), "error": None,
                        "claimed_by": None, "claimed_until": None}):
                    log.warning("hook %s event #%d: the claim was lost (lease over); left to its new owner",
                                h.name, event_id)
                    return "lost"
                h.fn(s, event)
        except Exception:  # noqa: BLE001 - a builtin's failure is retried like a hook's
            self._observe(h.name, "failed", time.monotonic() - t0)
            self._builtin_error = traceback.format_exc()
            return None
        self._observe(h.name, "ok", time.monotonic() - t0)
        return "done"

    def _finish_ok(self, run_id: int, attempts: int, name: str, event_id: int, actions: list) -> bool:
        from tomd.db import repository as repo
        from tomd.db.models import utcnow
        from tomd.hooks.api import apply_actions

        with self.sessions.begin() as s:
            if not repo.finish_hook_run(s, run_id, self.worker_id, {
                    "state": "done", "attempts": attempts + 1, "finished_at": utcnow(), "error": None,
                    "claimed_by": None, "claimed_until": None}):
                log.warning("hook %s event #%d: the claim was lost (lease over); its actions are not applied",
                            name, event_id)
                return False
            changes = apply_actions(s, actions, hook=name, event_id=event_id)
        for line in changes:
            log.info("hook %s event #%d: %s", name, event_id, line)
        if self.on_request is not None and any(a.get("action") == "request" for a in actions):
            self.on_request()
        return True

    def _finish_failed(self, failures: list[tuple]) -> list[str]:
        """Record failed attempts in one transaction: pending again after a backoff, or failed."""
        from tomd.db import repository as repo
        from tomd.db.models import utcnow
        from tomd.events import HookFailed

        now = utcnow()
        updates, finals = [], []
        for h, run_id, attempts, event_id, kind, target_id, error in failures:
            n = attempts + 1
            limit = h.max_attempts or self.settings.max_attempts
            last_line = (error.strip().splitlines() or ["error"])[-1][:500]
            values = {"attempts": n, "error": error, "claimed_by": None, "claimed_until": None}
            if n >= limit:
                values.update(state="failed", finished_at=now)
            else:
                delay = backoff(n, self.settings.retry_backoff, self.settings.retry_max, self.rng)
                values.update(state="pending", next_attempt_at=now + timedelta(seconds=delay))
            updates.append((run_id, values))
            finals.append((n >= limit, h, event_id, kind, target_id, n, limit, values.get("next_attempt_at"),
                           last_line))
        with self.sessions.begin() as s:
            mine = repo.finish_hook_runs(s, self.worker_id, updates)
            # a hook failing on hook.failed must not feed itself
            repo.add_events(s, [(HookFailed(h.name, event_id, kind, n, last_line, target_id), target_id)
                                for (run_id, _), (final, h, event_id, kind, target_id, n, _l, _t, last_line)
                                in zip(updates, finals) if final and run_id in mine and kind != HookFailed.kind])
        outcomes, logs = [], []
        for (run_id, _), (final, h, event_id, kind, _tid, n, limit, next_at, last_line) in zip(updates, finals):
            if run_id not in mine:
                outcomes.append("lost")
                continue
            outcomes.append("failed" if final else "retried")
            logs.append((final, h, event_id, kind, n, limit, next_at, last_line))
        retries: dict[str, list[tuple]] = {}
        for final, h, event_id, kind, n, limit, next_at, last_line in logs:
            if final:
                log.error("hook %s (%s) failed on event #%d (%s) after %d attempt(s): %s", h.name, h.where,
                          event_id, kind, n, last_line)
            else:
                retries.setdefault(h.name, []).append((event_id, kind, n, limit, next_at, last_line))
        # One line per hook and batch: a hook failing on every event must not flood the log.
        for name, items in retries.items():
            event_id, kind, n, limit, next_at, last_line = items[0]
            more = f" (and {len(items) - 1} more event(s) in this batch)" if len(items) > 1 else ""
            log.warning("hook %s failed on event #%d (%s), attempt %d of %d, retrying in %.1f s%s: %s", name,
                        event_id, kind, n, limit, (next_at - now).total_seconds(), more, last_line)
        return outcomes

    def _observe(self, hook: str, outcome: str, seconds: float) -> None:
        if self.observer is not None:
            try:
                self.observer.observe_hook(hook, outcome, seconds)
            except Exception:  # noqa: BLE001 - metrics never break delivery
                log.debug("observe_hook failed", exc_info=True)
