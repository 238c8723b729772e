"""Metrics and the operations endpoint: real HTTP on loopback, real ingest, real databases."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tests.configs import sim_rule, write_daemon_config
from tomd.alerts.consumer import ConsumerStats, RawMessage
from tomd.alerts.ingest import IngestSettings, Ingestor
from tomd.db import migrate
from tomd.errors import RetryableError
from tomd.health import daemon_checks, database_check, parse_listen, start_http
from tomd.metrics import Metrics, instrument


def get(url: str, timeout: float = 120.0) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


_HELD: list[socket.socket] = []


def closed_port() -> int:
    """A port where nothing listens (connection refused): bound and never listening for the whole
    session, so no other test or process can start listening on it meanwhile."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


@pytest.fixture
def serve():
    handles = []

    def start(*args, **kwargs):
        h = start_http(*args, **kwargs)
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.stop()


def value(m: Metrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


# ------------------------------------------------------------------ HTTP


def test_endpoints_answer_over_http(serve):
    m = Metrics()
    h = serve("127.0.0.1:0", m.registry, checks={"always": lambda: True}, check_timeout_s=60)
    assert h.port > 0 and h.url == f"http://127.0.0.1:{h.port}"
    assert get(h.url + "/healthz")[:2] == (200, "text/plain; charset=utf-8")
    code, ctype, body = get(h.url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    info = families["tomd_build_info"].samples[0]
    from tomd import __version__
    assert info.labels["version"] == __version__ and info.value == 1
    assert "tomd_consumer_lag_messages" in families and "process_cpu_seconds" in families
    code, ctype, body = get(h.url + "/readyz")
    assert (code, ctype) == (200, "application/json")
    assert json.loads(body) == {"status": "ready", "checks": {"always": {"ok": True}}}
    assert get(h.url + "/nope")[0] == 404
    req = urllib.request.Request(h.url + "/healthz", method="HEAD")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b""
    h.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", h.port), timeout=1).close()


def test_readyz_is_503_when_the_database_is_unreachable(serve, db):
    down = migrate.connect(f"postgresql+psycopg://tomd@127.0.0.1:{closed_port()}/tomd")
    # A deadline no check reaches on a loaded machine: the unreachable database's check ends by
    # itself (refused, an OperationalError below), not cut off by the deadline; the real one answers.
    h = serve("127.0.0.1:0", checks={"database": database_check(down), "up": database_check(db.engine)},
              check_timeout_s=60)
    code, _, body = get(h.url + "/readyz")
    assert code == 503
    doc = json.loads(body)
    assert doc["status"] == "not ready"
    assert doc["checks"]["database"]["ok"] is False and "OperationalError" in doc["checks"]["database"]["error"]
    assert doc["checks"]["up"] == {"ok": True}  # the real database (SQLite and PostgreSQL) answers
    assert get(h.url + "/healthz")[0] == 200  # alive all the same: liveness must not restart it
    down.dispose()


def test_a_hanging_check_times_out_and_is_not_started_twice(serve):
    release = threading.Event()
    calls = []

    def hangs():
        calls.append(1)
        release.wait(300)
        return True

    # The deadline must be long enough for the two instant checks to answer on a loaded machine
    # (each probe waits it out on the hanging one).
    h = serve("127.0.0.1:0", checks={"slow": hangs, "false": lambda: False, "says": lambda: "consumer idle"},
              check_timeout_s=1.0)
    for _ in range(3):
        code, _, body = get(h.url + "/readyz")
        checks = json.loads(body)["checks"]
        assert code == 503 and "no answer within 1 s" in checks["slow"]["error"]
        assert checks["false"]["ok"] is False and checks["says"]["error"] == "consumer idle"
    assert len(calls) == 1  # the probe waited on the one run in flight
    release.set()
    deadline = time.monotonic() + 60
    while (slow := json.loads(get(h.url + "/readyz")[2])["checks"]["slow"]) != {"ok": True}:
        assert time.monotonic() < deadline, slow  # the released run ends, then the check answers
        time.sleep(0.05)


def test_concurrent_requests_are_bounded(serve):
    gate, entered = threading.Event(), threading.Event()

    def slow() -> bool:
        entered.set()  # the probe holds the only slot from before its checks run until it answers
        return gate.wait(120)

    h = serve("127.0.0.1:0", checks={"slow": slow}, max_concurrent=1, check_timeout_s=120)
    results = []
    t = threading.Thread(target=lambda: results.append(get(h.url + "/readyz", timeout=180)[0]))
    t.start()
    assert entered.wait(60)
    assert get(h.url + "/healthz")[0] == 503  # the only slot is busy: refused at once, not queued
    gate.set()
    t.join(120)
    assert results == [200]
    # The slot is freed once the handler returns, just after the client has its answer: poll for it.
    deadline = time.monotonic() + 60
    while (code := get(h.url + "/healthz")[0]) != 200:
        assert code == 503 and time.monotonic() < deadline, code
        time.sleep(0.02)


def test_listen_parsing():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9464") == ("0.0.0.0", 9464)
    with pytest.raises(ValueError):
        parse_listen("localhost")


def test_daemon_checks_on_a_real_daemon(serve, db):
    from tomd.config import Config
    from tomd.daemon import Daemon

    daemon = Daemon(Config(), engine=db.engine)
    scheduler = SimpleNamespace(running=False)
    h = serve("127.0.0.1:0", checks=daemon_checks(daemon, scheduler=scheduler), check_timeout_s=60)
    code, _, body = get(h.url + "/readyz")
    assert code == 503 and json.loads(body)["checks"] == {
        "database": {"ok": True}, "scheduler": {"ok": False, "error": "scheduler not running"}}
    scheduler.running = True
    assert get(h.url + "/readyz")[0] == 200


def test_a_file_stream_that_finished_reading_stays_ready_and_one_that_failed_is_not(serve, db, shared_data,
                                                                                    tmp_path):
    """A file stream's thread returns once its files are read: done, not down. A stream
    thread that ended on an error is not ready."""
    from tomd.config import load_config
    from tomd.daemon import Daemon

    cfg = write_daemon_config(tmp_path, db.url, extra=f"""
[[streams]]
name = "archive"
kind = "file"
topics = ["{shared_data / 'ztf/ztf-avro-alert'}/*.avro"]
format = "ztf-avro"
""")
    daemon = Daemon(load_config(cfg), engine=db.engine)
    h = serve("127.0.0.1:0", checks=daemon_checks(daemon), check_timeout_s=60)
    assert json.loads(get(h.url + "/readyz")[2])["checks"]["streams"]["ok"] is False  # not started yet
    daemon.start()
    try:
        runner = daemon.runners[0]
        runner.thread.join(120)
        assert not runner.thread.is_alive() and runner.ingestor.totals.alerts > 0
        code, _, body = get(h.url + "/readyz")
        assert code == 200, body
        runner.error = RuntimeError("the stream failed")  # what Daemon._run_stream records
        code, _, body = get(h.url + "/readyz")
        assert code == 503 and json.loads(body)["checks"]["streams"] == {"ok": False,
                                                                       "error": "not running: archive"}
    finally:
        daemon.stop.set()
        daemon.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_jobs_are_not_ready_when_the_scheduler_thread_died():
    """APScheduler's ``running`` flag stays set when its thread dies; readiness looks at the thread."""
    from tomd.health import scheduler_check
    from tomd.scheduler import Jobs

    jobs = Jobs(first_delay_s=0.0, jitter_s=0.0)
    jobs.add_interval("tick", lambda: None, 0.05)
    jobs.start()
    try:
        assert jobs.ready() is True and scheduler_check(jobs)() is True

        def broken() -> float:
            raise RuntimeError("the scheduler loop broke")

        jobs._scheduler._process_jobs = broken  # APScheduler's own loop step, not tomd's
        jobs._scheduler.wakeup()
        jobs._scheduler._thread.join(60)
        assert jobs.running  # the flag alone would say ready
        assert jobs.ready() == "scheduler thread not alive"
        assert scheduler_check(jobs)() == "scheduler thread not alive"
    finally:
        jobs._scheduler.state = 0  # STATE_STOPPED: the dead thread cannot be joined twice


# --------------------------------------------------------------- metrics


def test_each_metrics_object_owns_its_registry():
    a, b = Metrics(), Metrics()
    a.observe_verdict("young", True)
    assert value(a, "tomd_rule_verdicts_total", rule="young", outcome="fired") == 1
    assert value(b, "tomd_rule_verdicts_total", rule="young", outcome="fired") == 0
    assert not any(n.startswith("tomd_") for n in _names(REGISTRY))  # nothing in the process-global registry


def _names(registry):
    return {f.name for f in registry.collect()}


def ztf_parser(data: bytes):
    from tomd.alerts.decode import decode_avro_ocf
    from tomd.alerts.formats import ztf

    return [a for rec in decode_avro_ocf(data) for a in ztf.parse(rec)]


def kafka_messages(paths, topic="ztf_20250101_programid1"):
    return [RawMessage(topic, i % 2, i, None, p.read_bytes(), None) for i, p in enumerate(paths)]


def test_metrics_follow_a_real_ingest(db, shared_data):
    from tests.alert_samples import ztf_files

    m = Metrics()
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), ztf_parser)
    handler = m.observe_ingestor("ztf", ing)
    msgs = kafka_messages(ztf_files()[:30])
    other = RawMessage("ztf_20250102_programid1", 0, 0, None, msgs[0].value, None)  # same alert, another topic
    garbage = RawMessage("ztf_20250101_programid1", 0, 999, None, b"not avro at all", None)
    batches = [msgs[:10], msgs[10:20], msgs[20:] + [other, garbage]]
    for b in batches:
        handler.handle(b)
    t = ing.totals
    assert t.alerts == len(msgs) and t.dead_letters == 1 and t.duplicates == 1
    assert value(m, "tomd_alerts_ingested_total", stream="ztf", topic="ztf_20250101_programid1") == t.alerts
    assert value(m, "tomd_alerts_ingested_total", stream="ztf", topic="ztf_20250102_programid1") == 0
    assert value(m, "tomd_messages_handled_total", stream="ztf", topic="ztf_20250101_programid1") == len(msgs) + 1
    assert value(m, "tomd_messages_handled_total", stream="ztf", topic="ztf_20250102_programid1") == 1
    assert value(m, "tomd_alerts_dead_lettered_total", stream="ztf", topic="ztf_20250101_programid1") == 1
    # Another topic of the same batch: its series exists from its first batch, at 0.
    assert m.registry.get_sample_value("tomd_alerts_dead_lettered_total",
                                       {"stream": "ztf", "topic": "ztf_20250102_programid1"}) == 0
    assert value(m, "tomd_alerts_duplicate_total", stream="ztf") == 1
    assert value(m, "tomd_targets_created_total", stream="ztf") == t.targets_created > 0
    assert value(m, "tomd_photometry_points_total", stream="ztf") == t.photometry_points > 0
    assert value(m, "tomd_ingest_batch_messages_count", stream="ztf") == 3
    assert value(m, "tomd_ingest_batch_messages_sum", stream="ztf") == len(msgs) + 2
    for stage in ("parse", "database", "total"):
        assert value(m, "tomd_ingest_stage_seconds_count", stream="ztf", stage=stage) == 3
    assert value(m, "tomd_ingest_stage_seconds_sum", stream="ztf", stage="database") == pytest.approx(
        ing.seconds["database"])
    assert (value(m, "tomd_ingest_stage_seconds_sum", stream="ztf", stage="total")
            >= value(m, "tomd_ingest_stage_seconds_sum", stream="ztf", stage="database"))
    assert time.time() - value(m, "tomd_last_alert_ingested_timestamp_seconds", stream="ztf") < 60
    # Replay: nothing new, every alert a duplicate; wrapped attributes still reachable.
    handler.handle(msgs)
    assert value(m, "tomd_alerts_ingested_total", stream="ztf", topic="ztf_20250101_programid1") == len(msgs)
    assert value(m, "tomd_alerts_duplicate_total", stream="ztf") == 1 + len(msgs)
    assert handler.totals is ing.totals


