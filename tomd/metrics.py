"""Every metric tomd exports, in one ``Metrics`` object with its own registry.

Metrics are observers: stages never import this module. The composition
root (``tomd.daemon``) builds one ``Metrics``, hands the observer methods to
the stages that have something to report, and serves the registry over HTTP
(``tomd.health.start_http``). Nothing here is created at import time, so
tests and several daemons in one process never share counters.

Where values come from::

    Ingestor.handle ──► ObservedIngestor (per batch: counts, sizes, stage times)
    ConsumerStats   ──► ConsumerCollector (read at scrape time: lag, assignment)
    RuleEngine      ──► observe_verdicts (after the batch commits), observe_rules (each reload)
    Submitter       ──► observe_submission (submitted with latency, rejected, failed, retry),
                        on_sweep_error → database_errors_of("submitter")
    scheduler jobs, status poller, retriever, notifier, hook runner
                    ──► on_error → database_errors_of(component) (instrument_component)
    LCOClient       ──► observe_facility_call (every HTTP call, retries included)
    database        ──► DatabaseCollector (read at scrape time, cached: open requests, dead letters)
    later stages    ──► observe_product / observe_hook / observe_notification /
                        observe_status_change / observe_database_error,
                        watch_scheduler / watch_outbox (read at scrape time),
                        watch_poller (each poll cycle's outcome per facility)

``instrument(daemon)`` plugs all of these into a built daemon.

Names follow the Prometheus conventions: ``tomd_`` prefix, base units
(seconds, bytes), ``_total`` for counters, no unit-less ratios. Labels are
bounded sets (stream, topic, partition, stage, rule, facility, hook,
channel, outcome, HTTP status code): never an alert id or a target name.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from tomd.errors import RetryableError

if TYPE_CHECKING:  # only for annotations: metrics must not pull the Kafka client in
    from tomd.alerts.consumer import ConsumerStats
    from tomd.alerts.ingest import BatchResult

__all__ = ["CONTENT_TYPE_LATEST", "ConsumerCollector", "Metrics", "ObservedIngestor", "instrument",
           "sample_names"]

# Bucket boundaries, chosen for what each measures.
BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
STAGE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From an alert's arrival to the facility accepting the request: seconds to hours.
LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
CALL_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HOOK_SECONDS_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

VERDICT_OUTCOMES = ("fired", "not_fired", "limited", "deduplicated", "error", "test")  # tomd.rules.engine
HOOK_OUTCOMES = ("ok", "failed", "timeout")


def _topic_of(coords: str | None) -> str:
    """``topic[partition]@offset`` → topic; anything else (a file) → ""."""
    if not coords:
        return ""
    topic, sep, rest = coords.rpartition("[")
    return topic if sep and "]@" in rest else ""


class Metrics:
    """All of tomd's metrics, registered in ``self.registry`` (never the global one).

    Thread-safe: prometheus-client's metric objects lock internally; the
    observer methods may be called from any stage's thread.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str | None = None,
                 process: bool = True):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
            PlatformCollector(registry=r)  # python_info
        if version is None:
            from tomd import __version__ as version
        self.build_info = Gauge("tomd_build_info", "tomd version running (value always 1)",
                                ["version", "python"], registry=r)
        self.build_info.labels(version, platform.python_version()).set(1)
        self.start_time = Gauge("tomd_start_time_seconds", "Unix time this tomd process started its metrics",
                                registry=r)
        self.start_time.set(time.time())

        # ---------------------------------------------------------- 1 ingest
        self.messages = Counter("tomd_messages_handled_total",
                                "Messages (Kafka records or file records) in batches ingest finished",
                                ["stream", "topic"], registry=r)
        self.alerts_ingested = Counter("tomd_alerts_ingested_total", "Alerts newly stored",
                                       ["stream", "topic"], registry=r)
        self.duplicates = Counter("tomd_alerts_duplicate_total",
                                  "Alerts skipped because they were already stored (replays, re-deliveries)",
                                  ["stream"], registry=r)
        self.skipped_test = Counter("tomd_alerts_skipped_test_total", "Test/mock alerts not ingested",
                                    ["stream"], registry=r)
        self.dead_letters = Counter("tomd_alerts_dead_lettered_total",
                                    "Messages sent to the dead-letter table (undecodable or invalid)",
                                    ["stream", "topic"], registry=r)
        self.targets_created = Counter("tomd_targets_created_total", "Targets created by ingest",
                                       ["stream"], registry=r)
        self.photometry = Counter("tomd_photometry_points_total", "Photometry points stored by ingest",
                                  ["stream"], registry=r)
        self.notices = Counter("tomd_notices_total", "Localisation notices (GRB, GW, neutrino) stored",
                               ["stream"], registry=r)
        self.batch_size = Histogram("tomd_ingest_batch_messages", "Messages per ingested batch",
                                    ["stream"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.stage_seconds = Histogram("tomd_ingest_stage_seconds",
                                       "Seconds per batch spent in each ingest stage (parse, database, total)",
                                       ["stream", "stage"], buckets=STAGE_SECONDS_BUCKETS, registry=r)
        self.ingest_failures = Counter("tomd_ingest_batch_failures_total",
                                       "Ingest batches that failed (retryable: offered again; error: stream stops)",
                                       ["stream", "kind"], registry=r)
        self.last_ingest = Gauge("tomd_last_alert_ingested_timestamp_seconds",
                                 "Unix time of the last batch that stored at least one new alert",
                                 ["stream"], registry=r)
        self.database_errors = Counter("tomd_database_errors_total",
                                       "Database operations that failed (connection lost, lock timeout, ...)",
                                       ["component"], registry=r)

        # ----------------------------------------------------------- 3 rules
        self.verdicts = Counter("tomd_rule_verdicts_total",
                                "Rule verdicts committed, by rule and outcome "
                                "(fired, not_fired, limited, deduplicated, error, test)",
                                ["rule", "outcome"], registry=r)
        self.rule_seconds = Histogram("tomd_rule_evaluation_seconds", "Seconds to evaluate all rules on one alert",
                                      buckets=(1e-5, 5e-5, 1e-4, 5e-4, 0.001, 0.005, 0.01, 0.05, 0.1),
                                      registry=r)
        self.rules_loaded = Gauge("tomd_rules_loaded", "Rules currently active", registry=r)
        self.rule_reload_failures = Counter("tomd_rule_reload_failures_total",
                                            "Rule file reloads with problems (the last good rules keep running)",
                                            registry=r)

        # ---------------------------------------------------------- 4 submit
        self.submissions = Counter("tomd_submissions_total", "Observation requests accepted by a facility",
                                   ["facility"], registry=r)
        self.rejections = Counter("tomd_submission_rejections_total",
                                  "Observation requests a facility refused (final)", ["facility"], registry=r)
        self.submission_retries = Counter("tomd_submission_retries_total",
                                          "Submission attempts retried after a transient or ambiguous failure",
                                          ["facility"], registry=r)
        self.submission_failures = Counter("tomd_submission_failures_total",
                                           "Intents given up by tomd (bad template, window over, attempts spent)",
                                           ["facility"], registry=r)
        self.alert_to_submission = Histogram("tomd_alert_to_submission_seconds",
                                             "Seconds from an alert's rule decision (made as the alert is "
                                             "ingested) to the facility accepting its request",
                                             ["facility"], buckets=LATENCY_BUCKETS, registry=r)
        self.facility_calls = Counter("tomd_facility_requests_total",
                                      "HTTP calls to facility APIs, by operation and status code "
                                      "(code is the HTTP status, or timeout / error)",
                                      ["facility", "operation", "code"], registry=r)
        self.facility_seconds = Histogram("tomd_facility_request_seconds", "Duration of facility API calls",
                                          ["facility", "operation"], buckets=CALL_SECONDS_BUCKETS, registry=r)

        # ---------------------------------------------------------- 5 status
        # tomd_observation_requests_open{state} and tomd_dead_letters_unresolved: DatabaseCollector
        self.status_changes = Counter("tomd_observation_status_changes_total",
                                      "Observation request state changes recorded", ["facility", "state"],
                                      registry=r)
        self.scheduler_up = Gauge("tomd_scheduler_running", "1 while the job scheduler runs", registry=r)
        self.polls = Counter("tomd_status_polls_total",
                             "Status poll cycles per facility by outcome (ok; skipped: another daemon was "
                             "polling that facility; failed: the facility or the database failed the cycle)",
                             ["facility", "outcome"], registry=r)
        self.poll_seconds = Histogram("tomd_status_poll_seconds", "Duration of status poll cycles that ran",
                                      ["facility"], buckets=CALL_SECONDS_BUCKETS, registry=r)

        # ------------------------------------------------------------ 6 data
        self.products = Counter("tomd_data_products_downloaded_total", "Data products downloaded and stored",
                                ["facility"], registry=r)
        self.product_bytes = Counter("tomd_data_products_downloaded_bytes_total",
                                     "Bytes of data products downloaded and stored", ["facility"], registry=r)
        self.product_failures = Counter("tomd_data_product_failures_total", "Data product downloads that failed",
                                        ["facility"], registry=r)

        # ----------------------------------------------- 7 hooks and notices
        self.hook_runs = Counter("tomd_hook_runs_total", "Hook runs by hook and outcome (ok, failed, timeout)",
                                 ["hook", "outcome"], registry=r)
        self.hook_seconds = Histogram("tomd_hook_run_seconds", "Duration of hook runs", ["hook"],
                                      buckets=HOOK_SECONDS_BUCKETS, registry=r)
        self.notifications = Counter("tomd_notifications_sent_total", "Notifications delivered", ["channel"],
                                     registry=r)
        self.notification_failures = Counter("tomd_notifications_failed_total", "Notifications that failed",
                                             ["channel"], registry=r)
        self.outbox_pending = Gauge("tomd_outbox_pending_events", "Events in the outbox not yet handled",
                                    registry=r)

        self.consumers = ConsumerCollector()
        r.register(self.consumers)
        self.database = DatabaseCollector(self)
        r.register(self.database)

    # ------------------------------------------------------------ ingest

    def init_stream(self, stream: str, topics: Iterable[str] = ()) -> None:
        """Create a stream's series at 0 (and its topics', for the literal topic names given):
        ``increase()`` over a series that appears at 1 misses its first event, so the first
        dead letter or failed batch of a stream would never alert."""
        for counter in (self.duplicates, self.skipped_test, self.targets_created, self.photometry, self.notices):
            counter.labels(stream)
        for kind in ("retryable", "error"):
            self.ingest_failures.labels(stream, kind)
        for topic in topics:
            self._init_topic(stream, topic)

    def _init_topic(self, stream: str, topic: str) -> None:
        for counter in (self.messages, self.alerts_ingested, self.dead_letters):
            counter.labels(stream, topic)

    def observe_batch(self, stream: str, result: BatchResult, seconds: Mapping[str, float] | float,
                      topics: Mapping[str, int] | None = None, alerts_by_topic: Mapping[str, int] | None = None,
                      dead_letters_by_topic: Mapping[str, int] | None = None) -> None:
        """Record one finished ingest batch.

        ``seconds``: per stage (``{"parse": s, "database": s}``; "total" is
        their sum unless given) or the batch's total. ``topics``: messages
        per topic; ``alerts_by_topic`` / ``dead_letters_by_topic``: new alerts /
        dead letters per topic (else all count under the batch's only topic, or topic "").
        """
        if topics:
            for topic, n in topics.items():
                self._init_topic(stream, topic)  # the topic's other series at 0 from its first batch
                self.messages.labels(stream, topic).inc(n)
        else:
            self.messages.labels(stream, "").inc(result.messages)
        if alerts_by_topic is None:
            alerts_by_topic = {(next(iter(topics)) if topics and len(topics) == 1 else ""): result.alerts}
        for topic, n in alerts_by_topic.items():
            if n:
                self.alerts_ingested.labels(stream, topic).inc(n)
        if result.alerts:
            self.last_ingest.labels(stream).set(time.time())
        if result.dead_letters:
            if dead_letters_by_topic is None:
                only = next(iter(topics)) if topics and len(topics) == 1 else ""
                dead_letters_by_topic = {only: result.dead_letters}
            for topic, n in dead_letters_by_topic.items():
                if n:
                    self.dead_letters.labels(stream, topic).inc(n)
        for counter, n in ((self.duplicates, result.duplicates), (self.skipped_test, result.skipped_test),
                           (self.targets_created, result.targets_created),
                           (self.photometry, result.photometry_points), (self.notices, result.notices)):
            if n:
                counter.labels(stream).inc(n)
        self.batch_size.labels(stream).observe(result.messages)
        if isinstance(seconds, Mapping):
            stages = dict(seconds)
            stages.setdefault("total", sum(seconds.values()))
        else:
            stages = {"total": float(seconds)}
        for stage, s in stages.items():
            self.stage_seconds.labels(stream, stage).observe(s)

    def observe_batch_failure(self, stream: str, exc: BaseException) -> None:
        """An ingest batch raised: ``retryable`` (offered again) or ``error``."""
        self.ingest_failures.labels(stream, "retryable" if isinstance(exc, RetryableError) else "error").inc()
        if _is_database_error(exc):
            self.database_errors.labels("ingest").inc()

    def observe_ingestor(self, stream: str, ingestor: Any, topics: Iterable[str] = ()) -> ObservedIngestor:
        """A BatchHandler that forwards to ``ingestor`` and records each batch; the stream's
        series (and those of ``topics``, literal topic names) start at 0."""
        self.init_stream(stream, topics)
        return ObservedIngestor(self, stream, ingestor)

    def watch_consumer(self, stream: str, consumer: Any) -> None:
        """Export ``consumer.stats`` (a ``ConsumerStats``), read at each scrape."""
        self.consumers.add(stream, lambda: consumer.stats)

    # ----------------------------------------------------- later stages

    def observe_verdict(self, rule: str, outcome: str | bool, seconds: float | None = None) -> None:
        """One recorded rule verdict: outcome as in ``VERDICT_OUTCOMES`` (or a bool: fired / not_fired)."""
        if isinstance(outcome, bool):
            outcome = "fired" if outcome else "not_fired"
        self.verdicts.labels(rule, outcome).inc()
        if seconds is not None:
            self.rule_seconds.observe(seconds)

    def observe_verdicts(self, verdicts: Sequence[Any], seconds: Sequence[float] = ()) -> None:
        """A committed batch's verdicts (``.rule``, ``.outcome``) and the seconds spent on each alert
        (the ``RuleEngine.observer``)."""
        counts: dict[tuple[str, str], int] = {}
        for v in verdicts:
            key = (v.rule, v.outcome)
            counts[key] = counts.get(key, 0) + 1
        for (rule, outcome), n in counts.items():
            self.verdicts.labels(rule, outcome).inc(n)
        for s in seconds:
            self.rule_seconds.observe(s)

    def observe_rules(self, loaded: int, problems: Sequence[str] = ()) -> None:
        """The rule files were looked at (the ``RuleSet.observer``): rules in force, new problems."""
        self.rules_loaded.set(loaded)
        if problems:
            self.rule_reload_failures.inc()

    def observe_submission(self, facility: str, outcome: str, alert_age_s: float | None = None) -> None:
        """A submission attempt's recorded outcome (the ``Submitter.observer``): ``submitted`` (with
        the seconds since the alert's decision), ``rejected``, ``failed`` or ``retry``."""
        if outcome == "submitted":
            self.submissions.labels(facility).inc()
            if alert_age_s is not None:
                self.alert_to_submission.labels(facility).observe(max(0.0, alert_age_s))
        elif outcome == "rejected":
            self.rejections.labels(facility).inc()
        elif outcome == "failed":
            self.submission_failures.labels(facility).inc()
        elif outcome == "retry":
            self.submission_retries.labels(facility).inc()
        else:
            raise ValueError(f"unknown submission outcome {outcome!r}")

    def observe_facility_call(self, facility: str, operation: str, code: int | str, seconds: float) -> None:
        """One HTTP call to a facility API; ``code`` is the status, or "timeout" / "error"."""
        self.facility_calls.labels(facility, operation, str(code)).inc()
        self.facility_seconds.labels(facility, operation).observe(seconds)

    def set_open_requests(self, by_state: Mapping[str, int]) -> None:
        """Replace the open-request counts by hand (when no database is watched)."""
        self.database.fixed = dict(by_state)

    def watch_scheduler(self, scheduler: Any) -> None:
        """``tomd_scheduler_running`` follows ``scheduler.running`` (an APScheduler scheduler), at scrape time."""
        self.scheduler_up.set_function(_safe(lambda: 1.0 if getattr(scheduler, "running", False) else 0.0))

    def watch_outbox(self, pending: Callable[[], int], *, cache_s: float = 5.0) -> None:
        """``tomd_outbox_pending_events`` is ``pending()`` at scrape time, asked at most every
        ``cache_s`` (it is a database count; several scrapers must not multiply it). A failing
        call leaves NaN, never a failed scrape."""
        self.outbox_pending.set_function(_safe(_cached(lambda: float(pending()), cache_s)))

    def watch_poller(self, poller: Any) -> None:
        """Count each status poll cycle of ``poller`` (a ``tomd.status.Poller``) by facility and outcome.

        The poller reports its cycles only as return values (``FacilityPoll``), which the job
        scheduler drops; so ``poller.poll`` is replaced, on this instance, by one that reads them
        on the way out."""
        inner = poller.poll

        def poll(only: Any = None, *, full: bool = False) -> Any:
            results = inner(only, full=full)
            for r in results or ():
                self.observe_poll(r.facility, "skipped" if r.skipped else "failed" if r.error else "ok",
                                  None if r.skipped else r.seconds)
            return results

        poller.poll = poll

    def observe_poll(self, facility: str, outcome: str, seconds: float | None = None) -> None:
        self.polls.labels(facility, outcome).inc()
        if seconds is not None:
            self.poll_seconds.labels(facility).observe(seconds)

    def watch_database(self, sessions: Callable[[], Any], *, cache_s: float = 5.0) -> None:
        """Count open requests and unresolved dead letters at scrape time (at most every ``cache_s``)."""
        self.database.sessions, self.database.cache_s = sessions, cache_s

    def observe_status_change(self, facility: str, state: str) -> None:
        self.status_changes.labels(facility, state).inc()

    def observe_product(self, facility: str, nbytes: int | None, ok: bool = True) -> None:
        if ok:
            self.products.labels(facility).inc()
            if nbytes:
                self.product_bytes.labels(facility).inc(nbytes)
        else:
            self.product_failures.labels(facility).inc()

    def observe_hook(self, hook: str, outcome: str, seconds: float) -> None:
        """One hook run: outcome ok / failed / timeout."""
        self.hook_runs.labels(hook, outcome).inc()
        self.hook_seconds.labels(hook).observe(seconds)

    def observe_notification(self, channel: str, ok: bool) -> None:
        (self.notifications if ok else self.notification_failures).labels(channel).inc()

    def observe_database_error(self, component: str) -> None:
        self.database_errors.labels(component).inc()

    def database_errors_of(self, component: str) -> Callable[[BaseException], None]:
        """An ``on_error(exc)`` for a component's loop: counts the failures that are database
        errors (SQLAlchemy's, anywhere in the ``__cause__`` chain) under ``component``."""
        self.database_errors.labels(component)  # 0 from the start: increase() sees the first error

        def on_error(exc: BaseException) -> None:
            if _is_database_error(exc):
                self.database_errors.labels(component).inc()

        return on_error

    # ------------------------------------------------------- exposition

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def sample_names(self) -> set[str]:
        """Every series name Prometheus can see from this registry (with _total, _bucket, ... suffixes)."""
        return sample_names(self.registry)


class ObservedIngestor:
    """Wraps an ``Ingestor`` (the consumer's BatchHandler) and records each batch.

    Cost per batch: one dict of topics, a few counter increments and one
    histogram observation per stage. Per alert: a string split in a sink
    that counts new alerts by topic; the counts are published only when the
    batch's transaction committed.
    """

    def __init__(self, metrics: Metrics, stream: str, ingestor: Any):
        self.metrics = metrics
        self.stream = stream
        self.ingestor = ingestor
        self._by_topic: dict[str, int] = {}
        sinks = getattr(ingestor, "sinks", None)
        self._counts_topics = isinstance(sinks, list)
        if self._counts_topics:
            sinks.append(self._count_sink)

    def _count_sink(self, _session, stored: Sequence[Any]) -> None:
        counts = self._by_topic
        for item in stored:
            t = _topic_of(item.coords)
            counts[t] = counts.get(t, 0) + 1

    def handle(self, messages: Sequence[Any]) -> BatchResult:
        before = dict(getattr(self.ingestor, "seconds", {}))
        self._by_topic = {}
        dead = getattr(self.ingestor, "dead_letter_topics", None)
        if isinstance(dead, list):
            dead.clear()
        t0 = time.perf_counter()
        try:
            result = self.ingestor.handle(messages)
        except BaseException as exc:
            self.metrics.observe_batch_failure(self.stream, exc)
            raise
        total = time.perf_counter() - t0
        after = getattr(self.ingestor, "seconds", {})
        seconds = {k: after[k] - before.get(k, 0.0) for k in after}
        seconds["total"] = total
        topics: dict[str, int] = {}
        for m in messages:
            t = m.topic or ""
            topics[t] = topics.get(t, 0) + 1
        dead_by_topic = None
        if isinstance(dead, list) and result.dead_letters:
            # The last ones are the pass that committed (a batch the database refused is
            # applied again message by message, and dead-letters again).
            dead_by_topic = {}
            for t in dead[-result.dead_letters:]:
                dead_by_topic[t] = dead_by_topic.get(t, 0) + 1
        self.metrics.observe_batch(self.stream, result, seconds, topics,
                                   self._by_topic if self._counts_topics else None, dead_by_topic)
        return result

    def __getattr__(self, name: str) -> Any:  # totals, seconds, settings ... of the wrapped ingestor
        if name == "ingestor":
            raise AttributeError(name)
        return getattr(self.ingestor, name)


class ConsumerCollector(Collector):
    """Reads each stream's ``ConsumerStats`` at scrape time (no cost on the consume path)."""

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], ConsumerStats]] = {}
        self._lock = threading.Lock()

    def add(self, stream: str, stats: Callable[[], ConsumerStats]) -> None:
        with self._lock:
            self._sources[stream] = stats

    def remove(self, stream: str) -> None:
        with self._lock:
            self._sources.pop(stream, None)

    _COUNTERS = (
        ("consumed", "tomd_consumer_messages", "Records received from Kafka (a retried batch counts again)"),
        ("handled", "tomd_consumer_handled_messages", "Records in batches the handler finished"),
        ("skipped", "tomd_consumer_skipped_messages", "Records older than a timestamp start position"),
        ("batches", "tomd_consumer_batches", "Handler calls that returned"),
        ("retries", "tomd_consumer_retries", "Handler calls that raised a retryable error"),
        ("commits", "tomd_consumer_commits", "Offset commits"),
        ("commit_failures", "tomd_consumer_commit_failures", "Offset commits that failed"),
        ("errors", "tomd_consumer_errors", "Non-fatal errors reported by the Kafka client"),
        ("rebalances", "tomd_consumer_rebalances", "Partition assignments received"),
    )

    def describe(self) -> Iterable[Any]:
        return self._families({})

    def collect(self) -> Iterable[Any]:
        with self._lock:
            sources = dict(self._sources)
        stats = {}
        for stream, get in sources.items():
            try:
                stats[stream] = get()
            except Exception:  # noqa: BLE001 - a scrape must never fail on one stream
                continue
        return self._families(stats)

    def _families(self, stats: Mapping[str, ConsumerStats]) -> list[Any]:
        out = []
        for attr, name, doc in self._COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=["stream"])
            for stream, st in stats.items():
                fam.add_metric([stream], getattr(st, attr))
            out.append(fam)
        lag = GaugeMetricFamily("tomd_consumer_lag_messages",
                                "Records behind the partition's high watermark (as of the last fetch)",
                                labels=["stream", "topic", "partition"])
        committed = GaugeMetricFamily("tomd_consumer_committed_offset", "Next offset committed by this member",
                                      labels=["stream", "topic", "partition"])
        assigned = GaugeMetricFamily("tomd_consumer_assigned_partitions", "Partitions assigned to this member",
                                     labels=["stream"])
        backing_off = GaugeMetricFamily("tomd_consumer_backing_off",
                                        "1 while the stream waits to retry a failed batch", labels=["stream"])
        for stream, st in stats.items():
            mine = st.assigned
            for (topic, partition), n in sorted(st.lag.items()):
                if (topic, partition) in mine:  # a revoked partition's last lag is another member's now
                    lag.add_metric([stream, topic, str(partition)], n)
            for (topic, partition), off in sorted(st.committed.items()):
                if (topic, partition) in mine:
                    committed.add_metric([stream, topic, str(partition)], off)
            assigned.add_metric([stream], len(mine))
            backing_off.add_metric([stream], 1 if st.backing_off else 0)
        return [*out, lag, committed, assigned, backing_off]


