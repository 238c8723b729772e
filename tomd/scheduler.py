"""Periodic jobs inside the daemon: APScheduler 3's BackgroundScheduler, kept small.

``Jobs`` runs named interval jobs in a bounded thread pool::

    jobs = Jobs()
    jobs.add_pollers(poller, {"lco": 300.0, "soar": 600.0})   # "poll:lco", "poll:soar"
    jobs.add_interval("data", retriever.run_once, 60.0)       # any stage's job
    jobs.start() … jobs.run_now("poll:lco") … jobs.shutdown(wait=True)

Each job runs at most once at a time (``max_instances=1``); runs missed while
one was busy or the process was paused collapse into one (``coalesce``). A
job that raises is logged with its name and runs again at its next time: one
bad cycle never ends the schedule. Jobs start after a small random delay
(``jitter``) so several daemons started together do not all call the
facilities in the same second (they would mostly skip each other anyway: the
poller's per-facility lock).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from tomd.logs import FailureLog

log = logging.getLogger(__name__)


class _QuietSkips(logging.Filter):
    """Drops APScheduler's "skipped: maximum number of running instances reached" WARNING: with
    ``max_instances=1`` a run still busy at the next tick (a 1 s ``poll_interval`` against a slow
    facility, or a database outage) is the design, not news, and it came once a second per job.
    ``Jobs.skipped`` counts them instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


def _quiet_apscheduler() -> None:
    logger = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _QuietSkips) for f in logger.filters):
        logger.addFilter(_QuietSkips())


class Jobs:
    """Named interval jobs on a background scheduler. ``start()`` / ``shutdown(wait=True)``.

    A daemon component (``tomd.daemon.Daemon.add``): ``name``, ``start``/``shutdown``, ``ready``.
    """

    def __init__(self, *, workers: int = 4, first_delay_s: float = 1.0, jitter_s: float = 5.0,
                 rng: random.Random | None = None, name: str = "scheduler"):
        self.name = name
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max(1, workers))},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
            timezone=timezone.utc,
        )
        self.first_delay_s = first_delay_s
        self.jitter_s = jitter_s
        self._rng = rng or random.Random()
        self._names: set[str] = set()
        self.runs: dict[str, int] = {}  # name → finished runs (ok or not), for health and tests
        self.failures: dict[str, int] = {}
        self.last_error: dict[str, str] = {}
        self.skipped: dict[str, int] = {}  # name → ticks skipped because its last run was still busy
        # ``on_error(exc)``: told of every failed run (tomd.metrics counts database errors).
        self.on_error: Callable[[BaseException], None] | None = None
        self._failures: dict[str, FailureLog] = {}
        self._lock = threading.Lock()
        _quiet_apscheduler()
        self._scheduler.add_listener(self._skipped, EVENT_JOB_MAX_INSTANCES)

    # -- jobs ----------------------------------------------------------------------

    def add_interval(self, name: str, fn: Callable[[], Any], seconds: float, *, start_now: bool = False) -> None:
        """Run ``fn()`` every ``seconds``, first after a short jittered delay (or at once)."""
        if name in self._names:
            raise ValueError(f"a job named {name!r} exists already")
        if not seconds > 0:
            raise ValueError(f"job {name}: interval must be > 0 seconds, got {seconds!r}")
        delay = 0.0 if start_now else self.first_delay_s + self._rng.uniform(0.0, min(self.jitter_s, seconds))
        first = datetime.now(timezone.utc) + timedelta(seconds=delay)
        self._scheduler.add_job(self._guarded, "interval", seconds=seconds, args=(name, fn), id=name, name=name,
                                next_run_time=first, replace_existing=False)
        self._names.add(name)

    def add_pollers(self, poller: Any, intervals: Mapping[str, float]) -> None:
        """One job per facility, ``poll:<facility>``, at the facility's ``poll_interval``."""
        for facility, seconds in intervals.items():
            self.add_interval(f"poll:{facility}", _poll_one(poller, facility), seconds)

    def run_now(self, name: str) -> None:
        """Run job ``name`` as soon as a worker is free (a run in progress is not doubled)."""
        try:
            self._scheduler.modify_job(name, next_run_time=datetime.now(timezone.utc))
        except JobLookupError:
            known = ", ".join(sorted(self._names)) or "none"
            raise KeyError(f"no job {name!r} (jobs: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._names)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self._scheduler.start()
        log.info("scheduler running %d job(s): %s", len(self._names), ", ".join(sorted(self._names)) or "none")

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling; with ``wait``, let the runs in progress finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def ready(self) -> bool | str:
        # ``running`` is only a state flag: the scheduler's own thread can have died (an error
        # escaping its loop) with the flag still set, and then no job ever runs again.
        if not self.running:
            return "scheduler not running"
        thread = getattr(self._scheduler, "_thread", None)
        if thread is None or not thread.is_alive():
            return "scheduler thread not alive"
        return True

    # -- one run -------------------------------------------------------------------

    def _skipped(self, event: Any) -> None:
        with self._lock:
            self.skipped[event.job_id] = self.skipped.get(event.job_id, 0) + 1

    def _failure_log(self, name: str) -> FailureLog:
        with self._lock:
            f = self._failures.get(name)
            if f is None:
                f = self._failures[name] = FailureLog(log, f"job {name}", on_error=self._on_error)
            return f

    def _on_error(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(exc)

    def _guarded(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            self._failure_log(name).ok()
        except Exception as exc:  # noqa: BLE001 - logged; the job runs again at its next time
            with self._lock:
                self.failures[name] = self.failures.get(name, 0) + 1
                self.last_error[name] = f"{type(exc).__name__}: {exc}"
            # First failure with its traceback, repeats as one line now and then (an outage).
            self._failure_log(name).failed(exc)
        finally:
            with self._lock:
                self.runs[name] = self.runs.get(name, 0) + 1


def _poll_one(poller: Any, facility: str) -> Callable[[], Any]:
    def run() -> Any:
        return poller.poll([facility])

    run.__name__ = f"poll_{facility}"
    return run


def status_jobs(sessions: Any, facilities: Mapping[str, Any], config: Any, *, wake: Callable[[], None] | None = None,
                metrics: Any = None, cadence_sweep_s: float = 300.0, jobs: Jobs | None = None,
                on_change: Callable[[str, str], None] | None = None) -> Jobs:
    """The status stage's jobs for ``tomd run``: ``poll:<facility>`` at each facility's
    ``poll_interval``, and ``cadence`` (series whose request failed before reaching the
    facility). ``wake``: the submitter's (a cadence step made an intent); ``metrics``: a
    ``tomd.metrics.Metrics`` (status changes, open requests); ``on_change(facility, state)``:
    told of every change too (the daemon wakes the data retriever on completions)."""
    from tomd.cadence import sweep
    from tomd.status import Poller

    observers = [f for f in (metrics.observe_status_change if metrics is not None else None, on_change) if f]

    def changed(facility: str, state: str) -> None:
        for f in observers:
            f(facility, state)

    jobs = jobs or Jobs()
    poller = Poller(sessions, facilities, wake=wake, on_change=changed if observers else None,
                    on_open=metrics.set_open_requests if metrics is not None else None)
    jobs.poller = poller  # type: ignore[attr-defined]  # for `run_now` callers and tests
    jobs.add_pollers(poller, {name: float(config.facilities[name].poll_interval) for name in facilities
                              if name in config.facilities})

    def cadence() -> None:
        made = sweep(sessions)
        if made and wake is not None:
            wake()

    jobs.add_interval("cadence", cadence, cadence_sweep_s)
    return jobs