def test_a_streams_series_start_at_zero_so_increase_sees_the_first_event(db):
    """Prometheus' increase() over a series that first appears at 1 reads 0: the counters that
    alert (dead letters, failed batches) exist at 0 once the stream is instrumented."""
    from tomd.config import Config, Stream

    m = Metrics(process=False)
    daemon = SimpleNamespace(runners=[SimpleNamespace(
        stream=Stream(name="ztf", kind="kafka", topics=["ztf_20250101_programid1", "^ztf_.*"], bootstrap="k:9092",
                      format="ztf-avro", group="g"),
        ingestor=Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), lambda data: []),
        consumer=SimpleNamespace(handler=None, stats=SimpleNamespace()))])
    assert Config  # the Stream above is the config's own dataclass
    instrument(daemon, m)
    got = m.registry.get_sample_value
    assert got("tomd_alerts_dead_lettered_total", {"stream": "ztf", "topic": "ztf_20250101_programid1"}) == 0
    assert got("tomd_messages_handled_total", {"stream": "ztf", "topic": "ztf_20250101_programid1"}) == 0
    assert got("tomd_ingest_batch_failures_total", {"stream": "ztf", "kind": "error"}) == 0
    assert got("tomd_alerts_duplicate_total", {"stream": "ztf"}) == 0
    assert got("tomd_alerts_dead_lettered_total", {"stream": "ztf", "topic": "^ztf_.*"}) is None  # a pattern


