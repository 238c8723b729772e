"""From raw messages to stored alerts, targets and photometry.

``Ingestor.handle`` takes a batch of raw messages (from Kafka or files),
decodes and parses each, and writes everything the batch causes in ONE
database transaction: alert rows, targets (matched by name or position),
photometry, notices, dead letters and outbox events. Only after that commit
does the caller commit the Kafka offsets, so a crash in between replays the
batch, and the replay changes nothing: each alert's ``(source, key)`` is
unique and already-stored alerts are skipped, photometry has a dedupe key.

Undecodable or unparseable messages go to the dead-letter table with their
``topic[partition]@offset``, the error, the raw bytes and the Kafka headers;
the stream goes on. A letter has a fingerprint, unique per stream, so the same
message delivered again (a replay, a redelivery after a crash) is one letter
and one ``alert.dead_lettered`` event: ``topic[partition]@offset`` for a Kafka
message, the poll result's stable coordinates for a broker poll, and
``sha256:<hex>`` of the bytes for a file.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from tomd.alerts.formats.hop import with_headers as hop_with_headers
from tomd.alerts.model import Alert, PhotPoint
from tomd.db import repository as repo
from tomd.errors import AlertError, RetryableError, redact
from tomd.events import AlertDeadLettered, AlertIngested, NoticeReceived
from tomd.targets.model import SpecError, TargetSpec, validate
from tomd.targets.store import upsert, upsert_many

log = logging.getLogger(__name__)


class Message(Protocol):
    """What ingest needs of a message: Kafka's RawMessage or a file's record."""

    topic: str | None
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes | None

    @property
    def coords(self) -> str: ...


@dataclass(frozen=True)
class FileMessage:
    """A message read from a file (replay), with the file as its coordinates."""

    path: str
    index: int
    value: bytes
    key: bytes | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None

    @property
    def coords(self) -> str:
        return f"{self.path}#{self.index}"


Parser = Callable[[bytes], list[Alert]]


@dataclass(frozen=True)
class Ingested:
    """One alert as stored, handed to the stages that act on it (rules)."""

    alert_id: int
    alert: Alert
    target_id: int | None
    notice_id: int | None
    coords: str  # topic[partition]@offset, or the file
    stream: str | None = None  # the [[streams]] name it arrived on (rules may select by it)


class AlertSink(Protocol):
    """Acts on stored alerts inside the ingest transaction (rules record their
    decisions there, so verdict and alert commit together: Invariant 2)."""

    def __call__(self, s: Session, stored: Sequence[Ingested]) -> None: ...


@dataclass(frozen=True)
class IngestSettings:
    stream: str
    format: str
    include_test: bool = False
    localization_max_deg: float = 0.1
    match_radius_arcsec: float = 1.5
    keep_payload: bool = True
    store_cutouts: bool = True  # ZTF/Rubin image stamps as data products (needs storage)


@dataclass
class BatchResult:
    messages: int = 0
    alerts: int = 0  # newly stored
    duplicates: int = 0  # already stored (replay)
    skipped_test: int = 0
    dead_letters: int = 0
    targets_created: int = 0
    photometry_points: int = 0
    notices: int = 0
    cutouts: int = 0  # stored as data products
    alert_ids: list[int] = field(default_factory=list)

    _COUNTS = ("messages", "alerts", "duplicates", "skipped_test", "dead_letters", "targets_created",
               "photometry_points", "notices", "cutouts")

    def add(self, other: BatchResult, *, ids: bool = True) -> None:
        for f in self._COUNTS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        if ids:
            self.alert_ids.extend(other.alert_ids)


class Ingestor:
    """The BatchHandler for one stream: messages in, one transaction out."""

    def __init__(self, sessions: sessionmaker[Session], settings: IngestSettings, parser: Parser,
                 sinks: Sequence[AlertSink] = (), storage=None, parse_pool=None):
        self.sessions = sessions
        # tomd.alerts.parallel.ParsePool: a worker process parses chunk k+1 while this thread
        # stores chunk k (None: parse here, then store).
        self.parse_pool = parse_pool
        self.settings = settings
        self.parser = parser
        self.sinks = list(sinks)
        self.storage = storage  # tomd.storage.Store for skymaps and cutouts; None: they are not kept
        self.totals = BatchResult()
        # Seconds spent per stage, for metrics and benchmarks. "database" is the whole
        # transaction; "cutouts" (starting the writes, then waiting for what is
        # left of them and recording the rows) and "sinks" (rules) are parts of it.
        self.seconds = {"parse": 0.0, "database": 0.0, "cutouts": 0.0, "sinks": 0.0}
        self._writers: Any = None  # a thread pool for cutout writes, made on first use
        self._parse_wait = 0.0  # of the batch in hand: time spent parsing or waiting for the worker
        self._parse = _keyed(parser)
        self.dead_letter_topics: list[str] = []  # topic of each dead letter recorded, in order (metrics)

    # The consumer calls this; it must commit durably or raise.
    def handle(self, messages: Sequence[Message]) -> BatchResult:
        self.dead_letter_topics.clear()  # this batch's only (read by the metrics after it)
        t0 = time.perf_counter()
        self._parse_wait = 0.0
        done: list[list] = []  # the chunks parsed so far (all of them, for the one-by-one pass)
        chunks = self._chunks(messages)
        if self.parse_pool is None:
            chunks = list(chunks)  # parsed before the transaction begins: no lock held meanwhile
        try:
            result = self._commit(chunks, done)
        except (DataError, ProgrammingError) as exc:
            # The database refuses something in the batch (a NUL character in a
            # payload string, a value out of range): find the message, dead-letter
            # it, keep the rest. Replays make the one-by-one pass safe.
            log.warning("database refused a batch (%s); applying it message by message", _db_reason(exc))
            if not isinstance(chunks, list):
                done.extend(chunks)  # the worker's chunks not stored yet, if the refusal came first
            result = self._one_by_one([item for chunk in done for item in chunk])
        # "parse" is what this thread spent parsing or waiting for the worker; "database" the rest.
        self.seconds["database"] += time.perf_counter() - t0 - self._parse_wait
        self.totals.add(result, ids=False)  # running totals; ids would grow without bound
        return result

    def _chunks(self, messages: Sequence[Message]):
        """The batch parsed, chunk by chunk: one chunk parsed here, or the parse worker's chunks."""
        if self.parse_pool is None or len(messages) <= self.parse_pool.FIRST_CHUNK:  # not worth a round trip
            t0 = time.perf_counter()
            parsed = self._parse_here(messages)
            self._parse_wait = time.perf_counter() - t0
            self.seconds["parse"] += self._parse_wait
            yield parsed
            return
        it = self.parse_pool.parse(messages, self._parse_here)
        while True:
            t0 = time.perf_counter()
            chunk = next(it, None)
            waited = time.perf_counter() - t0
            self._parse_wait += waited
            self.seconds["parse"] += waited
            if chunk is None:
                return
            yield chunk

    def _parse_here(self, messages: Sequence[Message]) -> list[tuple[Message, list[Alert] | None, str | None]]:
        parsed = []
        fmt = self.settings.format
        for m in messages:
            alerts, error, tb = parse_one(fmt, self._parse, m.value, getattr(m, "headers", None),
                                          getattr(m, "key", None))
            if tb is not None:
                log.error("parser failed on %s: %s\n%s", m.coords, error, tb, extra={"coords": m.coords})
            parsed.append((m, alerts, error))
        return parsed

    def _commit(self, chunks, done: list | None = None) -> BatchResult:
        """One transaction for the whole batch; ``chunks`` are stored one after the other in it."""
        try:
            with self.sessions.begin() as s:
                r = BatchResult()
                seen: set[tuple[str, str]] = set()
                for chunk in chunks:
                    if done is not None:
                        done.append(chunk)
                    r.add(self._apply(s, chunk, seen))
                return r
        except (DataError, ProgrammingError):
            raise
        except (OperationalError, IntegrityError, DBAPIError) as exc:
            # Database down, or another daemon stored the same alert a moment
            # ago: nothing was committed; the batch is retried as a whole.
            raise RetryableError(f"database: {_db_reason(exc)}") from exc

    def _one_by_one(self, parsed) -> BatchResult:
        # Each message commits on its own. A RetryableError partway (the database
        # went away) fails the call and the caller applies the whole batch again:
        # what committed already is found stored (alerts by key, letters by
        # fingerprint) and changes nothing.
        total = BatchResult()
        for item in parsed:
            try:
                r = self._commit([[item]])
            except (DataError, ProgrammingError) as exc:
                m = item[0]
                try:
                    with self.sessions.begin() as s:
                        new = self._dead_letter(s, m, f"database refused it: {_db_reason(exc)}")
                except (DataError, ProgrammingError):
                    raise  # the letter itself refused: a bug to see, not an outage to wait out
                except DBAPIError as exc2:
                    raise RetryableError(f"database: {_db_reason(exc2)}") from exc2
                r = BatchResult(messages=1, dead_letters=int(new))
            total.add(r)
        return total

    def _apply(self, s: Session, parsed, seen: set[tuple[str, str]] | None = None) -> BatchResult:
        """Store one parsed chunk; ``seen`` holds the (source, key) pairs of the batch's earlier chunks."""
        r = BatchResult(messages=len(parsed))
        # Skip alerts already stored (replays): one query per source per batch.
        wanted: dict[str, list[str]] = {}
        for _, alerts, _ in parsed:
            for a in alerts or ():
                wanted.setdefault(a.source, []).append(a.key)
        stored = {src: repo.existing_alert_keys(s, src, keys) for src, keys in wanted.items()}
        if seen is None:
            seen = set()
        todo: list[tuple[Message, Alert]] = []
        for m, alerts, error in parsed:
            if error is not None:
                r.dead_letters += self._dead_letter(s, m, error)
                continue
            if not alerts:
                r.skipped_test += 1  # the parser dropped a test/mock event
                continue
            for a in alerts:
                k = (a.source, a.key)
                if k in seen or a.key in stored.get(a.source, ()):
                    r.duplicates += 1
                    continue
                seen.add(k)
                if a.test and not self.settings.include_test:
                    r.skipped_test += 1
                    continue
                todo.append((m, a))
        self._store(s, todo, r)
        return r

    def _store(self, s: Session, todo: list[tuple[Message, Alert]], r: BatchResult) -> None:
        """Targets for the whole batch in one upsert_many, then alerts, photometry, events in bulk."""
        targets: dict[int, int | None] = {}  # index in todo → target id
        notices: dict[int, int] = {}
        issued: dict[int, datetime] = {}  # notice id → latest issue time applied in this batch
        specs, spec_of = [], []
        for i, (m, a) in enumerate(todo):
            if a.kind == "localization" or (a.event_id is not None and a.object_id is None):
                notices[i], targets[i] = self._notice(s, a, issued)
                r.notices += 1
            elif a.kind == "solar_system":
                # A moving object is never matched by position. It joins the
                # target that bears one of its names (its designation or
                # ssObjectId), created from orbital elements; else it is kept
                # without a target.
                targets[i] = _known_target(s, _solar_system_names(a))
            elif a.ra is not None and a.dec is not None:
                try:
                    specs.append(validate(self._spec(a)))
                    spec_of.append(i)
                except SpecError as exc:
                    r.dead_letters += self._dead_letter(s, m, f"{a.source} alert {a.key}: {exc}")
                    targets[i] = -1  # not stored
        if specs:
            results = upsert_many(s, specs, radius_arcsec=self.settings.match_radius_arcsec,
                                  origin=f"alert:{self.settings.stream}")
            for i, res in zip(spec_of, results):
                targets[i] = res.target_id
                r.targets_created += res.created
        keep = [(i, m, a) for i, (m, a) in enumerate(todo) if targets.get(i) != -1]
        # Cutout files start writing now (their keys need only the targets) and
        # are waited for after the rows and the rules: the fsyncs overlap the
        # database work instead of adding to it.
        cutouts = None
        if self.storage is not None and self.settings.store_cutouts:
            with_cutouts = [(i, a, targets.get(i)) for i, m, a in keep if a.cutouts]
            if with_cutouts:
                cutouts = self._start_cutouts(s, with_cutouts)
        payload = self.settings.keep_payload
        ids = repo.ingest_alerts(s, [{
            "source": a.source, "key": a.key, "stream": self.settings.stream,
            "topic": m.topic, "partition": m.partition, "offset": m.offset,
            "kind": a.kind, "object_id": a.object_id, "target_id": targets.get(i), "notice_id": notices.get(i),
            "time": a.time, "ra": a.ra, "dec": a.dec, "band": a.band,
            "mag": _finite(a.mag), "mag_err": _finite(a.mag_err),
            "flux": _finite(a.flux), "flux_err": _finite(a.flux_err),
            # Parsers hand over JSON-safe fields and payloads (tests/test_alert_formats.py).
            "fields": _with_position_errors(a), "payload": a.payload if payload else None,
        } for i, m, a in keep])
        photometry: list[dict[str, Any]] = []
        events = []
        stored = []
        for alert_id, (i, m, a) in zip(ids, keep):
            stored.append(Ingested(alert_id, a, targets.get(i), notices.get(i), m.coords, self.settings.stream))
            tid = targets.get(i)
            if tid is not None:
                photometry.extend(_phot_row(tid, alert_id, a.source, p) for p in a.photometry)
            events.append((AlertIngested(alert_id, a.source, a.key, tid, a.object_id, a.time.isoformat(),
                                         a.ra, a.dec, a.mag, a.band, m.coords), tid))
        repo.ingest_photometry(s, photometry)
        repo.ingest_events(s, events)
        t_sinks = time.perf_counter()
        for sink in self.sinks:  # after photometry: light-curve features include this alert
            sink(s, stored)
        self.seconds["sinks"] += time.perf_counter() - t_sinks
        if cutouts is not None:
            alert_of = {i: alert_id for alert_id, (i, _, _) in zip(ids, keep)}
            r.cutouts += self._finish_cutouts(s, cutouts, alert_of)
        r.alerts += len(ids)
        r.alert_ids.extend(ids)
        r.photometry_points += len(photometry)

    def _start_cutouts(self, s: Session, items: list[tuple[int, Alert, int | None]]) -> tuple[list, list]:
        """Start writing each alert's cutouts; ``_finish_cutouts`` waits and records them.

        Cutouts become data products (kind "cutout"), one per (alert, cutout
        name). The files go under the target,
        ``<id>-<name>/<source>/cutouts/<key>-<cutout>.fits.gz``, written as
        one ``put_many`` in a background thread while the batch's rows are
        written (a local store syncs the whole batch once instead of
        fsyncing each file; S3 sends the PUTs concurrently); the product rows
        commit with the alert, and only after put_many returned, so no
        committed row points at a file a crash could lose. Only new alerts get here, so a replay writes nothing; a crash
        before the commit leaves files the replay writes again under the same
        keys. Cutouts announce no data.stored event of their own:
        alert.ingested already says the alert arrived, and three events per
        alert would flood hooks.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tomd.storage import product_key, put_many, safe_component

        t0 = time.perf_counter()
        names = {tid: row["name"] for tid, row in
                 repo.target_rows_any(s, sorted({tid for _, _, tid in items if tid is not None})).items()}
        jobs = []
        for i, a, tid in items:
            # As products.target_dir names a target's folder: "<id>-<name>".
            tdir = safe_component(f"{tid}-{names[tid]}") if tid in names else "untargeted"
            for name, data in a.cutouts.items():
                suffix = ".fits.gz" if data[:2] == b"\x1f\x8b" else ".fits"
                filename = f"{a.key}-{name}{suffix}"
                jobs.append((i, a, tid, name, filename, product_key(tdir, a.source, "cutouts", filename), data))
        if self._writers is None:
            self._writers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tomd-cutouts")
        futures = [self._writers.submit(put_many, self.storage, [(j[5], j[6]) for j in jobs])]
        self.seconds["cutouts"] += time.perf_counter() - t0
        return jobs, futures

    def _finish_cutouts(self, s: Session, started: tuple[list, list], alert_of: dict[int, int]) -> int:
        """Wait for the writes ``_start_cutouts`` began and record the products.

        A storage outage raises a RetryableError here: the batch waits, nothing is lost.
        """
        t0 = time.perf_counter()
        jobs, futures = started
        try:
            stored = [st for f in futures for st in f.result()]
        finally:
            for f in futures:  # after a failed write, the queued ones need not start
                f.cancel()
        now = datetime.now(timezone.utc)
        repo.ingest_cutout_products(s, [{
            "facility": a.source, "product_id": f"cutout:{a.key}:{name}", "kind": "cutout", "filename": filename,
            "storage_key": st.key, "size": st.size, "md5": st.md5, "state": "stored", "stored_at": now,
            "created_at": now, "target_id": tid,
            "meta": {"alert_id": alert_of[i], "alert_key": a.key, "cutout": name, "object_id": a.object_id},
        } for (i, a, tid, name, filename, _, _), st in zip(jobs, stored)])
        self.seconds["cutouts"] += time.perf_counter() - t0
        return len(jobs)

    def _spec(self, a: Alert) -> TargetSpec:
        name = a.object_id or f"{a.source}-{a.key}"
        return TargetSpec(name=name, ra=a.ra, dec=a.dec, aliases=tuple(x for x in a.aliases if x != name),
                          name_source=a.source)

    def _notice(self, s: Session, a: Alert, issued_in_batch: dict[int, datetime]) -> tuple[int, int | None]:
        loc = a.localization
        ra = loc.ra if loc and loc.ra is not None else a.ra
        dec = loc.dec if loc and loc.dec is not None else a.dec
        err = loc.error_deg if loc else None
        event_id = a.event_id or a.key
        # Notices of one event arrive out of order (a lagging broker, a replay of
        # an older file): one issued before the latest applied refinement must
        # not overwrite its better position.
        issued = _issued(a)
        known = repo.get_notice(s, a.source, event_id)
        stale = False
        if known is not None and issued is not None:
            times = [t for t in map(_parse_issued, repo.notice_issued_times(s, known.id)) if t is not None]
            if known.id in issued_in_batch:
                times.append(issued_in_batch[known.id])
            stale = bool(times) and issued < max(times)
        target_id = None
        # An error circle is small when its radius is at most localization_max_deg;
        # a skymap when its 90% area is at most that circle's (its position is
        # then the most probable direction).
        max_deg = self.settings.localization_max_deg
        area = loc.area_90_deg2 if loc else None
        small = (err <= max_deg) if err is not None else (area is not None and area <= math.pi * max_deg ** 2)
        if ra is not None and dec is not None and small and not a.retraction and not stale:
            # Matched by the notice's own name ("GCN swift 1125809": its earlier
            # notices), else by position within the ordinary match radius only.
            # Never within the error circle: an unrelated supernova 3' away is
            # not the burst (rules still see the error circle on the alert).
            res = upsert(s, TargetSpec(name=notice_target_name(a.source, event_id), ra=ra, dec=dec,
                                       name_source=a.source),
                         radius_arcsec=self.settings.match_radius_arcsec, origin=f"notice:{a.source}")
            target_id = res.target_id
            if (not res.created and known is not None and known.target_id == target_id
                    and (known.error_deg is None or err < known.error_deg)):
                self._refine_target(s, target_id, notice_target_name(a.source, event_id), ra, dec, a.source)
        notice = repo.save_notice(s, {
            "source": a.source, "event_id": event_id, "notice_type": a.notice_type, "time": a.time,
            "ra": ra, "dec": dec, "error_deg": err,
            "area_90_deg2": loc.area_90_deg2 if loc else None,
            "retracted": True if a.retraction else None, "test": a.test, "target_id": target_id,
        }, refine=not stale)
        if issued is not None:
            issued_in_batch[notice.id] = max(issued, issued_in_batch.get(notice.id, issued))
        if stale:
            log.info("notice %s %s issued %s is older than the one applied; kept, not applied",
                     a.source, event_id, issued.isoformat())
        repo.add_event(s, NoticeReceived(notice.id, a.source, event_id, a.notice_type, ra, dec, err,
                                         bool(notice.retracted), notice.target_id), target_id=notice.target_id)
        if self.storage is not None and loc is not None and loc.skymap and not a.retraction:
            from tomd.products import store_skymap

            # Written before the commit; a replay writes the same key again and records it once.
            # A storage outage raises a RetryableError: the batch waits, nothing is lost.
            store_skymap(s, self.storage, notice.id, a.source, event_id, loc.skymap, loc.skymap_format,
                         label=a.notice_type, target_id=notice.target_id)
        return notice.id, notice.target_id

    def _refine_target(self, s: Session, target_id: int, name: str, ra: float, dec: float, source: str) -> None:
        """Move a notice's own target to a better position (BAT 3' → XRT 5").

        Targets never move when matched (store.upsert), but one the notice
        created is only as good as its localisation: pointing at the first,
        coarse position would miss with a small field of view. A target that
        is something else (matched by position, the notice name an alias) stays.
        """
        from tomd.events import TargetUpdated
        from tomd.targets.model import derived_columns

        t = repo.get_target(s, target_id)
        if t is None or t.name != name or (t.ra, t.dec) == (ra, dec):
            return
        spec = validate(TargetSpec(name=name, ra=ra, dec=dec))
        cols = {k: v for k, v in derived_columns(spec).items() if k != "type"}
        repo.update_target(s, target_id, {"ra": ra, "dec": dec, **cols})
        repo.add_event(s, TargetUpdated(target_id, name, {"ra": ra, "dec": dec}, (), f"notice:{source}"),
                       target_id=target_id)

    def _dead_letter(self, s: Session, m: Message, error: str) -> bool:
        """Record ``m`` as a dead letter; False when the stream already holds it (no event then)."""
        error = redact(error).replace("\x00", "\\0")[:4000]  # PostgreSQL text refuses NUL
        dl_id = repo.add_dead_letter(s, {
            # A file's path stands in for the topic, so every letter says where it came from.
            "stream": self.settings.stream, "format": self.settings.format,
            "topic": m.topic if m.topic is not None else m.coords,
            "partition": m.partition, "offset": m.offset, "key": m.key, "raw": m.value or b"", "error": error,
            "fingerprint": fingerprint(m), "headers": encode_headers(getattr(m, "headers", None)),
        })
        if dl_id is None:
            log.info("dead letter %s already recorded", m.coords, extra={"coords": m.coords,
                                                                        "stream": self.settings.stream})
            return False
        repo.add_event(s, AlertDeadLettered(dl_id, self.settings.stream, m.coords, error))
        self.dead_letter_topics.append(m.topic or "")
        log.warning("dead letter %s: %s", m.coords, error, extra={"coords": m.coords, "stream": self.settings.stream})
        return True


def parse_one(fmt: str, parse, value: bytes | None, headers,
              key: bytes | None) -> tuple[list[Alert] | None, str | None, str | None]:
    """One message → (alerts, None, None) | (None, error, None) | (None, error, traceback of a parser bug).

    The same in the stream thread and in a parse worker (tomd/alerts/parallel.py)."""
    try:
        if value is None:
            raise AlertError("empty message (no value)")
        return parse(message_value(fmt, value, headers), key), None, None
    except AlertError as exc:
        return None, str(exc), None
    except Exception as exc:  # a parser bug must not stop the stream
        return None, f"internal error: {exc.__class__.__name__}: {exc}", traceback.format_exc()


def message_value(fmt: str, value: bytes, headers) -> bytes:
    """The bytes the parser reads: hop keeps ``_id``, ``_test`` and ``_format`` in Kafka headers.

    Under ``auto`` a message with those headers is a hop message too (hop-client >= 0.8 sends the
    content bare): without them its ``_id`` would not dedupe and a ``_test`` message would be ingested.
    """
    if headers and (fmt == "hop" or (fmt == "auto" and any(k in _HOP_HEADERS for k, _ in headers))):
        return hop_with_headers(value, headers)
    return value


_HOP_HEADERS = frozenset({"_id", "_test", "_format"})


def fingerprint(m: Message) -> str:
    """What makes two deliveries of a message the same dead letter (unique per stream)."""
    own = getattr(m, "fingerprint", None)
    if own:
        return own  # a dead letter being retried
    if m.topic is not None and m.partition is not None and m.offset is not None:
        fp = f"{m.topic}[{m.partition}]@{m.offset}"
    elif isinstance(m, FileMessage):
        # A file's path or name may change between replays; its bytes do not.
        return "sha256:" + hashlib.sha256(m.value or b"").hexdigest()
    else:
        fp = m.coords  # a broker poll's result: the same coordinates in every poll
    return fp if len(fp) <= 300 else "sha256:" + hashlib.sha256(fp.encode()).hexdigest()


def encode_headers(headers) -> list[list[str | None]] | None:
    """Kafka headers as JSON: ``[[key, base64 value or null], ...]`` (keys repeat; values are bytes)."""
    if not headers:
        return None
    return [[str(k), base64.b64encode(v).decode("ascii") if v is not None else None] for k, v in headers]


def decode_headers(stored) -> tuple[tuple[str, bytes | None], ...]:
    """The stored headers back as Kafka gives them."""
    if not isinstance(stored, list):
        return ()
    return tuple((str(k), base64.b64decode(v) if v is not None else None) for k, v in stored)


def _db_reason(exc: Exception) -> str:
    return redact(str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc) else exc.__class__.__name__)


def notice_target_name(source: str, event_id: str) -> str:
    """The name of a notice's target: 'GCN swift 1125809', 'LVK S240514x'."""
    return f"{source.upper()} {event_id.replace(':', ' ', 1)}"


