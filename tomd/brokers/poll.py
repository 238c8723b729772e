"""The poll loop shared by every broker service (``[[streams]] kind = "poll"``).

At-least-once, like the Kafka consumer (Invariant 1)::

    cursor (poll_state "broker:<stream>")  ─►  window [cursor - overlap, now]
         ▲                                        │ split in halves while a page
         │                                        │ comes back full (services that
         │                                        ▼ filter by time both ways)
    save window end  ◄── Ingestor.handle(items of the window) commits

The cursor moves only after the ingest transaction that holds everything the
window returned has committed; a crash in between polls the window again and
the alerts' per-source keys make that change nothing. ``overlap`` reaches back
before the cursor for results a broker publishes late (its processing delay);
overlapping windows cost requests, not duplicates.

Windows are processed oldest first and the cursor never moves backwards, so
"everything before the cursor is stored" holds at every commit. Failures never
crash the daemon: a service that is down or refuses (bad key, bad query) is
logged with its words and asked again at the next interval.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import httpx

from tomd.alerts.ingest import Ingestor
from tomd.brokers.http import BrokerHttp
from tomd.db import repository as repo
from tomd.errors import ConfigError, PermanentError, RetryableError

log = logging.getLogger(__name__)

MIN_SPLIT = timedelta(seconds=1)  # windows are not split below this
# Advisory-lock key space of broker polls (7411 target requests, 7412 notification
# channels, 7413 facility status polls).
LOCK_SPACE = 7421


@dataclass(frozen=True)
class Window:
    start: datetime  # inclusive, UTC
    end: datetime  # the poll's "now" (or a half of a split window)

    def halves(self) -> tuple[Window, Window]:
        mid = self.start + (self.end - self.start) / 2
        return Window(self.start, mid), Window(mid, self.end)


@dataclass(frozen=True)
class Item:
    """One result: a label for its coordinates, its bytes, and — when the listing
    already tells — the alert key its parser will give it (``source``, ``key``).

    With a key, the loop skips results already stored before asking the
    service for their details (``value`` is then built by ``detail()``), so an
    overlap costs one listing, not one request per object again.
    """

    label: str  # e.g. "object/2024abc"
    value: bytes | None = None
    source: str | None = None
    key: str | None = None
    hit: Any = None  # what detail() needs (the listing row)


@dataclass(frozen=True)
class PollMessage:
    """A result as the ingestor takes it (the ``Message`` protocol). Its coordinates
    name the result itself (``alerce:objects/ZTF26abc@61000.1``), the same in every
    poll, so a dead letter is not written again each time an overlap lists it."""

    coords: str
    value: bytes
    topic: None = None
    partition: None = None
    offset: None = None
    key: None = None


@dataclass(frozen=True)
class Page:
    items: list[Item]
    more: bool  # the window holds more results than this page


class Service(Protocol):
    """One broker's protocol: fetch a page of results in a time window."""

    name: str  # "tns", "alerce", "fink"
    default_overlap_s: float
    # True when a window can be split in time (the service filters by an upper
    # bound too). Splitting is preferred to paging: pages of a list that changes
    # while it is read can skip an entry, a time window cannot.
    splits: bool
    # True when the service takes a page number (``page`` 1, 2, ...): used when a
    # window cannot be split (no upper bound, or already under MIN_SPLIT).
    pages: bool

    def fetch(self, http: BrokerHttp, window: Window, page: int, stop: threading.Event) -> Page: ...

    def detail(self, http: BrokerHttp, item: Item, stop: threading.Event) -> bytes: ...


@dataclass
class PollStats:
    """For metrics and ``Daemon.wait``: same names as the other streams' stats."""

    consumed: int = 0  # results received (a window polled again counts again)
    polls: int = 0  # polls finished
    skipped: int = 0  # polls left to another daemon polling the same stream
    failures: int = 0  # polls that ended on an error (retried at the next interval)
    backing_off: bool = False
    requests: int = 0
    cursor: str | None = None
    last_error: str | None = None
    last_poll_at: float | None = None  # time.time() of the last finished poll