def test_a_database_failure_is_counted_and_still_raised():
    from tomd.errors import DecodeError

    def parser(data):
        raise DecodeError("bad bytes")  # a dead letter: ingest has to write to the database

    m = Metrics()
    down = migrate.connect(f"postgresql+psycopg://tomd@127.0.0.1:{closed_port()}/tomd")
    ing = Ingestor(migrate.sessions(down), IngestSettings(stream="ztf", format="ztf-avro"), parser)
    handler = m.observe_ingestor("ztf", ing)
    with pytest.raises(RetryableError):
        handler.handle([RawMessage("t", 0, 0, None, b"x", None)])
    assert value(m, "tomd_database_errors_total", component="ingest") == 1
    assert value(m, "tomd_ingest_batch_failures_total", stream="ztf", kind="retryable") == 1
    assert value(m, "tomd_ingest_batch_messages_count", stream="ztf") == 0
    down.dispose()


def test_consumer_stats_are_read_at_scrape_time():
    m = Metrics()
    consumer = SimpleNamespace(stats=ConsumerStats())
    m.watch_consumer("ztf", consumer)
    assert value(m, "tomd_consumer_assigned_partitions", stream="ztf") == 0
    consumer.stats.consumed = 120
    consumer.stats.retries = 2
    consumer.stats.rebalances = 1
    consumer.stats.backing_off = True
    consumer.stats.assigned = frozenset({("ztf_a", 0), ("ztf_a", 1)})
    consumer.stats.lag = {("ztf_a", 0): 15, ("ztf_a", 1): 0, ("ztf_a", 2): 99}  # 2: revoked since
    consumer.stats.committed = {("ztf_a", 0): 1000}
    assert value(m, "tomd_consumer_messages_total", stream="ztf") == 120
    assert value(m, "tomd_consumer_retries_total", stream="ztf") == 2
    assert value(m, "tomd_consumer_backing_off", stream="ztf") == 1
    assert value(m, "tomd_consumer_assigned_partitions", stream="ztf") == 2
    assert value(m, "tomd_consumer_lag_messages", stream="ztf", topic="ztf_a", partition="0") == 15
    assert m.registry.get_sample_value("tomd_consumer_lag_messages",
                                       {"stream": "ztf", "topic": "ztf_a", "partition": "2"}) is None
    assert value(m, "tomd_consumer_committed_offset", stream="ztf", topic="ztf_a", partition="0") == 1000