def _issued(a: Alert) -> datetime | None:
    """When the notice was issued (``fields["issued"]``, set by the GCN and LVK parsers)."""
    return _parse_issued(a.fields.get("issued"))


def _parse_issued(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _solar_system_names(a: Alert) -> list[str]:
    names = [str(a.fields[k]) for k in ("ss_designation", "ssnamenr") if a.fields.get(k)]
    if a.fields.get("ssObjectId"):
        names.append(f"ssObject {a.fields['ssObjectId']}")
    return names + list(a.aliases)


def _known_target(s: Session, names: list[str]) -> int | None:
    from tomd.targets.names import normalize

    known = repo.target_id_by_norm(s, [normalize(n) for n in names if normalize(n)])
    return next(iter(known.values()), None)


def _with_position_errors(a: Alert) -> dict[str, Any]:
    """The alert's fields plus its position uncertainty (arcsec), which has no column of its own."""
    if a.ra_err_arcsec is None and a.dec_err_arcsec is None:
        return a.fields
    out = dict(a.fields)
    if a.ra_err_arcsec is not None and math.isfinite(a.ra_err_arcsec):
        out["ra_err_arcsec"] = a.ra_err_arcsec
    if a.dec_err_arcsec is not None and math.isfinite(a.dec_err_arcsec):
        out["dec_err_arcsec"] = a.dec_err_arcsec
    return out


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _phot_row(target_id: int, alert_id: int, source: str, p: PhotPoint) -> dict[str, Any]:
    src = p.source or source
    return {
        "target_id": target_id, "alert_id": alert_id, "source": src, "mjd": p.mjd, "band": p.band,
        "kind": p.kind, "mag": _finite(p.mag), "mag_err": _finite(p.mag_err), "flux": _finite(p.flux),
        "flux_err": _finite(p.flux_err), "limit": _finite(p.limit),
        # The same measurement arrives again in later alerts' histories.
        "dedupe": f"{src}|{p.band}|{p.kind}|{p.mjd:.6f}",
    }


@dataclass(frozen=True)
class RetryResult:
    retried: int
    resolved: int
    still_failing: int


def retry_dead_letters(sessions: sessionmaker[Session], parser_for: Callable[[IngestSettings], Parser],
                       settings_for: Callable[[str, str], IngestSettings], *, stream: str | None = None,
                       limit: int | None = None, sinks: Sequence[AlertSink] = (), storage=None) -> RetryResult:
    """Parse unresolved dead letters again (after a fix) and ingest those that now parse.

    ``parser_for`` builds the parser for a stream's current settings (its
    format and ``include_test``). The letter's stored Kafka headers go with
    its bytes, as they did on the stream (hop keeps its ``_id`` there). A
    letter that parses is ingested and marked resolved in the same
    transaction; one that still fails keeps its row with the new error and
    one more retry counted.
    """
    from tomd.db.models import utcnow

    with sessions() as s:
        letters = [d for d in repo.dead_letters(s, limit=limit) if stream is None or d.stream == stream]
    resolved = failing = 0
    for d in letters:
        headers = decode_headers(d.headers)
        msg = _DeadLetterMessage(d.topic, d.partition, d.offset, d.key, d.raw, d.id, headers,
                                 d.fingerprint or f"dead-letter#{d.id}")
        # The stream's current settings decide (the fix may have been a config change).
        settings = settings_for(d.stream, d.format)
        parser = parser_for(settings)
        try:
            alerts = _keyed(parser)(message_value(settings.format, d.raw, headers), d.key)
            error = None
        except Exception as exc:  # noqa: BLE001 - recorded on the letter
            alerts, error = None, f"{exc.__class__.__name__}: {exc}" if not isinstance(exc, AlertError) else str(exc)
        with sessions.begin() as s:
            row = s.get(type(d), d.id)
            row.retries += 1
            if error is not None:
                row.error = redact(error)[:4000]
                failing += 1
                continue
            Ingestor(sessions, settings, parser, sinks=sinks, storage=storage)._apply(s, [(msg, alerts, None)])
            row.resolved_at = utcnow()
            resolved += 1
    return RetryResult(len(letters), resolved, failing)


@dataclass(frozen=True)
class _DeadLetterMessage:
    topic: str | None
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes
    dead_letter_id: int
    headers: tuple[tuple[str, bytes | None], ...] = ()
    fingerprint: str | None = None  # the letter's own: a letter found again while retrying is the same one

    @property
    def coords(self) -> str:
        if self.topic is not None:
            return f"{self.topic}[{self.partition}]@{self.offset}"
        return f"dead-letter#{self.dead_letter_id}"


def _keyed(parser: Parser) -> Callable[[bytes, bytes | None], list[Alert]]:
    """``parser(value, key)``: the message key goes to parsers that take one (the Fink
    livestream carries its writer schema there); others get the value alone."""
    import inspect

    try:
        takes_key = "key" in inspect.signature(parser).parameters
    except (TypeError, ValueError):
        takes_key = False
    if takes_key:
        return lambda value, key: parser(value, key=key)
    return lambda value, _key: parser(value)
