"""The composition root: builds every part of ``tomd run`` from the Config.

Wiring is explicit and lives here only::

    [[streams]] ─► StreamConsumer (or FileStream) ─► Ingestor ─► database
                                                        │ sinks, in the same transaction:
                                                        ├─ RuleEngine (decisions, intents)
                                                        └─ WakeAfterCommit ─► Submitter ─► facilities
                                                                          └─► components with wake_on_ingest
    components (Daemon.add): status poller / scheduled jobs, data retriever, hook runner, notifier
    storage (skymaps) · metrics and /healthz /readyz (run())

Start order: the submitter, the components in the order they were added,
then the streams (work is only produced once its consumers run). Each
stream, the submitter and every ``run(stop)`` component has its own thread.

SIGTERM/SIGINT set the stop event: every consumer finishes and commits its
batch and leaves its group, the submitter finishes its sweep, then each
component in the reverse order of starting finishes what it is doing (its
own stop event is set and ``run`` returns, or ``shutdown()`` returns), then
the facilities are closed. SIGHUP reads the rule files now and calls
``reload()`` on every component that has one. Between signals the main loop
(``wait``) looks at the rule files every 2 s, alerts or not.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tomd.alerts.consumer import ConsumerSettings, StreamConsumer
from tomd.alerts.ingest import IngestSettings, Ingestor, Parser
from tomd.alerts.parallel import ParsePool, ParserRecipe
from tomd.config import Config, Stream
from tomd.db import migrate
from tomd.errors import UserError

log = logging.getLogger(__name__)

# tomd run --exit-when-idle: how long a stream waiting for its first partition counts as busy
# (a group join takes seconds; a broker never reached must not hold a catch-up run forever)
JOIN_GRACE_S = 60.0


def _never_assigned(runners) -> list[str]:
    """The Kafka streams that have not had a partition yet (a file stream has no group to join)."""
    return [r.stream.name for r in runners if getattr(r.consumer.stats, "rebalances", None) == 0]


def parser_for(fmt: str, *, include_test: bool, schema_registry: str | None = None,
               schema_file: str | None = None) -> Parser:
    """The bytes → Alerts function for a stream's format.

    ``schema_file`` (an .avsc path) is the writer schema of a schemaless Avro
    stream (the Fink livestream); it is parsed once, here, not per message.
    The parser also takes the message ``key``: a Fink message whose key is a
    schema's JSON is read with that schema (parsed once per distinct key).
    """
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
    schema = None
    if schema_file:
        from tomd.alerts.decode import load_schema_file
        from tomd.errors import ConfigError, DecodeError

        try:
            schema = load_schema_file(str(schema_file))
        except DecodeError as exc:
            raise ConfigError([str(exc)]) from None

    schemaless = fmt in ("fink-avro", "auto")

    def parse(data: bytes, key: bytes | None = None):
        # The Fink livestream puts the writer schema's JSON in the message key
        # (fink-client reads it from there first, then from a schema file).
        use = schema
        if schemaless and key and data[:4] != b"Obj\x01":
            from tomd.alerts.decode import key_is_schema, schema_from_key

            if key_is_schema(key):
                use = schema_from_key(bytes(key))
        return parse_message(fmt, data, schema_source=schema_source, schema_file=use,
                             include_test=include_test)

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
        self.stats.busy = True  # not idle meanwhile (tomd run --exit-when-idle)
        try:
            self._handle_with_retries(batch, stop)
        finally:
            self.stats.busy = False

    def _handle_with_retries(self, batch, stop: threading.Event) -> None:
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
    busy: bool = False  # a batch is being handled


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


# ------------------------------------------------------------ components --


@runtime_checkable
class Component(Protocol):
    """A background part of the daemon, added with ``Daemon.add``.

    Required: ``name`` (for logs, readiness and thread names), and either

    - ``run(stop: threading.Event) -> None``: the daemon runs it in a thread
      of its own; it returns soon after ``stop`` is set, having finished and
      committed the item in hand (a poller's poll, a hook run, a download), or
    - ``start() -> None`` and ``shutdown() -> None``: for parts with their own
      threads (an APScheduler scheduler); ``shutdown`` waits for running jobs.

    ``run`` returns only when stopped: a thread that ends otherwise makes the
    daemon not ready (and stops it, for a critical component that raised).

    Optional, used when present:

    - ``wake() -> None``: work is waiting (called after every ingest commit
      when added with ``wake_on_ingest=True``, and once at stop so a sleeper
      sees the stop event at once);
    - ``reload() -> None``: re-read files (hooks) on SIGHUP; an error is
      logged and the component keeps its last good state;
    - ``ready() -> bool | str``: a readiness check for ``/readyz`` (False or a
      string, the reason, means not ready).
    """

    name: str


@dataclass
class ComponentRunner:
    component: Any
    ready: Callable[[], Any] | None = None
    critical: bool = True  # an error in run() stops the daemon (the supervisor restarts it)
    # Its own stop event, set in the reverse order of starting: a component added after
    # another (one that may depend on it) has stopped before the other is asked to.
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: bool = False
    error: BaseException | None = None

    @property
    def name(self) -> str:
        return str(self.component.name)

    @property
    def threaded(self) -> bool:
        return callable(getattr(self.component, "run", None))


def _check_component(c: Any) -> None:
    name = getattr(c, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{c!r}: a component needs a non-empty str name")
    run_ = callable(getattr(c, "run", None))
    start_ = callable(getattr(c, "start", None)) and callable(getattr(c, "shutdown", None))
    if not (run_ or start_):
        raise TypeError(f"component {name}: needs run(stop) or start() and shutdown()")


@dataclass
class StreamRunner:
    stream: Stream
    consumer: StreamConsumer | FileStream
    ingestor: Ingestor
    thread: threading.Thread | None = None
    error: BaseException | None = None


def settle_garbage_collector() -> None:
    """Keep Python's full collections off the ingest path.

    Everything alive at start (modules, parsed schemas, astropy's tables) is
    frozen out of the collector's reach; the youngest generation is collected
    after 10,000 new containers instead of 700, and a full collection comes
    after 100 of the middle one's instead of 10. A batch makes and drops
    hundreds of thousands of containers (payload dicts, verdict rows); with the
    defaults the full collections that set off cost 0.13-0.3 ms per alert,
    re-walking every long-lived object each time, and the young ones ~10% of a
    rule's verdict (bench/ingest.py, bench/rules.py). Almost all of tomd's
    garbage is freed by reference counting; cycles still go, a little later.
    """
    import gc

    global _gc_settled
    if _gc_settled:  # once per process (tests and tools start several daemons in one)
        return
    _gc_settled = True
    gc.collect()
    gc.freeze()
    g0, g1, _ = gc.get_threshold()
    gc.set_threshold(max(g0, 10_000), g1, 100)


_gc_settled = False


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
        self._on_commit: list[Callable[[], None]] = [self.submitter.wake]
        self.sinks = [self.rules, WakeAfterCommit(self._wake_after_commit)]
        self.submitter_thread: threading.Thread | None = None
        self.components: list[ComponentRunner] = []
        self.checks: dict[str, Callable[[], Any]] = {}  # extra /readyz checks (add_check)
        self.reload_requested = threading.Event()
        self.runners = [self._runner(s) for s in config.streams]

    # -- composition ---------------------------------------------------------

    def add(self, component: Any, *, wake_on_ingest: bool = False, ready: Callable[[], Any] | None = None,
            critical: bool = True) -> Any:
        """Add a background ``Component``, started with the daemon (in the order added) and stopped
        with it. ``wake_on_ingest``: call its ``wake()`` after every ingest commit. ``ready``: a
        readiness check (else its ``ready()`` method, if any). ``critical``: an error escaping
        ``run()`` stops the daemon (else it is logged and the component stays down, not ready).
        Returns the component."""
        if self.submitter_thread is not None:
            raise RuntimeError("add components before start()")
        _check_component(component)
        if any(c.name == component.name for c in self.components):
            raise ValueError(f"a component named {component.name!r} is already added")
        if ready is None and callable(getattr(component, "ready", None)):
            ready = component.ready
        self.components.append(ComponentRunner(component, ready, critical))
        if wake_on_ingest:
            if not callable(getattr(component, "wake", None)):
                raise TypeError(f"component {component.name}: wake_on_ingest needs a wake() method")
            self._on_commit.append(component.wake)
        return component

    def add_check(self, name: str, check: Callable[[], Any]) -> None:
        """One more ``/readyz`` check (e.g. ``"scheduler": lambda: scheduler.running``)."""
        self.checks[name] = check

    def _wake_after_commit(self) -> None:
        for wake in self._on_commit:
            try:
                wake()
            except Exception:  # noqa: BLE001 - a wake must never fail the ingest path
                log.exception("waking after an ingest commit failed")

    def _runner(self, st: Stream) -> StreamRunner:
        pool = None
        workers = st.parse_workers
        if st.kind == "kafka" and workers > 0:
            # Parsing in a worker process beside the stream thread's database work (tomd/alerts/parallel.py).
            pool = ParsePool(ParserRecipe(st.format, include_test=st.include_test, schema_registry=st.schema_registry,
                                          schema_file=st.schema_file, keep_cutouts=st.store_cutouts),
                             workers=workers)
        ingestor = Ingestor(
            self.sessions,
            IngestSettings(stream=st.name, format=st.format, include_test=st.include_test,
                           localization_max_deg=st.localization_max_deg,
                           match_radius_arcsec=self.config.targets.match_radius_arcsec,
                           store_cutouts=st.store_cutouts),
            parser_for(st.format, include_test=st.include_test, schema_registry=st.schema_registry,
                       schema_file=st.schema_file),
            sinks=self.sinks,
            storage=self.storage,
            parse_pool=pool,
        )
        if st.kind == "file":
            return StreamRunner(st, FileStream(st, ingestor), ingestor)
        if st.kind == "poll":  # REST brokers (TNS, ALeRCE, Fink): same ingest path, cursor in the database
            from tomd.brokers.poll import PollStream

            return StreamRunner(st, PollStream(st, ingestor), ingestor)
        consumer = StreamConsumer(
            ConsumerSettings(bootstrap=st.bootstrap or "", topics=list(st.topics), group=st.group, start=st.start,
                             batch_size=st.batch_size, batch_timeout_s=st.batch_timeout,
                             kafka=st.kafka_config(), client_id=f"tomd-{st.name}"),
            ingestor,
        )
        return StreamRunner(st, consumer, ingestor)

    def start(self) -> None:
        from tomd.sky import warm_up

        warm_up()  # the first alert should not wait for imports (see warm_up)
        settle_garbage_collector()
        for r in self.runners:
            if r.ingestor.parse_pool is not None:
                r.ingestor.parse_pool.start()  # its imports too
        self.submitter_thread = threading.Thread(target=self._run_submitter, name="submitter", daemon=True)
        self.submitter_thread.start()
        for c in self.components:
            if c.threaded:
                c.thread = threading.Thread(target=self._run_component, args=(c,), name=f"component-{c.name}",
                                            daemon=True)
                c.thread.start()
            else:
                try:
                    c.component.start()
                except Exception as exc:
                    c.error = exc
                    log.exception("component %s failed to start", c.name)
                    if c.critical:
                        self.stop.set()
                        break
                    continue
            c.started = True
        for r in self.runners:
            r.thread = threading.Thread(target=self._run_stream, args=(r,), name=f"stream-{r.stream.name}",
                                        daemon=True)
            r.thread.start()
        log.info("tomd running: %d stream(s): %s; components: %s", len(self.runners),
                 ", ".join(r.stream.name for r in self.runners) or "none",
                 ", ".join(c.name for c in self.components) or "none")

    def _run_component(self, c: ComponentRunner) -> None:
        try:
            c.component.run(c.stop)
        except BaseException as exc:  # noqa: BLE001 - reported; a critical one stops the daemon
            c.error = exc
            log.exception("component %s stopped on an error", c.name)
            if c.critical:
                self.stop.set()

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
        """Block until stopped (signal, error, or ``idle_exit_s`` without new messages).

        Meanwhile it looks at the rule files every ``check_every_s`` (2 s): a quiet stream (GCN may
        be silent for hours) must not hide a broken edit, or the ``tomd_rules_loaded`` it changes,
        until the next alert. The ingest sink then only reads the rules in force: a look done there
        would run inside the ingest transaction, on the stream's time.
        """
        last_total, last_change = -1, time.monotonic()
        started = last_change
        ruleset = self.rules.ruleset
        rules_every_s = ruleset.check_every_s
        if math.isfinite(rules_every_s):
            ruleset.check_every_s = math.inf  # RuleSet.current() (the ingest path) no longer looks
        last_rules = time.monotonic()  # RuleEngine.from_config has just read them
        try:
            while not self.stop.is_set():
                self.stop.wait(poll_s)
                if self.reload_requested.is_set():  # SIGHUP: done here, not in the signal handler
                    self.reload_requested.clear()
                    self.reload()
                    last_rules = time.monotonic()
                elif time.monotonic() - last_rules >= rules_every_s:
                    last_rules = time.monotonic()
                    self._look_at_rules()
                if idle_exit_s is not None:
                    total = sum(r.consumer.stats.consumed for r in self.runners)
                    # Not idle while a batch is in hand (a long one would otherwise end the run in
                    # its middle), nor before a Kafka stream's first assignment: joining a group
                    # takes seconds (3 s of group.initial.rebalance.delay.ms on Apache Kafka), and
                    # "no new messages" means nothing before the stream could read any. A broker
                    # never reached must still end a catch-up run: the join gets JOIN_GRACE_S.
                    joining = time.monotonic() - started < JOIN_GRACE_S and bool(_never_assigned(self.runners))
                    busy = joining or any(r.consumer.stats.busy for r in self.runners)  # backing off too
                    if total != last_total or busy:
                        last_total, last_change = total, time.monotonic()
                    elif time.monotonic() - last_change >= idle_exit_s:
                        unassigned = _never_assigned(self.runners)
                        if unassigned:
                            log.warning("stream(s) %s never got a partition in %.0f s (broker unreachable, "
                                        "or no such topic?)", ", ".join(unassigned),
                                        time.monotonic() - started)
                        log.info("no new messages for %g s: stopping", idle_exit_s)
                        self.stop.set()
            self.shutdown()  # the streams' last batches too read the rules without looking
        finally:
            ruleset.check_every_s = rules_every_s
        failed = [r.stream.name for r in self.runners if r.error] + [c.name for c in self.components
                                                                     if c.error and c.critical]
        return 1 if failed else 0

    def _look_at_rules(self) -> None:
        """The rule files' periodic look (changed, added, removed files; problems logged by the RuleSet).

        Under the RuleSet's lock, as ``RuleSet.current()`` takes it: a ``reload_now()`` from another
        thread (``Daemon.reload()`` called directly) is then never run beside it; if one is running,
        this look is skipped (it is looking already)."""
        ruleset = self.rules.ruleset
        if not ruleset._lock.acquire(blocking=False):
            return
        try:
            ruleset.reload()
        except Exception:  # noqa: BLE001 - an unreadable rules directory must not stop the daemon
            log.exception("looking at the rule files failed; the rules in force stay")
        finally:
            ruleset._lock.release()

    def shutdown(self) -> None:
        """Stop everything (idempotent): streams first (their last batches commit), then the
        submitter, then the components in the reverse order of starting, then the facilities."""
        self.stop.set()
        for r in self.runners:
            if r.thread is not None:
                r.thread.join(timeout=60)
            if r.ingestor.parse_pool is not None:
                r.ingestor.parse_pool.close()
        self.submitter.wake()  # out of its sleep, to see the stop
        if self.submitter_thread is not None:
            self.submitter_thread.join(timeout=60)
        for c in reversed(self.components):
            if not c.started:
                continue
            c.started = False
            c.stop.set()
            try:
                if c.threaded:
                    wake = getattr(c.component, "wake", None)
                    if callable(wake):
                        wake()
                    if c.thread is not None:
                        c.thread.join(timeout=60)
                        if c.thread.is_alive():
                            log.error("component %s did not stop within 60 s", c.name)
                else:
                    c.component.shutdown()
            except Exception:  # noqa: BLE001 - the others must still stop
                log.exception("component %s failed to stop cleanly", c.name)
        self.facilities.close()

    def reload(self) -> list[str]:
        """SIGHUP: read the rule files now, and ``reload()`` every component that has one.
        Returns the problems found (each also logged); nothing stops on a bad file."""
        log.info("reloading rules and components")
        problems = list(self.rules.ruleset.reload_now())
        for c in self.components:
            fn = getattr(c.component, "reload", None)
            if not callable(fn):
                continue
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a bad file keeps the last good state
                problems.append(f"{c.name}: {exc}")
                log.error("component %s: reload failed, keeping its last good state: %s", c.name, exc)
        log.info("reloaded: %d rule(s) in force%s", len(self.rules.ruleset.current()),
                 f"; {len(problems)} problem(s)" if problems else "")
        return problems

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.info("received %s: finishing the batches in flight, then stopping", signal.Signals(signum).name)
            self.stop.set()

        def hup(_signum, _frame):
            self.reload_requested.set()  # wait() reloads; a handler must not take locks

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, hup)

    def summary(self) -> dict[str, dict[str, int]]:
        out = {}
        for r in self.runners:
            t = r.ingestor.totals
            out[r.stream.name] = {"messages": t.messages, "alerts": t.alerts, "duplicates": t.duplicates,
                                  "dead_letters": t.dead_letters, "targets_created": t.targets_created,
                                  "photometry_points": t.photometry_points, "notices": t.notices,
                                  "skipped_test": t.skipped_test}
        return out


def add_components(daemon: Daemon) -> None:
    """The background components of ``tomd run``, in start order (the integrator's one place)::

        scheduler  ── poll:<facility> (status, at each facility's poll_interval) ── cadence sweep
            │ a request completed
            ▼
        retriever  ── products → storage, data.stored events
        notifier   ── sends queued notifications (rate limits, digests)
        hooks      ── outbox events → user hooks (worker process) and the notification fan-out

    Stopped in reverse order. Every part is told the daemon's metrics.
    """
    from tomd.health import scheduler_check
    from tomd.hooks.registry import Registry
    from tomd.hooks.runner import HookRunner
    from tomd.notify import Notifier, notification_kinds, subscriber
    from tomd.retrieve import RetrieveSettings, Retriever
    from tomd.scheduler import status_jobs

    config, m = daemon.config, daemon.metrics
    retriever = Retriever(daemon.sessions, daemon.facilities, daemon.storage,
                          RetrieveSettings.from_config(config.data),
                          observer=m.observe_product if m is not None else None)

    def on_change(_facility: str, state: str) -> None:
        if state == "completed":
            retriever.wake()  # fetch now, not at the retriever's next look

    jobs = daemon.add(status_jobs(daemon.sessions, daemon.facilities, config, wake=daemon.submitter.wake,
                                  metrics=m, on_change=on_change))
    daemon.add_check("scheduler", scheduler_check(jobs))
    if m is not None:
        m.watch_scheduler(jobs)
        m.watch_poller(jobs.poller)  # tomd_status_polls_total{facility, outcome}: ok, skipped, failed
    daemon.add(retriever)
    # The notifier before the hook runner: it is stopped after it, so queued messages still go out.
    notifier = daemon.add(Notifier.from_config(config, daemon.sessions, daemon.storage, observer=m))
    registry = Registry()
    kinds = notification_kinds(config)  # rule.* and what the channels' `events` name; none without channels
    if kinds:
        registry.add_builtin("builtin:notify", kinds, subscriber(config, wake=notifier.wake))
    hooks = HookRunner.from_config(config, daemon.sessions, daemon.storage, observer=m, registry=registry,
                                   on_request=daemon.submitter.wake)
    # Load and register the hooks now, before any stream starts: a hook's deliveries begin at its
    # registration, so events ingested in the first seconds of the daemon's life are not missed.
    hooks.start()
    daemon.add(hooks, wake_on_ingest=True)
    if m is not None:
        m.watch_outbox(lambda: _outbox_backlog(daemon.sessions))
        # Every loop that meets the database counts its database errors in
        # tomd_database_errors_total{component}: scheduler (jobs), status (the poller),
        # retriever, notifier, hooks.
        from tomd.metrics import DATABASE_ERROR_COMPONENTS, instrument_component

        for c in daemon.components:
            label = DATABASE_ERROR_COMPONENTS.get(c.name)
            if label is not None:
                instrument_component(m, c.component, label)


def _outbox_backlog(sessions: sessionmaker[Session]) -> int:
    """Events not yet delivered to every hook that takes them (tomd_outbox_pending_events)."""
    from tomd.db import repository as repo

    with sessions() as s:
        return repo.outbox_backlog(s)


def run(config: Config, *, idle_exit_s: float | None = None,
        on_started: Callable[[Daemon], None] | None = None,
        components: Callable[[Daemon], None] = add_components) -> int:
    from tomd.health import daemon_checks, start_http
    from tomd.metrics import instrument

    daemon = Daemon(config)
    daemon.metrics = instrument(daemon)  # wraps each stream's handler; lag read at scrape time
    try:
        components(daemon)
    except BaseException:
        daemon.facilities.close()
        daemon.engine.dispose()
        raise
    http = None
    if config.metrics.enabled:
        try:
            http = start_http(config.metrics.listen, daemon.metrics.registry, checks=daemon_checks(daemon))
        except OSError as exc:
            daemon.facilities.close()
            daemon.engine.dispose()
            raise UserError(f"metrics.listen {config.metrics.listen}: cannot listen there: {exc.strerror}") from None
        # start_http logs the bound address (with port 0 the system picks one: scrape there).
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
