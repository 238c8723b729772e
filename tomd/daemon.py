"""The composition root: builds every part of ``tomd run`` from the Config.

Wiring is explicit and lives here only::

    [[streams]] ─► StreamConsumer (or FileStream) ─► Ingestor ─► database
                                                        │ sinks, in the same transaction:
                                                        ├─ RuleEngine (decisions, intents)
                                                        └─ WakeAfterCommit ─► Submitter ─► facilities
    storage (skymaps) · metrics and /healthz /readyz (run())

Each stream and the submitter run in their own threads. SIGTERM/SIGINT set
one stop event: every consumer finishes and commits its batch and leaves its
group, the submitter finishes its sweep, the facilities are closed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tomd.alerts.consumer import ConsumerSettings, StreamConsumer
from tomd.alerts.ingest import IngestSettings, Ingestor, Parser
from tomd.config import Config, Stream
from tomd.db import migrate
from tomd.errors import UserError

log = logging.getLogger(__name__)


def parser_for(fmt: str, *, include_test: bool, schema_registry: str | None = None) -> Parser:
    """The bytes → Alerts function for a stream's format."""
    from tomd.alerts.parse import parse_message

    schema_source = None
    if fmt in ("rubin-avro", "auto"):
        from tomd.alerts.decode import ChainSchemaSource, RegistrySchemaSource, default_schema_source

        if schema_registry:
            import httpx

            schema_source = ChainSchemaSource(
                [RegistrySchemaSource(schema_registry, httpx.Client(timeout=10.0)), default_schema_source()]
            )
        else:
            schema_source = default_schema_source()

    def parse(data: bytes):
        return parse_message(fmt, data, schema_source=schema_source, include_test=include_test)

    return parse


class FileStream:
    """A ``kind = "file"`` stream: the files its ``topics`` globs name, read once.

    Same path as the Kafka streams (the ingestor), so a file already read on
    an earlier start changes nothing when read again.
    """

    def __init__(self, stream: Stream, ingestor: Ingestor):
        self.stream = stream
        self.ingestor = ingestor
        self.handler = ingestor  # a BatchHandler, as for Kafka streams (metrics wrap it)
        self.stats = _FileStats()

    def run(self, stop: threading.Event) -> None:
        import glob

        from tomd.alerts.ingest import FileMessage

        paths = sorted({p for pattern in self.stream.topics for p in glob.glob(pattern, recursive=True)})
        if not paths:
            log.warning("stream %s: no file matches %s", self.stream.name, ", ".join(self.stream.topics))
        batch: list[FileMessage] = []
        for i, path in enumerate(paths):
            if stop.is_set():
                break
            with open(path, "rb") as fh:
                batch.append(FileMessage(path, 0, fh.read()))
            self.stats.consumed += 1
            if len(batch) >= self.stream.batch_size or i == len(paths) - 1:
                self._handle(batch, stop)
                batch = []

    def _handle(self, batch, stop: threading.Event) -> None:
        from tomd.errors import RetryableError

        delay = 0.5
        while not stop.is_set():
            try:
                self.handler.handle(batch)
                return
            except RetryableError as exc:
                self.stats.backing_off = True
                log.warning("stream %s: %s; retrying in %.1f s", self.stream.name, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, 30.0)
            finally:
                self.stats.backing_off = False


@dataclass
class _FileStats:
    consumed: int = 0
    backing_off: bool = False


def build_stages(config: Config):
    """What every ingest path shares: the rule engine (an ingest sink) and the store.

    Built once: the engine hot-reloads its rule files for all streams, and a
    bad feature function or an unusable store stops start-up with its reason.
    """
    from tomd.rules.engine import RuleEngine
    from tomd.storage import storage_from_config

    rules = RuleEngine.from_config(config)
    storage = storage_from_config(config.storage)
    storage.check()
    return rules, storage


@dataclass
class StreamRunner:
    stream: Stream
    consumer: StreamConsumer | FileStream
    ingestor: Ingestor
    thread: threading.Thread | None = None
    error: BaseException | None = None