class DatabaseCollector(Collector):
    """Reads what only the database knows at scrape time: open requests by state, unresolved
    dead letters. The same for every replica (graph them with ``max``, not ``sum``).

    One indexed GROUP BY and one count, cached ``cache_s`` so several scrapers cost one query,
    bounded by a statement timeout on PostgreSQL. A failed read is counted in
    ``tomd_database_errors_total{component="metrics"}`` and leaves the series out (never stale).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sessions: Callable[[], Any] | None = None
        self.cache_s = 5.0
        self.fixed: dict[str, int] | None = None
        self._cached: tuple[float, dict[str, int], int] | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Any]:
        return self._families({}, None)

    def _read(self) -> tuple[dict[str, int], int | None]:
        if self.sessions is None:
            return dict(self.fixed or {}), None
        with self._lock:  # concurrent scrapes wait for one query
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_s:
                return self._cached[1], self._cached[2]
            from sqlalchemy import text

            from tomd.db import repository as repo

            with self.sessions() as s:
                if s.get_bind().dialect.name == "postgresql":
                    s.execute(text("SET LOCAL statement_timeout = 2000"))
                by_state = repo.open_requests_by_state(s)
                dead = repo.unresolved_dead_letter_count(s)
            self._cached = (now, by_state, dead)
            return by_state, dead

    def collect(self) -> Iterable[Any]:
        try:
            by_state, dead = self._read()
        except Exception:  # noqa: BLE001 - a scrape must never fail on the database
            self.metrics.observe_database_error("metrics")
            return self._families(None, None)
        return self._families(by_state, dead)

    def _families(self, by_state: Mapping[str, int] | None, dead: int | None) -> list[Any]:
        from tomd.db.repository import OPEN_REQUEST_STATES

        open_ = GaugeMetricFamily("tomd_observation_requests_open",
                                  "Observation requests not yet in a final state, by state (from the database)",
                                  labels=["state"])
        if by_state is not None:
            for state in sorted(set(OPEN_REQUEST_STATES) | set(by_state)):  # 0, not absent, for empty states
                open_.add_metric([state], by_state.get(state, 0))
        unresolved = GaugeMetricFamily("tomd_dead_letters_unresolved",
                                       "Dead letters not yet retried or resolved (from the database)")
        if dead is not None:
            unresolved.add_metric([], dead)
        return [open_, unresolved]


# Component name in the daemon → the label of its database errors.
DATABASE_ERROR_COMPONENTS = {"scheduler": "scheduler", "retriever": "retriever", "notifier": "notifier",
                             "hooks": "hooks"}


def instrument_component(metrics: Metrics, component: Any, label: str) -> None:
    """Point a component's ``on_error`` slot (and its poller's, for the scheduler) at
    ``tomd_database_errors_total{component=label}``."""
    if hasattr(component, "on_error"):
        component.on_error = metrics.database_errors_of(label)
    poller = getattr(component, "poller", None)
    if poller is not None and hasattr(poller, "on_error"):
        poller.on_error = metrics.database_errors_of("status")


def instrument(daemon: Any, metrics: Metrics | None = None) -> Metrics:
    """Attach metrics to a built, not yet started ``tomd.daemon.Daemon``.

    Each stream's consumer gets an ``ObservedIngestor`` around its ingestor
    as handler, and its stats are exported at scrape time; the rule engine,
    the submitter and every facility client that has an ``observer`` slot
    report to it; the database is read at scrape time. Parts the daemon
    lacks are skipped. Returns the ``Metrics`` (a new one unless given).
    """
    metrics = metrics or Metrics()
    for runner in daemon.runners:
        name = runner.stream.name
        kafka = getattr(runner.stream, "kind", "kafka") == "kafka"  # file globs and poll streams name no topics
        literal = [t for t in getattr(runner.stream, "topics", ()) if not t.startswith("^")] if kafka else []
        runner.consumer.handler = metrics.observe_ingestor(name, runner.ingestor, literal)
        if hasattr(runner.consumer.stats, "lag"):  # file streams have no group, lag or offsets
            metrics.watch_consumer(name, runner.consumer)
    rules = getattr(daemon, "rules", None)
    if rules is not None and hasattr(rules, "observer"):
        rules.observer = metrics.observe_verdicts
        ruleset = getattr(rules, "ruleset", None)
        if ruleset is not None and hasattr(ruleset, "observer"):
            ruleset.observer = metrics.observe_rules
            metrics.rules_loaded.set(len(ruleset.current()))
    submitter = getattr(daemon, "submitter", None)
    if submitter is not None and hasattr(submitter, "observer"):
        submitter.observer = metrics.observe_submission
    if submitter is not None and hasattr(submitter, "on_sweep_error"):
        submitter.on_sweep_error = metrics.database_errors_of("submitter")
    facilities = getattr(daemon, "facilities", None)
    for client in (getattr(facilities, "clients", None) or {}).values():
        if hasattr(client, "observer"):
            client.observer = metrics.observe_facility_call
    for c in getattr(daemon, "components", ()):  # those added before instrument(); add_components does the rest
        label = DATABASE_ERROR_COMPONENTS.get(c.name)
        if label is not None:
            instrument_component(metrics, c.component, label)
    sessions = getattr(daemon, "sessions", None)
    if sessions is not None:
        metrics.watch_database(sessions)
    return metrics


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Names of the series a registry exposes, including families without samples yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created", ""), "gauge": ("",), "info": ("_info",),
                "stateset": ("",), "enum": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
                "unknown": ("",)}
    names: set[str] = set()
    for fam in registry.collect():
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


def _cached(fn: Callable[[], float], ttl_s: float) -> Callable[[], float]:
    """``fn()``, asked again only when the last answer is older than ``ttl_s`` (errors are not kept)."""
    lock = threading.Lock()
    last: list[float] = []  # [value, monotonic time]

    def read() -> float:
        with lock:
            if last and time.monotonic() - last[1] < ttl_s:
                return last[0]
            value = fn()
            last[:] = [value, time.monotonic()]
            return value

    return read


def _safe(fn: Callable[[], float]) -> Callable[[], float]:
    def read() -> float:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - a scrape must never fail on one gauge
            return float("nan")

    return read


def _is_database_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:
        if isinstance(e, (DBAPIError, SQLAlchemyError)):
            return True
        e, seen = e.__cause__, seen + 1
    return False