def test_instrument_wraps_every_stream_of_a_daemon():
    ingestor = SimpleNamespace(sinks=[], seconds={"parse": 0.0, "database": 0.0})
    runner = SimpleNamespace(stream=SimpleNamespace(name="gcn"), ingestor=ingestor,
                             consumer=SimpleNamespace(handler=ingestor, stats=ConsumerStats(consumed=3)))
    m = instrument(SimpleNamespace(runners=[runner]))
    assert runner.consumer.handler.ingestor is ingestor and len(ingestor.sinks) == 1
    assert value(m, "tomd_consumer_messages_total", stream="gcn") == 3


def test_later_stage_observers():
    m = Metrics()
    m.observe_verdict("r1", False)
    m.observe_verdict("r1", "suppressed", seconds=0.0002)
    m.observe_submission("lco", "submitted", alert_age_s=95.0)
    m.observe_submission("lco", "rejected")
    m.observe_submission("lco", "retry")
    with pytest.raises(ValueError):
        m.observe_submission("lco", "maybe")
    m.observe_facility_call("lco", "submit", 201, 0.4)
    m.observe_facility_call("lco", "status", "timeout", 10.0)
    m.set_open_requests({"PENDING": 3, "WINDOW_EXPIRED": 1})
    m.set_open_requests({"PENDING": 2})
    m.observe_product("lco", 2_880_000)
    m.observe_product("lco", None, ok=False)
    m.observe_hook("slack_summary", "failed", 0.2)
    m.observe_notification("slack-transients", True)
    m.observe_notification("email", False)
    assert value(m, "tomd_rule_verdicts_total", rule="r1", outcome="not_fired") == 1
    assert value(m, "tomd_rule_evaluation_seconds_count") == 1
    assert value(m, "tomd_alert_to_submission_seconds_bucket", facility="lco", le="120.0") == 1
    assert value(m, "tomd_alert_to_submission_seconds_bucket", facility="lco", le="60.0") == 0
    assert value(m, "tomd_submission_rejections_total", facility="lco") == 1
    assert value(m, "tomd_submission_retries_total", facility="lco") == 1
    assert value(m, "tomd_facility_requests_total", facility="lco", operation="status", code="timeout") == 1
    assert value(m, "tomd_facility_request_seconds_count", facility="lco", operation="submit") == 1
    assert value(m, "tomd_observation_requests_open", state="PENDING") == 2
    assert value(m, "tomd_observation_requests_open", state="WINDOW_EXPIRED") == 0
    assert value(m, "tomd_data_products_downloaded_bytes_total", facility="lco") == 2_880_000
    assert value(m, "tomd_data_product_failures_total", facility="lco") == 1
    assert value(m, "tomd_hook_runs_total", hook="slack_summary", outcome="failed") == 1
    assert value(m, "tomd_notifications_sent_total", channel="slack-transients") == 1
    assert value(m, "tomd_notifications_failed_total", channel="email") == 1


