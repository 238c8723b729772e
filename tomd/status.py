"""Status polling: follow every submitted request to its end, recording each change once.

One ``Poller`` serves every facility; ``poll()`` runs one cycle over all of
them (bounded concurrency, a deadline per facility), ``poll_facility(name)``
one facility. A cycle for one facility::

    lock the facility (PostgreSQL: session advisory lock on a connection of its own;
    │                  taken elsewhere → skip this cycle)
    ├─ read the requests it follows: open ones (pending/scheduled/in_progress) and
    │  recently completed ones (LCO reopens COMPLETED → PENDING when the data is bad)
    ├─ ONE batched question: request groups modified since the cursor − overlap
    │  (LCO: a paginated listing, ~1 call per 1000 groups), every call bounded
    ├─ compare (state, facility word) with what is stored; per change, in one transaction:
    │  guarded update (only from the state read) · observation_status row · outbox event
    │  · data_due_at = now on completion · the next intent of a cadence series
    └─ save the cursor (poll_state) after the changes committed

The cursor is the facility's own clock: the latest ``modified`` it reported.
The facility compares ``modified_after`` against its own stamps, so our clock
never enters that comparison; the overlap margin re-lists the last minutes
to cover changes committed out of order. Only when nothing changed for a long
time does the cursor move with our clock, minus ``skew_margin_s`` (the most
the two clocks may disagree). A crash anywhere re-polls from the old cursor:
a replayed change finds the row already moved and records nothing.

Errors (timeouts, 5xx, 429 beyond the client's retries) leave the database
and cursor as they were; the next cycle catches up.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tomd.cadence import next_intent
from tomd.db import repository as repo
from tomd.errors import PermanentError, RetryableError
from tomd.events import ObservationStatusChanged
from tomd.facilities.base import FINAL_STATES, Facility, RequestStatus
from tomd.logs import FailureLog

log = logging.getLogger(__name__)

LOCK_SPACE = 7413  # advisory-lock key space of status polls (7411: target requests, 7412: notification channels)


@dataclass(frozen=True)
class PollSettings:
    overlap_s: float = 120.0  # re-list this much before the cursor (out-of-order commits at the facility)
    skew_margin_s: float = 600.0  # the most our clock and the facility's may differ
    stale_cursor_s: float = 6 * 3600.0  # nothing changed this long: move the cursor with our clock
    reopen_window_s: float = 30 * 86400.0  # completed requests touched this recently are still followed
    facility_timeout_s: float = 300.0  # one facility's cycle; its calls are bounded by the client too
    max_workers: int = 4  # facilities polled at once
    chunk: int = 500  # changes per transaction


@dataclass(frozen=True)
class Change:
    """One recorded state change."""

    request_id: int
    name: str
    facility: str
    facility_id: str
    old_state: str
    new_state: str
    facility_state: str
    reopened: bool = False
    next_intent: int | None = None  # a cadence series' next request, created with this change


@dataclass
class FacilityPoll:
    """What one facility's cycle did."""

    facility: str
    followed: int = 0  # requests followed
    reported: int = 0  # of them, reported by the facility as modified
    changes: list[Change] = field(default_factory=list)
    skipped: str | None = None  # why nothing was asked (another poller holds the facility, ...)
    error: str | None = None
    since: datetime | None = None
    seconds: float = 0.0


# (facility, new state) for each change: metrics.observe_status_change fits.
ChangeObserver = Callable[[str, str], None]
# {state: count} of unfinished requests after a cycle: metrics.set_open_requests fits.
OpenObserver = Callable[[Mapping[str, int]], None]
# Creates the next request of a cadence series in the change's transaction (tomd.cadence.next_intent fits).
CadenceHook = Callable[[Session, int, str, datetime], int | None]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def lock_key(facility: str) -> int:
    """A stable 31-bit key per facility name (the same in every process)."""
    return zlib.crc32(facility.encode()) & 0x7FFFFFFF