def service_for(fmt: str, stream) -> Service:
    if fmt == "tns-api":
        from tomd.brokers.tns import TNS

        return TNS(stream)
    if fmt == "alerce-api":
        from tomd.brokers.alerce import ALeRCE

        return ALeRCE(stream)
    if fmt == "fink-api":
        from tomd.brokers.fink import Fink

        return Fink(stream)
    raise ConfigError([f"streams.{stream.name}.format: no poll service for {fmt!r}"])


class PollStream:
    """A ``kind = "poll"`` stream: ``run(stop)`` polls every ``interval`` until stopped."""

    def __init__(self, stream, ingestor: Ingestor, http_client: httpx.Client | None = None, *,
                 service: Service | None = None, clock=None):
        self.stream = stream
        self.ingestor = ingestor
        self.handler = ingestor  # a BatchHandler, as for the other streams (metrics wrap it)
        self.service = service or service_for(stream.format, stream)
        self.http = BrokerHttp(self.service.name, client=http_client, timeout_s=stream.timeout,
                               headers=getattr(self.service, "headers", None))
        self.key = f"broker:{stream.name}"
        self.overlap = timedelta(seconds=stream.overlap if stream.overlap is not None
                                 else self.service.default_overlap_s)
        self.stats = PollStats()
        self._clock = clock or (lambda: datetime.now(timezone.utc))

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                self.poll_once(stop)
                stop.wait(max(0.0, self.stream.interval - (time.monotonic() - started)))
        finally:
            self.http.close()

    def poll_once(self, stop: threading.Event) -> bool:
        """One poll; True when it finished (the cursor reached its end). Never raises for
        a service or database failure: those are logged and retried at the next interval."""
        try:
            with self._exclusive() as mine:
                if not mine:
                    # Another daemon (same database, same stream name) is polling it now:
                    # one poll at a time (Invariant 6); it moves the shared cursor.
                    self.stats.skipped += 1
                    log.debug("stream %s: polled by another daemon", self.stream.name)
                    return True
                if not self._poll(stop):
                    return False  # stopped before the end: neither a poll nor a failure
        except (RetryableError, PermanentError) as exc:
            if stop.is_set():
                return False  # interrupted by the stop, not a failure of the service
            self.stats.failures += 1
            self.stats.last_error = str(exc)
            level = logging.ERROR if isinstance(exc, PermanentError) else logging.WARNING
            log.log(level, "stream %s: poll failed, trying again in %.0f s: %s", self.stream.name,
                    self.stream.interval, exc, extra={"stream": self.stream.name})
            return False
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # An answer of a shape the service module does not know: say so, keep the daemon up.
            self.stats.failures += 1
            self.stats.last_error = f"{self.service.name}: unexpected answer ({exc.__class__.__name__}: {exc})"
            log.exception("stream %s: %s", self.stream.name, self.stats.last_error, extra={"stream": self.stream.name})
            return False
        finally:
            self.stats.requests = self.http.requests
        self.stats.polls += 1
        self.stats.last_error = None
        self.stats.last_poll_at = time.time()
        return True

    def _poll(self, stop: threading.Event) -> bool:
        now = self._clock()
        cursor = self._load_cursor(now)
        todo = [Window(min(cursor - self.overlap, now), now)]  # a stack; oldest window on top
        while todo and not stop.is_set():
            window = todo.pop()
            first = self.service.fetch(self.http, window, 1, stop)
            if first.more and self.service.splits and window.end - window.start > MIN_SPLIT:
                older, newer = window.halves()
                todo += [newer, older]
                continue
            self._ingest(first.items, window, stop)
            page, more = 1, first.more
            while more and not stop.is_set():
                if not self.service.pages:  # a full answer in a window too short to split
                    log.warning("stream %s: more than %d results between %s and %s; some are not read: "
                                "raise page_size", self.stream.name, self.stream.page_size,
                                _iso(window.start), _iso(window.end))
                    break
                page += 1
                nxt = self.service.fetch(self.http, window, page, stop)
                if [it.label for it in nxt.items] == [it.label for it in first.items]:
                    # The same page again: the service ignores the paging parameters.
                    log.warning("stream %s: page %d repeats page %d; the service ignores paging (raise page_size)",
                                self.stream.name, page, page - 1)
                    break
                self._ingest(nxt.items, window, stop)
                first, more = nxt, nxt.more
            if stop.is_set():
                return False  # the window is not finished: the cursor stays where it was
            if window.end > cursor:
                cursor = window.end
                self._save_cursor(cursor)
        return not stop.is_set()

    def _ingest(self, items: Sequence[Item], window: Window, stop: threading.Event) -> None:
        items = self._unseen(items)
        if not items:
            return
        batch = []
        for it in items:
            value = it.value if it.value is not None else self.service.detail(self.http, it, stop)
            batch.append(PollMessage(self._coords(it), value))
        self.stats.consumed += len(batch)
        delay = 0.5
        while True:
            try:
                self.handler.handle(batch)
                return
            except RetryableError as exc:  # the database is away: the same batch again, later
                if stop.is_set():
                    raise
                self.stats.backing_off = True
                log.warning("stream %s: %s; retrying in %.1f s", self.stream.name, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 30.0)
            finally:
                self.stats.backing_off = False

    @contextmanager
    def _exclusive(self) -> Iterator[bool]:
        """PostgreSQL: a session advisory lock on this stream's key, on a connection of its
        own, held for the whole poll and released by the server if the process dies.
        SQLite: one process, always granted."""
        engine = self.ingestor.sessions.kw.get("bind")
        if engine is None or engine.dialect.name != "postgresql":
            yield True
            return
        key = zlib.crc32(self.key.encode()) & 0x7FFFFFFF
        try:
            conn = engine.connect()
            got = repo.try_advisory_lock(conn, LOCK_SPACE, key)
            conn.commit()
        except Exception as exc:  # noqa: BLE001 - the database is away: try at the next interval
            raise RetryableError(f"database: {exc.__class__.__name__}") from exc
        try:
            yield got
        finally:
            try:
                if got:
                    repo.advisory_unlock(conn, LOCK_SPACE, key)
                    conn.commit()
            except Exception:  # noqa: BLE001 - never pool a connection that may hold the lock
                conn.invalidate()
            conn.close()

    def _coords(self, it: Item) -> str:
        return f"{self.service.name}:{it.label}"

    def _unseen(self, items: Sequence[Item]) -> list[Item]:
        """Drop results whose alert is already stored (a window polled again), and those
        waiting as dead letters (the same version of a result that would not parse)."""
        keyed: dict[str, list[str]] = {}
        for it in items:
            if it.source and it.key:
                keyed.setdefault(it.source, []).append(it.key)
        if not keyed:
            return list(items)
        coords = [self._coords(it) for it in items if it.key]
        with self.ingestor.sessions() as s:
            known = {(src, k) for src, keys in keyed.items() for k in repo.existing_alert_keys(s, src, keys)}
            waiting = repo.unresolved_dead_letter_topics(s, self.stream.name, coords)
        return [it for it in items if (it.source, it.key) not in known
                and not (it.key and self._coords(it) in waiting)]

    # ---------------------------------------------------------------- cursor

    def _load_cursor(self, now: datetime) -> datetime:
        with self.ingestor.sessions() as s:
            text = repo.poll_cursor(s, self.key)
        if text:
            self.stats.cursor = text
            return _parse_iso(text)
        start = getattr(self.stream, "start", "earliest")
        if start not in ("earliest", "latest"):
            return _parse_iso(start)
        return now - timedelta(seconds=self.stream.lookback)

    def _save_cursor(self, cursor: datetime) -> None:
        text = _iso(cursor)
        try:
            with self.ingestor.sessions.begin() as s:
                repo.save_poll_cursor(s, self.key, text)
        except Exception as exc:  # noqa: BLE001 - the window is stored; it is polled again, harmlessly
            raise RetryableError(f"database: cursor not saved ({exc.__class__.__name__})") from exc
        self.stats.cursor = text


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def as_utc_text(t: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in UTC, the form TNS and Fink take dates in."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def utc_mjd(t: datetime) -> float:
    """MJD (UTC) of an aware datetime; the window edges ALeRCE filters on."""
    return (t - datetime(1858, 11, 17, tzinfo=timezone.utc)) / timedelta(days=1)


def jsonb(obj: Any) -> bytes:
    """A result as the bytes the ingestor reads (and a dead letter keeps)."""
    import orjson

    return orjson.dumps(obj)