def test_scheduler_and_outbox_are_read_at_scrape_time():
    m = Metrics(process=False)
    scheduler = SimpleNamespace(running=False)
    backlog = [3]
    m.watch_scheduler(scheduler)
    m.watch_outbox(lambda: backlog[0] if backlog else 1 // 0, cache_s=0)
    assert value(m, "tomd_scheduler_running") == 0 and value(m, "tomd_outbox_pending_events") == 3
    scheduler.running = True
    backlog.clear()  # the callback now raises: NaN, and the scrape still answers
    assert value(m, "tomd_scheduler_running") == 1
    assert m.registry.get_sample_value("tomd_outbox_pending_events") != m.registry.get_sample_value(
        "tomd_outbox_pending_events")  # NaN
    assert b"tomd_outbox_pending_events NaN" in m.exposition()


def test_outbox_backlog_is_asked_once_per_cache_period():
    m = Metrics(process=False)
    asked = []
    m.watch_outbox(lambda: asked.append(1) or len(asked), cache_s=3600)
    assert [value(m, "tomd_outbox_pending_events") for _ in range(3)] == [1, 1, 1] and len(asked) == 1


def test_outbox_backlog_counts_events_some_hook_has_not_finished(db):
    """tomd_outbox_pending_events in the daemon: distinct events with a run pending or running."""
    from tomd.daemon import _outbox_backlog
    from tomd.db import repository as repo
    from tomd.events import HookRegistered

    with db.sessions.begin() as s:
        e = [repo.add_event_id(s, HookRegistered(f"h{i}", ("*",))) for i in range(4)]
        for hook, event, state in [("h1", e[0], "done"), ("h2", e[0], "pending"),  # e0: one hook waits
                                   ("h1", e[1], "running"), ("h2", e[1], "running"),  # e1: counted once
                                   ("h1", e[2], "failed"),  # ended: not a backlog
                                   ("h1", e[3], "done"), ("h2", e[3], "done")]:
            repo.add_hook_run(s, {"hook": hook, "event_id": event, "state": state, "attempts": 0})
    m = Metrics(process=False)
    m.watch_outbox(lambda: _outbox_backlog(db.sessions), cache_s=0)
    assert value(m, "tomd_outbox_pending_events") == 2


def test_poll_cycles_are_counted_by_outcome():
    from tomd.status import FacilityPoll

    class Poller:
        def poll(self, only=None, *, full=False):
            return [FacilityPoll("lco", seconds=0.5), FacilityPoll("soar", skipped="another poller"),
                    FacilityPoll("gemini", error="503", seconds=1.0)]

    m = Metrics(process=False)
    poller = Poller()
    m.watch_poller(poller)
    assert len(poller.poll(["lco"])) == 3
    assert value(m, "tomd_status_polls_total", facility="lco", outcome="ok") == 1
    assert value(m, "tomd_status_polls_total", facility="soar", outcome="skipped") == 1
    assert value(m, "tomd_status_polls_total", facility="gemini", outcome="failed") == 1
    assert value(m, "tomd_status_poll_seconds_count", facility="lco") == 1
    assert value(m, "tomd_status_poll_seconds_count", facility="soar") in (0, None)


def test_submitter_sweep_failures_count_as_database_errors(tmp_path):
    """A real Submitter whose database has no tables: every sweep fails, each is counted."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from tomd.submit import SubmitSettings, Submitter

    engine = create_engine(f"sqlite:///{tmp_path}/empty.db")
    submitter = Submitter(sessionmaker(engine), {}, SubmitSettings())
    m = instrument(SimpleNamespace(runners=[], submitter=submitter), Metrics(process=False))
    stop = threading.Event()
    t = threading.Thread(target=submitter.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while value(m, "tomd_database_errors_total", component="submitter") < 2 and time.monotonic() < deadline:
        submitter.wake()
        time.sleep(0.05)
    stop.set()
    t.join(60)
    engine.dispose()
    assert value(m, "tomd_database_errors_total", component="submitter") >= 2


def test_names_follow_prometheus_conventions():
    import re

    m = Metrics()
    for fam in m.registry.collect():
        if not fam.name.startswith("tomd_"):
            continue
        assert re.fullmatch(r"tomd_[a-z][a-z0-9_]*", fam.name), fam.name
        if fam.type == "counter":
            assert not fam.name.endswith("_total")  # the client adds _total to the sample
        if fam.type == "histogram":
            # A unit in the name: seconds, bytes, or what is counted ("_size" says none).
            assert fam.name.endswith(("_seconds", "_bytes", "_messages")), fam.name
        assert fam.documentation, fam.name


# ------------------------------------------------------------- facilities


def test_facility_calls_are_counted_by_operation_and_code():
    """Each HTTP call to the (simulated) portal, retries included, with its status or timeout."""
    from tests.test_facilities_lco import TEMPLATES, sidereal
    from tomd.facilities.base import Intent
    from tomd.facilities.lco import LCOClient, api_operation
    from tomd.facilities.sim import SimObservatory

    m = Metrics(process=False)
    with SimObservatory(pending_s=3600) as sim:
        # Every call answers within the 2 s timeout, however loaded the machine, except the one the
        # sim holds back on purpose far longer (until it stops).
        c = LCOClient("sim", url=sim.url, token=sim.token, proposal="SIM2026A-001", templates=TEMPLATES,
                      timeout=2.0, max_attempts=3, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)
        c.observer = m.observe_facility_call
        doc = c.build_request("1m-gri", sidereal(), Intent(name="tomd-metrics"))
        assert c.validate(doc).ok
        sub = c.submit(doc)
        sim.inject("status", status=502, method="GET")
        sim.inject("slow", delay=600, method="GET")
        assert [g.name for g in c.find_by_name("tomd-metrics")] == ["tomd-metrics"]
        c.cancel(sub.facility_id)
        c.close()
    assert value(m, "tomd_facility_requests_total", facility="sim", operation="validate", code="200") == 1
    assert value(m, "tomd_facility_requests_total", facility="sim", operation="submit", code="201") == 1
    assert value(m, "tomd_facility_requests_total", facility="sim", operation="list", code="502") == 1
    assert value(m, "tomd_facility_requests_total", facility="sim", operation="list", code="timeout") == 1
    assert value(m, "tomd_facility_requests_total", facility="sim", operation="list", code="200") == 1
    assert value(m, "tomd_facility_requests_total", facility="sim", operation="cancel", code="200") == 1
    assert value(m, "tomd_facility_request_seconds_count", facility="sim", operation="list") == 3
    assert api_operation("GET", "https://observe.lco.global/api/requestgroups/12/") == "get"
    assert api_operation("GET", "https://archive-api.lco.global/frames/?request_id=3") == "frames"
    assert api_operation("GET", "https://x/some/odd/path/") == "other"


# ------------------------------------------------- the pipeline, end to end


def test_a_daemon_feeds_verdict_submission_facility_and_open_request_metrics(db, shared_data, tmp_path):
    """Real ZTF packets through a real daemon (file stream, rules, submitter, the simulated
    observatory in-process): the metrics agree with what the database holds."""
    from sqlalchemy import func, select

    from tomd.config import load_config
    from tomd.daemon import Daemon
    from tomd.db.models import Decision, ObservationRequest

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "all.toml").write_text(sim_rule("all"))
    (rules / "none.toml").write_text('name = "none"\nsources = ["ztf"]\nwhen = "alert.mag < 0"\nadd_tags = ["x"]\n')
    cfg = write_daemon_config(tmp_path, db.url, extra=f"""
[facilities.sim]
kind = "sim"

[[streams]]
name = "archive"
kind = "file"
topics = ["{shared_data / 'ztf/ztf-avro-alert'}/*.avro"]
format = "ztf-avro"
""")
    config = load_config(cfg)
    daemon = Daemon(config, engine=db.engine)
    m = instrument(daemon, Metrics(process=False))
    assert value(m, "tomd_rules_loaded") == 2
    daemon.start()
    try:
        deadline = time.monotonic() + 120
        while True:  # every intent submitted (or refused) by the submitter
            with db.sessions() as s:
                states = dict(s.execute(select(ObservationRequest.state, func.count())
                                        .group_by(ObservationRequest.state)).all())
            if states and not {"intent", "submitting"} & states.keys():
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.1)
    finally:
        daemon.stop.set()
        assert daemon.wait() == 0
    with db.sessions() as s:
        verdicts = dict(((r, o), n) for r, o, n in s.execute(
            select(Decision.rule, Decision.outcome, func.count()).group_by(Decision.rule, Decision.outcome)))
    assert verdicts and all(value(m, "tomd_rule_verdicts_total", rule=r, outcome=o) == n
                            for (r, o), n in verdicts.items()), verdicts
    assert value(m, "tomd_rule_evaluation_seconds_count") == daemon.summary()["archive"]["alerts"]
    accepted = sum(n for st, n in states.items() if st not in ("rejected", "failed"))
    assert accepted >= 1 and value(m, "tomd_submissions_total", facility="sim") == accepted
    assert value(m, "tomd_submission_rejections_total", facility="sim") == states.get("rejected", 0)
    assert value(m, "tomd_alert_to_submission_seconds_count", facility="sim") == accepted
    assert value(m, "tomd_facility_requests_total", facility="sim", operation="submit", code="201") == accepted
    assert value(m, "tomd_facility_request_seconds_count", facility="sim", operation="validate") >= accepted
    # Read from the database at scrape time: every accepted request is still open (PENDING at the sim).
    assert sum(value(m, "tomd_observation_requests_open", state=st) for st in
               ("intent", "submitting", "pending", "scheduled", "in_progress")) == accepted
    assert value(m, "tomd_observation_requests_open", state="intent") == 0  # 0, not absent
    assert m.registry.get_sample_value("tomd_observation_requests_open", {"state": "intent"}) == 0
    assert value(m, "tomd_dead_letters_unresolved") == 0


def test_a_database_that_fails_at_scrape_time_is_counted_and_leaves_the_series_out():
    from tomd.db import migrate

    m = Metrics(process=False)
    engine = migrate.connect(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/nothing?connect_timeout=2")
    m.watch_database(migrate.sessions(engine))
    body = m.exposition().decode()  # the scrape itself still succeeds
    assert "tomd_observation_requests_open{" not in body
    assert value(m, "tomd_database_errors_total", component="metrics") == 1
    engine.dispose()


# ------------------------------------------------------- database outage


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_database_outage_is_counted_per_component_and_logged_without_flooding(db, tmp_path):
    """The line between a running daemon (every component wired, every loop at 1 s) and
    PostgreSQL is cut for 10 s: each component counts its database errors in
    tomd_database_errors_total{component}, and the log holds a few lines per loop (the first
    failure with its traceback, repeats as one-line warnings), not a traceback a second."""
    if db.kind != "postgresql":
        pytest.skip("a network outage needs a database behind a network")
    from sqlalchemy.engine import make_url

    from tests.netfault import TcpProxy
    from tomd.config import load_config
    from tomd.daemon import run
    from tomd.facilities.sim import SimObservatory

    url = make_url(db.url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    for d in ("rules", "hooks"):
        (tmp_path / d).mkdir()
    handler = _Records()
    root = logging.getLogger()
    old_level, aps_level = root.level, logging.getLogger("apscheduler").level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # as tomd.logs.configure does
    seen: dict[str, float] = {}
    window: list[int] = []
    try:
        with SimObservatory(token=None) as sim:
            write_daemon_config(tmp_path, proxied, hooks='poll = "1s"', extra=f"""
[data]
interval = "1s"
[notify]
interval = "1s"
[notify.channels.journal]
kind = "log"
[facilities.sim]
kind = "sim"
url = "{sim.url}"
poll_interval = "1s"
""")
            config = load_config(tmp_path / "tomd.toml")

            def outage(daemon) -> None:
                def errors(c: str) -> float:
                    return value(daemon.metrics, "tomd_database_errors_total", component=c)

                def go() -> None:
                    try:
                        # Every loop has (most likely) run once against a working database; a loop
                        # that has not meets the outage first: one traceback all the same.
                        time.sleep(3)
                        window.append(len(handler.records))
                        proxy.cut()
                        # 10 s, and on a loaded machine until every loop has met the outage.
                        time.sleep(10)
                        deadline = time.monotonic() + 120
                        while not all(errors(c) > 0 for c in ("status", "retriever", "notifier", "hooks")):
                            if time.monotonic() > deadline:
                                break  # the assertion below names the loop that never met it
                            time.sleep(0.1)
                        window.append(len(handler.records))
                        proxy.restore()
                        deadline = time.monotonic() + 120  # until a loop says the database works again
                        while not any("works again" in r.getMessage() for r in handler.records[window[1]:]):
                            if time.monotonic() > deadline:
                                break
                            time.sleep(0.1)
                        for c in ("scheduler", "status", "retriever", "notifier", "hooks"):
                            seen[c] = errors(c)
                    finally:
                        daemon.stop.set()

                threading.Thread(target=go, daemon=True).start()

            assert run(config, on_started=outage) == 0
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.getLogger("apscheduler").setLevel(aps_level)
        proxy.close()
    # The scheduler's own jobs (the cadence sweep) count only if one ran during the outage.
    assert all(seen[c] > 0 for c in ("status", "retriever", "notifier", "hooks")), seen
    during = handler.records[window[0]:window[1]]
    lines = [f"{r.levelname} {r.name}: {r.getMessage()}"[:160] for r in during]
    tracebacks = [line for r, line in zip(during, lines) if r.exc_info]
    # Six loops meet the database (status poll, open-request read, retriever, notifier, the
    # hooks' outbox read and their runs; the submitter's sweep too): one traceback each at
    # most, and a repeat line at most every 30 s, so a 10 s outage stays far below a line a second.
    assert len(tracebacks) <= 8, "\n".join(tracebacks)
    assert len(during) <= 30, "\n".join(lines)
    assert not any("maximum number of running instances" in line for line in lines)
    after = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in handler.records[window[1]:]]
    assert any("works again" in line for line in after), "\n".join(after)


def test_gemini_and_swift_calls_are_counted_by_operation_and_code():
    """The Gemini and Swift clients against their loopback servers (the real API shapes):
    every HTTP call, retries included, reaches tomd_facility_requests_total once instrumented."""
    from tests import test_facilities_gemini as g
    from tests import test_facilities_swift as sw
    from tomd.facilities.base import Intent

    m = Metrics(process=False)
    daemon = SimpleNamespace(runners=[], facilities=SimpleNamespace(clients={}))
    with g.GeminiODB() as odb, sw.SwiftTOOServer() as api:
        gem, swift = g.client(odb), sw.client(api)
        daemon.facilities.clients.update(gemini=gem, swift=swift)
        instrument(daemon, m)
        odb.faults = ["429"]
        gem.submit(gem.build_request("gmos-r", g.target(), Intent(name="tomd-g1")))
        assert value(m, "tomd_facility_requests_total", facility="gemini", operation="submit", code="429") == 1
        assert value(m, "tomd_facility_requests_total", facility="gemini", operation="submit", code="200") == 1
        assert value(m, "tomd_facility_request_seconds_count", facility="gemini", operation="submit") == 2
        assert swift.validate(swift.build_request("xrt", sw.target(), Intent(name="v1"))).ok
        swift.submit(swift.build_request("xrt", sw.target(), Intent(name="tomd-s1")))
        api.faults = ["500"]
        assert swift.find_by_name("nobody") == []
        calls = {(op, code): value(m, "tomd_facility_requests_total", facility="swift", operation=op, code=code)
                 for op in ("validate", "submit", "job_status", "list") for code in ("200", "500")}
        assert calls[("validate", "200")] >= 1 and calls[("submit", "200")] == 1
        assert calls[("job_status", "200")] >= 1
        assert calls[("list", "500")] == 1 and calls[("list", "200")] >= 1
        total = sum(value(m, "tomd_facility_request_seconds_count", facility="swift", operation=op)
                    for op in ("validate", "submit", "job_status", "list"))
        assert total == len(api.calls)  # every call the server saw (the one it failed with 500 too)
        gem.close()
        swift.close()