class Poller:
    """Polls facilities' request states into the database. Thread-safe; one per daemon is enough.

    ``facilities`` maps names to clients; ``cadence`` (``tomd.cadence.next_intent``)
    makes a series' next intent when a request with a cadence ends; ``wake``
    (``Submitter.wake``) is called after a commit that created intents.
    """

    def __init__(self, sessions: sessionmaker[Session], facilities: Mapping[str, Facility],
                 settings: PollSettings = PollSettings(), *, on_change: ChangeObserver | None = None,
                 on_open: OpenObserver | None = None, cadence: CadenceHook | None = next_intent,
                 wake: Callable[[], None] | None = None, clock: Callable[[], datetime] = _now):
        self.sessions = sessions
        self.facilities = facilities
        self.settings = settings
        self.on_change = on_change
        self.on_open = on_open
        self.cadence = cadence
        self.wake = wake
        self.clock = clock
        engine = sessions.kw.get("bind")
        self._engine = engine
        self._postgres = engine is not None and engine.dialect.name == "postgresql"
        self._local: dict[str, threading.Lock] = {}
        self._local_guard = threading.Lock()
        # ``on_error(exc)``: told of every failed cycle or open-request read (the daemon counts
        # database errors in tomd_database_errors_total{component="status"}). The log says the
        # first failure with its traceback and repeats in one line now and then (an outage).
        self.on_error: Callable[[BaseException], None] | None = None
        self._failure_logs: dict[str, FailureLog] = {}

    # -- driving -------------------------------------------------------------------

    def poll(self, only: Sequence[str] | None = None, *, full: bool = False) -> list[FacilityPoll]:
        """One cycle over every facility (or ``only``), at most ``max_workers`` at once."""
        names = [n for n in self.facilities if only is None or n in only]
        if not names:
            return []
        out: list[FacilityPoll] = []
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.settings.max_workers, len(names))),
                                  thread_name_prefix="poll")
        try:
            futures = {n: pool.submit(self.poll_facility, n, full=full) for n in names}
            deadline = self.clock() + timedelta(seconds=self.settings.facility_timeout_s)
            for n, fut in futures.items():
                left = max(0.0, (deadline - self.clock()).total_seconds())
                try:
                    out.append(fut.result(timeout=left))
                except FutureTimeout:
                    # The thread ends by itself (every call is bounded) and keeps the facility's lock till then.
                    log.warning("polling %s did not finish within %.0f s", n, self.settings.facility_timeout_s)
                    out.append(FacilityPoll(n, error=f"did not finish within {self.settings.facility_timeout_s:g} s"))
        finally:
            pool.shutdown(wait=False)
        self._report_open()
        return out

    def poll_facility(self, name: str, *, full: bool = False) -> FacilityPoll:
        """One facility's cycle; never raises for the facility's or the network's faults."""
        started = self.clock()
        result = FacilityPoll(name)
        try:
            with self._hold(name) as held:
                if not held:
                    result.skipped = "another poller is polling this facility"
                    log.debug("%s: %s; skipped", name, result.skipped)
                    return result
                self._poll_held(name, result, full=full)
        except (RetryableError, PermanentError) as exc:
            result.error = str(exc)
            log.warning("polling %s: %s; the next cycle catches up", name, exc)
        except Exception as exc:  # noqa: BLE001 - the database or a bug: logged, the cycle ends, jobs go on
            result.error = f"{type(exc).__name__}: {exc}"
            self._failures(f"polling {name}").failed(exc)
        else:
            if not result.skipped:
                self._failures(f"polling {name}").ok()
        finally:
            result.seconds = (self.clock() - started).total_seconds()
        return result

    def _failures(self, what: str) -> FailureLog:
        with self._local_guard:
            f = self._failure_logs.get(what)
            if f is None:
                f = self._failure_logs[what] = FailureLog(log, what, on_error=self._on_error)
            return f

    def _on_error(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(exc)

    # -- one facility ------------------------------------------------------------------

    def _poll_held(self, name: str, result: FacilityPoll, *, full: bool) -> None:
        fac = self.facilities[name]
        st = self.settings
        now = self.clock()
        with self.sessions() as s:
            _, cursor = repo.status_poll_state(s, name)
            rows = repo.pollable_requests(s, name, completed_since=now - timedelta(seconds=st.reopen_window_s))
        result.followed = len(rows)
        cur = None if full else _parse_time(cursor)
        if not rows:
            # Nothing to miss: the next submission's group is younger than our clock minus the margin.
            quiet = now - timedelta(seconds=st.skew_margin_s)
            with self.sessions.begin() as s:
                repo.save_poll_state(s, name, now, max(cur, quiet).isoformat() if cur else quiet.isoformat())
            return
        if cur is not None:
            since = cur - timedelta(seconds=st.overlap_s)
        else:
            # First poll (or --full): from the oldest open submission (else the oldest followed one),
            # by our clock, so with the skew margin.
            open_rows = [r for r in rows if r["state"] in repo.OPEN_STATES] or rows
            oldest = min((r["submitted_at"] or r["created_at"]) for r in open_rows)
            since = oldest - timedelta(seconds=st.skew_margin_s + st.overlap_s)
        result.since = since
        by_fid = {str(r["facility_id"]): r for r in rows}
        reported = fac.statuses(sorted(by_fid), since=since)
        result.reported = len(reported)

        pending: list[tuple[Any, RequestStatus]] = []
        partial: list[int] = []
        for fid, status in reported.items():
            row = by_fid.get(fid)
            if row is None:
                continue
            if (status.state.common, status.state.word) != (row["state"], row["facility_state"]):
                pending.append((row, status))
            elif row["state"] != "completed" and self._partly_completed(status):
                # Same state, but an inner request finished (the group was modified): its data is due.
                partial.append(row["id"])
        if partial:
            with self.sessions.begin() as s:
                repo.mark_data_due(s, partial, now)
        created = False
        for i in range(0, len(pending), st.chunk):
            changes = self._record(name, pending[i:i + st.chunk])
            result.changes.extend(changes)
            created = created or any(c.next_intent for c in changes)

        seen = [t for t in (_parse_time(x.modified) for x in reported.values()) if t is not None]
        if seen:
            new_cursor: datetime | None = max(seen + ([cur] if cur else []))  # the facility's clock
        elif cur is None or cur < now - timedelta(seconds=st.stale_cursor_s):
            new_cursor = now - timedelta(seconds=st.skew_margin_s)
        else:
            new_cursor = cur
        with self.sessions.begin() as s:
            repo.save_poll_state(s, name, now, new_cursor.isoformat() if new_cursor else None)
        if result.changes:
            log.info("%s: %d of %d followed requests changed", name, len(result.changes), len(rows))
        if created and self.wake is not None:
            self.wake()

    def _record(self, facility: str, batch: list[tuple[Any, RequestStatus]]) -> list[Change]:
        """Apply a batch of changes in one transaction; returns the ones applied."""
        now = self.clock()
        changes: list[Change] = []
        history: list[dict[str, Any]] = []
        events: list[tuple[ObservationStatusChanged, int | None]] = []
        with self.sessions.begin() as s:
            for row, status in batch:
                old, new, word = row["state"], status.state.common, status.state.word
                reopened = old in FINAL_STATES and new not in FINAL_STATES
                values: dict[str, Any] = {"state": new, "facility_state": word, "last_polled_at": now}
                if new == "completed" or self._partly_completed(status):
                    values["data_due_at"] = now  # the data retriever picks it up
                if not repo.set_request_status(s, row["id"], old, row["facility_state"], values):
                    continue  # someone moved it first (a cancel, another poll): theirs stands
                if reopened:
                    msg = f"reopened by {facility}: {row['facility_state'] or old} → {word}"
                elif new == old:
                    msg = f"{facility} says {word} (was {row['facility_state']})"
                else:
                    msg = f"{facility} says {word}"
                history.append({"request_id": row["id"], "time": now, "state": new, "facility_state": word,
                                "message": msg})
                events.append((ObservationStatusChanged(row["id"], row["name"], facility, str(row["facility_id"]),
                                                        row["target_id"], old, new, word, reopened), row["target_id"]))
                nxt = None
                if self.cadence is not None and row["cadence"] and new in FINAL_STATES and old not in FINAL_STATES:
                    nxt = self.cadence(s, row["id"], new, now)
                changes.append(Change(row["id"], row["name"], facility, str(row["facility_id"]), old, new, word,
                                      reopened, nxt))
            repo.add_status_rows(s, history)
            repo.add_events(s, events)
        if self.on_change is not None:
            for c in changes:
                try:
                    self.on_change(facility, c.new_state)
                except Exception:  # noqa: BLE001 - metrics never break polling
                    log.exception("status observer failed")
        return changes

    @staticmethod
    def _partly_completed(status: RequestStatus) -> bool:
        """Some inner requests completed while the group goes on (a facility that reports them)."""
        return bool(getattr(status, "completed_request_ids", ()))

    def _report_open(self) -> None:
        if self.on_open is None:
            return
        try:
            with self.sessions() as s:
                counts = repo.unfinished_request_counts(s)
            self.on_open(counts)
        except Exception as exc:  # noqa: BLE001 - the database, mostly: the next cycle reads again
            self._failures("reading open requests").failed(exc)
        else:
            self._failures("reading open requests").ok()

    # -- one poller per facility at a time ---------------------------------------------

    @contextmanager
    def _hold(self, name: str) -> Iterator[bool]:
        """In-process lock (the scheduler and `run_now`), then across processes on PostgreSQL."""
        with self._local_guard:
            local = self._local.setdefault(name, threading.Lock())
        if not local.acquire(blocking=False):
            yield False
            return
        try:
            if not self._postgres:
                yield True  # SQLite: one process (and its writers are serialised anyway)
                return
            with self._db_lock(name) as got:
                yield got
        finally:
            local.release()

    @contextmanager
    def _db_lock(self, name: str) -> Iterator[bool]:
        # A session-level lock on a connection of its own, held for the whole cycle and
        # released by the server if this process dies. A pooled connection must never
        # go back to the pool still holding it: unlock, or throw the connection away.
        conn = self._engine.connect()
        try:
            got = repo.try_advisory_lock(conn, LOCK_SPACE, lock_key(name))
            conn.commit()
            if not got:
                yield False
                return
            try:
                yield True
            finally:
                try:
                    repo.advisory_unlock(conn, LOCK_SPACE, lock_key(name))
                    conn.commit()
                except Exception:  # noqa: BLE001
                    conn.invalidate()
        finally:
            conn.close()