class Daemon:
    """``tomd run``: consumers for every stream, until stopped."""

    def __init__(self, config: Config, engine: Engine | None = None):
        self.config = config
        self.engine = engine or migrate.connect(config.database.url, pool_size=config.database.pool_size,
                                                echo=config.database.echo)
        migrate.ensure_current(self.engine)  # refuse an unmigrated database before consuming anything
        self.sessions: sessionmaker[Session] = migrate.sessions(self.engine)
        self.stop = threading.Event()
        self.metrics = None  # tomd.metrics.Metrics, attached by run()
        self.rules, self.storage = build_stages(config)
        # Submission: one submitter per daemon; several daemons share the intents
        # through row claims (FOR UPDATE SKIP LOCKED), never submitting one twice.
        from tomd.facilities import open_facilities
        from tomd.submit import SubmitSettings, Submitter, WakeAfterCommit

        self.facilities = open_facilities(config)
        self.submitter = Submitter(self.sessions, self.facilities, SubmitSettings())
        # Woken only after the ingest transaction commits (the intents are then visible).
        self.sinks = [self.rules, WakeAfterCommit(self.submitter.wake)]
        self.submitter_thread: threading.Thread | None = None
        self.runners = [self._runner(s) for s in config.streams]

    def _runner(self, st: Stream) -> StreamRunner:
        ingestor = Ingestor(
            self.sessions,
            IngestSettings(stream=st.name, format=st.format, include_test=st.include_test,
                           localization_max_deg=st.localization_max_deg,
                           match_radius_arcsec=self.config.targets.match_radius_arcsec),
            parser_for(st.format, include_test=st.include_test, schema_registry=st.schema_registry),
            sinks=self.sinks,
            storage=self.storage,
        )
        if st.kind == "file":
            return StreamRunner(st, FileStream(st, ingestor), ingestor)
        consumer = StreamConsumer(
            ConsumerSettings(bootstrap=st.bootstrap or "", topics=list(st.topics), group=st.group, start=st.start,
                             batch_size=st.batch_size, batch_timeout_s=st.batch_timeout,
                             kafka=st.kafka_config(), client_id=f"tomd-{st.name}"),
            ingestor,
        )
        return StreamRunner(st, consumer, ingestor)

    def start(self) -> None:
        self.submitter_thread = threading.Thread(target=self._run_submitter, name="submitter", daemon=True)
        self.submitter_thread.start()
        for r in self.runners:
            r.thread = threading.Thread(target=self._run_stream, args=(r,), name=f"stream-{r.stream.name}",
                                        daemon=True)
            r.thread.start()
        log.info("tomd running: %d stream(s): %s", len(self.runners),
                 ", ".join(r.stream.name for r in self.runners) or "none")

    def _run_submitter(self) -> None:
        try:
            self.submitter.run(self.stop)
        except BaseException:  # noqa: BLE001 - reported, and the daemon stops
            log.exception("the submitter stopped on an error")
            self.stop.set()

    def _run_stream(self, r: StreamRunner) -> None:
        try:
            r.consumer.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported, and the daemon stops
            r.error = exc
            log.exception("stream %s stopped on an error", r.stream.name)
            self.stop.set()

    def wait(self, *, idle_exit_s: float | None = None, poll_s: float = 0.2) -> int:
        """Block until stopped (signal, error, or ``idle_exit_s`` without new messages)."""
        last_total, last_change = -1, time.monotonic()
        while not self.stop.is_set():
            self.stop.wait(poll_s)
            if idle_exit_s is not None:
                total = sum(r.consumer.stats.consumed for r in self.runners)
                busy = any(r.consumer.stats.backing_off for r in self.runners)
                if total != last_total or busy:
                    last_total, last_change = total, time.monotonic()
                elif time.monotonic() - last_change >= idle_exit_s:
                    log.info("no new messages for %.0f s: stopping", idle_exit_s)
                    self.stop.set()
        for r in self.runners:
            if r.thread is not None:
                r.thread.join(timeout=60)
        self.submitter.wake()  # out of its sleep, to see the stop
        if self.submitter_thread is not None:
            self.submitter_thread.join(timeout=60)
        self.facilities.close()
        return 1 if any(r.error for r in self.runners) else 0

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.info("received %s: finishing the batches in flight, then stopping", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def summary(self) -> dict[str, dict[str, int]]:
        out = {}
        for r in self.runners:
            t = r.ingestor.totals
            out[r.stream.name] = {"messages": t.messages, "alerts": t.alerts, "duplicates": t.duplicates,
                                  "dead_letters": t.dead_letters, "targets_created": t.targets_created,
                                  "photometry_points": t.photometry_points, "notices": t.notices,
                                  "skipped_test": t.skipped_test}
        return out


def run(config: Config, *, idle_exit_s: float | None = None,
        on_started: Callable[[Daemon], None] | None = None) -> int:
    from tomd.health import daemon_checks, start_http
    from tomd.metrics import instrument

    daemon = Daemon(config)
    daemon.metrics = instrument(daemon)  # wraps each stream's handler; lag read at scrape time
    http = None
    if config.metrics.enabled:
        try:
            http = start_http(config.metrics.listen, daemon.metrics.registry, checks=daemon_checks(daemon))
        except OSError as exc:
            daemon.engine.dispose()
            raise UserError(f"metrics.listen {config.metrics.listen}: cannot listen there: {exc.strerror}") from None
        log.info("metrics and health on http://%s/metrics, /healthz, /readyz", config.metrics.listen)
    daemon.install_signal_handlers()
    daemon.start()
    if on_started:
        on_started(daemon)
    code = daemon.wait(idle_exit_s=idle_exit_s)
    if http is not None:
        http.stop()
    for name, counts in daemon.summary().items():
        log.info("stream %s: %s", name, ", ".join(f"{k}={v}" for k, v in counts.items()))
    daemon.engine.dispose()
    return code
