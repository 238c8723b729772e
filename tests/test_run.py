"""`tomd run` end to end: the real broker, the real daemon process, both databases.

Invariant 1 tested by breaking it: the daemon is killed with SIGKILL in the
middle of a stream and restarted; every alert ends up stored exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from tests.alert_samples import ztf_files
from tests.configs import write_daemon_config
from tomd.alerts.broker import produce
from tomd.db.models import AlertRow, DeadLetter, OutboxEvent, Photometry

REPO = Path(__file__).resolve().parents[1]

# How long a wait for the daemon may last before the test fails. Generous on purpose: CI runs the
# suite on two loaded cores; every wait ends as soon as its condition holds.
PATIENCE = 90.0


def write_config(tmp_path, db, bootstrap, topic, *, group="tomd-test", batch_size=50) -> Path:
    """A daemon following ``topic`` on the test's broker."""
    return write_daemon_config(tmp_path, db.url, extra=f"""
[[streams]]
name = "ztf"
bootstrap = "{bootstrap}"
topics = ["{topic}"]
format = "ztf-avro"
group = "{group}"
batch_size = {batch_size}
batch_timeout = "200ms"

[streams.kafka]
"session.timeout.ms" = 2000
"heartbeat.interval.ms" = 500
""")


def tomd(config: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "TOMD_CONFIG": str(config)}
    return subprocess.Popen([sys.executable, "-m", "tomd.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_until_idle(config: Path, idle: float = 4.0, timeout: float = 120.0) -> str:
    p = tomd(config, "run", "--exit-when-idle", str(idle))
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def count(db, model) -> int:
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


@pytest.fixture
def ztf_values(shared_data) -> list[bytes]:
    return [p.read_bytes() for p in ztf_files()]


def test_stream_ingest_dead_letters_and_a_second_pass_that_adds_nothing(db, kafka_broker, make_topic, ztf_values,
                                                                          tmp_path):
    topic = make_topic(partitions=1)
    good = ztf_values[:10]
    corrupt = b"\x00\x01 this is not an alert"
    produce(kafka_broker.bootstrap, topic, good[:5] + [corrupt] + good[5:])
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic)
    run_until_idle(cfg)
    assert count(db, AlertRow) == 10
    with db.sessions() as s:
        (dl,) = s.scalars(select(DeadLetter)).all()
    assert (dl.topic, dl.partition, dl.offset) == (topic, 0, 5) and dl.raw == corrupt
    photometry = count(db, Photometry)

    # Same group again: offsets were committed, nothing is re-read.
    out = run_until_idle(cfg, idle=3.0)
    assert "messages=0" in out
    # A new group reads the whole topic again: the replay changes nothing.
    cfg2 = write_config(tmp_path, db, kafka_broker.bootstrap, topic, group="another-group")
    out = run_until_idle(cfg2)
    assert "messages=11" in out and "duplicates=10" in out
    # The corrupt message read again is the same letter (its coordinates), not a second one.
    assert count(db, AlertRow) == 10 and count(db, Photometry) == photometry and count(db, DeadLetter) == 1
    with db.sessions() as s:
        kinds = s.scalars(select(OutboxEvent.kind).where(OutboxEvent.kind == "alert.dead_lettered")).all()
    assert len(kinds) == 1


def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(db, kafka_broker, make_topic, ztf_values, tmp_path):
    # (ztf_values needs ../shared/data: the test skips without it, as ztf_copies does too)
    import sys as _sys

    _sys.path.insert(0, str(REPO / "bench"))
    from ztf_copies import ztf_copies

    n = 800
    copies = list(ztf_copies(n, seed=5))
    topic = make_topic(partitions=3)
    # Half the stream first: the daemon is killed inside it (the other half arrives after the
    # kill, so the stream is never finished before the kill however fast the ingest is).
    produce(kafka_broker.bootstrap, topic, copies[: n // 2])
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic, batch_size=25)
    p = tomd(cfg, "run")
    deadline = time.monotonic() + 120
    while count(db, AlertRow) < 100:  # well into the stream
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "the daemon ingested too little in 120 s"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    at_kill = count(db, AlertRow)
    assert 100 <= at_kill <= n // 2
    produce(kafka_broker.bootstrap, topic, copies[n // 2:])
    run_until_idle(cfg, idle=5.0)
    assert count(db, AlertRow) == n
    with db.sessions() as s:
        keys = s.scalars(select(AlertRow.key)).all()
    assert len(set(keys)) == n


def test_sigterm_finishes_the_batch_and_commits(db, kafka_broker, make_topic, ztf_values, tmp_path):
    topic = make_topic(partitions=1)
    produce(kafka_broker.bootstrap, topic, ztf_values[:20])
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic, batch_size=5)
    p = tomd(cfg, "run")
    deadline = time.monotonic() + PATIENCE
    while count(db, AlertRow) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=PATIENCE)
    assert p.returncode == 0, out
    assert "SIGTERM" in out
    # Everything was committed: the same group sees nothing new.
    assert "messages=0" in run_until_idle(cfg, idle=3.0)


def test_invalid_config_refuses_to_start(tmp_path):
    cfg = tmp_path / "tomd.toml"
    cfg.write_text('[[streams]]\nname = "x"\ntopics = []\nformat = "nope"\n')
    p = tomd(cfg, "run")
    out, _ = p.communicate(timeout=PATIENCE)
    assert p.returncode == 1 and "Traceback" not in out
    assert "streams[0].format" in out and "streams[0].topics" in out


def test_hop_messages_with_kafka_headers(db, kafka_broker, make_topic, shared_data, tmp_path):
    """hop-client ≥ 0.8: content as the value, _id/_test/_format in headers."""
    import uuid

    topic = make_topic(partitions=1)
    voevent = (shared_data / "gcn/voevent/skyportal/SWIFT_1125809-104.xml").read_bytes()
    real_id, test_id = uuid.uuid4(), uuid.uuid4()
    produce(kafka_broker.bootstrap, topic, [voevent],
            headers=[("_id", real_id.bytes), ("_format", b"voevent"), ("_test", b"false")])
    produce(kafka_broker.bootstrap, topic, [voevent],
            headers=[("_id", test_id.bytes), ("_format", b"voevent"), ("_test", b"true")])
    produce(kafka_broker.bootstrap, topic, [voevent],  # the same message again: deduplicated by _id
            headers=[("_id", real_id.bytes), ("_format", b"voevent"), ("_test", b"false")])
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic)
    cfg.write_text(cfg.read_text().replace('format = "ztf-avro"', 'format = "hop"'))
    out = run_until_idle(cfg)
    assert "alerts=1" in out and "skipped_test=1" in out and "duplicates=1" in out, out
    with db.sessions() as s:
        (row,) = s.scalars(select(AlertRow)).all()
    assert row.source == "hop" and row.key == real_id.hex  # uuid.hex is a property


def test_database_outage_pauses_and_resumes_without_loss(db, kafka_broker, make_topic, tmp_path, shared_data):
    """The line to PostgreSQL is cut mid-stream for a few seconds, then restored."""
    if db.kind != "postgresql":
        pytest.skip("a network outage needs a database behind a network")
    from sqlalchemy.engine import make_url

    from tests.netfault import TcpProxy

    sys.path.insert(0, str(REPO / "bench"))
    from ztf_copies import ztf_copies

    url = make_url(db.url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        n = 400
        copies = list(ztf_copies(n, seed=9))
        topic = make_topic(partitions=2)
        # Half before the outage, half during it: the daemon has alerts to write while the line is
        # down however fast it ingested the first half.
        produce(kafka_broker.bootstrap, topic, copies[: n // 2])

        proxied = SimpleNamespace(kind=db.kind, url=url.set(port=proxy.port).render_as_string(hide_password=False))
        cfg = write_config(tmp_path, proxied, kafka_broker.bootstrap, topic, batch_size=20)
        p = tomd(cfg, "run", "--exit-when-idle", "6")
        deadline = time.monotonic() + 120
        while count(db, AlertRow) < 60:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proxy.cut()
        produce(kafka_broker.bootstrap, topic, copies[n // 2:])
        time.sleep(4)
        stalled = count(db, AlertRow)
        time.sleep(1)
        assert count(db, AlertRow) == stalled  # nothing is written while the line is down
        proxy.restore()
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
        assert "database" in out  # the outage was seen and reported
        assert count(db, AlertRow) == n
        with db.sessions() as s:
            assert len(set(s.scalars(select(AlertRow.key)))) == n
    finally:
        proxy.close()


def test_file_stream_reads_its_files_once(db, shared_data, tmp_path):
    cfg = write_daemon_config(tmp_path, db.url, extra=f"""
[[streams]]
name = "archive"
kind = "file"
topics = ["{shared_data / 'ztf/pittgoogle'}/*.avro", "{shared_data / 'ztf/ztf-avro-alert'}/*.avro"]
format = "ztf-avro"
""")
    expected = len(list((shared_data / "ztf/pittgoogle").glob("*.avro"))) + len(
        list((shared_data / "ztf/ztf-avro-alert").glob("*.avro")))
    out = run_until_idle(cfg, idle=2.0)
    assert count(db, AlertRow) == expected, out
    out = run_until_idle(cfg, idle=2.0)  # a second start reads them again: nothing changes
    assert f"duplicates={expected}" in out and count(db, AlertRow) == expected


def test_metrics_and_health_are_served_while_running(db, kafka_broker, make_topic, ztf_values, tmp_path):
    import re
    import urllib.request

    topic = make_topic(partitions=1)
    produce(kafka_broker.bootstrap, topic, ztf_values[:5])
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic)  # metrics on 127.0.0.1:0
    p = tomd(cfg, "run")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()

    def wait_until(what: str, cond):
        deadline = time.monotonic() + PATIENCE
        while not (value := cond()):
            assert p.poll() is None, f"tomd run exited while waiting for {what}:\n" + "".join(lines)
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "".join(lines)
            time.sleep(0.05)
        return value

    def ingested() -> float | None:
        body = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        m = re.search(r'^tomd_alerts_ingested_total\{[^}]*stream="ztf"[^}]*\} (\S+)$', body, re.M)
        return float(m.group(1)) if m else None

    try:
        # The port the daemon bound itself (a port picked here and bound there could be taken between).
        serving = wait_until("the metrics address", lambda: next(
            (ln for ln in list(lines) if "serving /metrics, /healthz and /readyz on http://127.0.0.1:" in ln), None))
        base = re.search(r"http://127\.0\.0\.1:\d+", serving).group(0)
        port = int(base.rsplit(":", 1)[1])
        wait_until("5 stored alerts", lambda: count(db, AlertRow) >= 5)
        assert urllib.request.urlopen(base + "/healthz", timeout=30).status == 200
        # The counter moves right after the ingest transaction commits, so it may trail the rows a moment.
        wait_until("the ingested counter", lambda: ingested() is not None and ingested() >= 5)
        assert ingested() == 5.0

        def ready() -> bool:  # ready once the consumer holds its partition
            try:
                return urllib.request.urlopen(base + "/readyz", timeout=30).status == 200
            except OSError:
                return False

        wait_until("/readyz", ready)
        # A second daemon on the same port refuses to start, with the reason.
        second = tmp_path / "second.toml"
        second.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
        assert f'listen = "127.0.0.1:{port}"' in second.read_text()
        q = tomd(second, "run")
        out, _ = q.communicate(timeout=PATIENCE)
        assert q.returncode == 1 and f"metrics.listen 127.0.0.1:{port}" in out and "Traceback" not in out
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=PATIENCE)
        reader.join(timeout=10)


# ------------------------------------------------------------- components


class Recorder:
    """A run(stop) component: counts wakes and reloads, records start and stop in a shared log."""

    def __init__(self, name, log, *, fail=False):
        self.name, self.log, self.fail = name, log, fail
        self.wakes = self.reloads = 0
        self.woken = threading.Event()

    def run(self, stop):
        self.log.append(f"run {self.name}")
        if self.fail:
            raise RuntimeError("broken on purpose")
        while not stop.is_set():
            self.woken.wait(5.0)
            self.woken.clear()
        self.log.append(f"finished {self.name}")  # in-flight work would be committed here

    def wake(self):
        self.wakes += 1
        self.woken.set()


class Reloadable(Recorder):
    """Like a hook runner: reload() re-reads its files; the second time one is bad."""

    def reload(self):
        self.reloads += 1
        if self.reloads > 1:
            raise ValueError("hooks/bad.toml:3: unknown key 'comand'")


class Scheduled:
    """A start()/shutdown() component, like an APScheduler scheduler."""

    def __init__(self, log):
        self.name, self.log, self.running = "jobs", log, False

    def start(self):
        self.log.append("start jobs")
        self.running = True

    def shutdown(self):
        self.log.append("shutdown jobs")
        self.running = False


def _get(url: str) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_components_start_in_order_wake_reload_report_readiness_and_stop_in_reverse(db, shared_data, tmp_path):
    from dataclasses import replace

    from tomd.config import Config, Stream
    from tomd.daemon import Daemon
    from tomd.health import daemon_checks, start_http
    from tomd.metrics import instrument

    (tmp_path / "rules").mkdir()
    src = sorted((shared_data / "ztf/ztf-avro-alert").glob("*.avro"))[0]
    cfg = Config(streams=(Stream(name="archive", kind="file", topics=(str(src),), format="ztf-avro"),))
    cfg = replace(cfg, rules=replace(cfg.rules, paths=(str(tmp_path / "rules"),)))
    daemon = Daemon(cfg, engine=db.engine)
    daemon.metrics = instrument(daemon)
    log: list[str] = []
    retriever, hooks = Recorder("retriever", log), Reloadable("hooks", log)
    jobs = Scheduled(log)
    daemon.add(retriever)
    daemon.add(jobs)
    daemon.add_check("scheduler", lambda: jobs.running or "scheduler not running")
    daemon.add(hooks, wake_on_ingest=True)
    with pytest.raises(ValueError, match="already added"):
        daemon.add(Recorder("hooks", log))
    with pytest.raises(TypeError, match="needs run"):
        daemon.add(SimpleNamespace(name="nothing"))
    http = start_http("127.0.0.1:0", daemon.metrics.registry, checks=daemon_checks(daemon))
    try:
        code, doc = _get(http.url + "/readyz")  # before start: no threads, the scheduler is down
        assert code == 503 and doc["checks"]["scheduler"] == {"ok": False, "error": "scheduler not running"}
        assert doc["checks"]["components"]["ok"] is False and doc["checks"]["database"] == {"ok": True}
        daemon.start()
        deadline = time.monotonic() + PATIENCE
        while count(db, AlertRow) < 1 or hooks.wakes < 1:  # woken after the ingest commit
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert retriever.wakes == 0  # not added with wake_on_ingest
        _, doc = _get(http.url + "/readyz")
        assert {"database", "components", "component:jobs", "scheduler"} <= doc["checks"].keys()
        assert all(c["ok"] for k, c in doc["checks"].items() if k != "streams"), doc  # the file stream ended
        # SIGHUP's work: a new rule file is read now (no alert needs to arrive), components reload.
        (tmp_path / "rules" / "new.toml").write_text('name = "new"\nwhen = "alert.mag < 30"\nadd_tags = ["seen"]\n')
        assert daemon.reload() == [] and hooks.reloads == 1 and len(daemon.rules.ruleset.current()) == 1
        assert daemon.metrics.registry.get_sample_value("tomd_rules_loaded") == 1
        problems = daemon.reload()  # the hooks' second reload fails: reported, the daemon keeps running
        assert problems == ["hooks: hooks/bad.toml:3: unknown key 'comand'"] and not daemon.stop.is_set()
    finally:
        daemon.stop.set()
        assert daemon.wait() == 0
        http.stop()
    assert sorted(log[:2]) == ["run retriever", "start jobs"] or log[0] == "start jobs"
    assert log[-3:] == ["finished hooks", "shutdown jobs", "finished retriever"]  # the reverse of starting


def test_a_critical_component_error_stops_the_daemon_with_exit_code_1(db):
    from tomd.config import Config
    from tomd.daemon import Daemon

    log: list[str] = []
    daemon = Daemon(Config(), engine=db.engine)
    daemon.add(Recorder("ok", log))
    daemon.add(Recorder("optional", log, fail=True), critical=False)
    daemon.start()
    deadline = time.monotonic() + PATIENCE
    while daemon.components[1].error is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not daemon.stop.is_set()  # a non-critical failure leaves the rest running
    broken = Daemon(Config(), engine=db.engine)
    broken.add(Recorder("broken", log, fail=True))
    broken.start()
    assert broken.wait() == 1 and isinstance(broken.components[0].error, RuntimeError)
    daemon.stop.set()
    assert daemon.wait() == 0 and "finished ok" in log


def test_sighup_reads_the_rule_files_now_and_sigterm_still_stops(db, tmp_path):
    """No alert arrives (so nothing would look at the rule files): SIGHUP alone loads the new rule."""
    rules = tmp_path / "rules"
    rules.mkdir()
    cfg = write_daemon_config(tmp_path, db.url, extra=f"""
[[streams]]
name = "empty"
kind = "file"
topics = ["{tmp_path}/nothing/*.avro"]
format = "ztf-avro"
""")
    p = tomd(cfg, "run")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()

    def wait_for(text: str, times: int = 1, timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in list(lines)) < times:
            assert p.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)

    try:
        wait_for("tomd running")
        (rules / "bright.toml").write_text('name = "bright"\nwhen = "alert.mag < 15"\nadd_tags = ["bright"]\n')
        p.send_signal(signal.SIGHUP)
        wait_for("reloaded: 1 rule(s) in force")
        (rules / "broken.toml").write_text('name = "broken"\nwhen = "alert.mag <"\nadd_tags = ["x"]\n')
        p.send_signal(signal.SIGHUP)
        # The second reload has read the files: the bad one is named in the log (by this reload, with
        # "1 problem(s)", or by the daemon's 2-second look if that came between the write and the
        # signal, after which the reload finds it unchanged); the daemon keeps running.
        wait_for("reloaded: 1 rule(s) in force", times=2)
        rejected = [line for line in lines if "rule file rejected" in line and "broken.toml:2" in line]
        assert p.poll() is None and rejected, "".join(lines)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=PATIENCE)
        reader.join(timeout=10)
    assert p.returncode == 0, "".join(lines)


class SlowWork(Recorder):
    """Each wake starts one piece of work that takes a while and ends with a commit."""

    def run(self, stop):
        while not stop.is_set():
            if self.woken.wait(0.1):
                self.woken.clear()
                self.log.append("begin")
                time.sleep(0.5)  # in flight when SIGTERM arrives
                self.log.append("commit")
        self.log.append(f"finished {self.name}")


def test_signals_reach_components_added_through_run(db, tmp_path):
    """`run(config, components=...)`, as `tomd run` does with add_components: SIGHUP reloads the
    component, SIGTERM lets its work in flight finish and commit before the daemon exits 0."""
    from dataclasses import replace

    from tomd.config import Config, Database, Stream
    from tomd.daemon import run

    cfg = Config(database=Database(url=db.url),
                 streams=(Stream(name="empty", kind="file", topics=(str(tmp_path / "none/*.avro"),),
                                 format="ztf-avro"),))
    cfg = replace(cfg, rules=replace(cfg.rules, paths=(str(tmp_path / "rules"),)),
                  metrics=replace(cfg.metrics, listen="127.0.0.1:0"))
    log: list[str] = []
    work = Reloadable("work", log)
    work.run = SlowWork.run.__get__(work)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def drive(daemon):
        def go():
            os.kill(os.getpid(), signal.SIGHUP)
            deadline = time.monotonic() + PATIENCE
            while work.reloads < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            work.wake()
            while "begin" not in log:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=go, daemon=True).start()

    try:
        code = run(cfg, on_started=drive, components=lambda d: d.add(work))
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert code == 0 and work.reloads == 1
    assert log[-3:] == ["begin", "commit", "finished work"], log


# ------------------------------------------------- SIGHUP: rules and hooks

# Fires on every ZTF alert: ZTF's magpsf is in every packet (alert.mag is None for a negative subtraction).
RULE_V = 'name = "{name}"\nwhen = "alert.fields.magpsf < 30"\nadd_tags = ["{name}"]\n'
HOOK_V = '''from tomd.hooks import on


@on("rule.fired")
def journal(ctx):
    with open({path!r}, "a") as fh:
        fh.write(f"{version} {{ctx.event.rule}} {{ctx.event_id}}\\n")
'''
# The same file with a syntax error: the call opened on line 4 is never closed.
HOOK_BROKEN = '''from tomd.hooks import on


@on("rule.fired"
def journal(ctx):
    pass
'''


def test_sighup_reloads_rules_and_hooks_and_a_broken_hook_file_keeps_the_good_hooks_running(
        db, kafka_broker, make_topic, tmp_path):
    """A real `tomd run` following a topic. A rule file and a hook file change; after SIGHUP the
    alerts that follow fire the new rule and run the new hook, without a restart. Then the hook
    file breaks: the problem is logged with FILE:LINE, the daemon runs on, and the hooks that
    still load keep running; once fixed, the broken file's hook catches up on what it missed."""
    from tests.test_scaleout import ztf_copies

    topic = make_topic()
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic, batch_size=10)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    rules = tmp_path / "rules"
    rules.mkdir()
    journal, other = tmp_path / "journal.txt", tmp_path / "other.txt"
    (rules / "follow.toml").write_text(RULE_V.format(name="first"))
    (hooks / "journal.py").write_text(HOOK_V.format(path=str(journal), version="v1"))
    (hooks / "other.py").write_text(HOOK_V.format(path=str(other), version="other"))
    alerts = iter(ztf_copies(6, seed=31))  # new ids and positions: each alert a new target, each fires

    p = tomd(cfg, "run")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()

    def seen(text: str) -> int:
        return sum(text in line for line in lines)

    def wait_for(what: str, cond, timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert p.poll() is None, f"tomd run exited while waiting for {what}:\n" + "".join(lines)
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "".join(lines)
            time.sleep(0.05)

    def journal_lines(path: Path) -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    def send_two() -> None:
        produce(kafka_broker.bootstrap, topic, [next(alerts), next(alerts)])

    try:
        wait_for("the daemon to start", lambda: seen("tomd running") and seen("hooks: 2 loaded"))
        # The bound metrics address is logged, not the configured port 0.
        bound = [line for line in lines if "serving /metrics, /healthz and /readyz on http://127.0.0.1:" in line]
        assert bound and ":0\n" not in bound[0] and ":0 " not in bound[0], bound

        send_two()
        wait_for("v1 hook runs of rule first", lambda: len(journal_lines(journal)) == 2)
        assert all(ln.startswith("v1 first ") for ln in journal_lines(journal))

        # 1. New rule and new hook, one SIGHUP, no restart.
        (rules / "follow.toml").write_text(RULE_V.format(name="second"))
        (hooks / "journal.py").write_text(HOOK_V.format(path=str(journal), version="v2"))
        p.send_signal(signal.SIGHUP)
        wait_for("rules and hooks reloaded", lambda: seen("reloaded: 1 rule(s) in force") == 1
                 and seen("hooks: 2 loaded") == 2)
        send_two()
        wait_for("v2 hook runs of rule second", lambda: len(journal_lines(journal)) == 4)
        assert [ln.split()[:2] for ln in journal_lines(journal)] == [["v1", "first"]] * 2 + [["v2", "second"]] * 2
        wait_for("the other hook", lambda: len(journal_lines(other)) == 4)

        # 2. The hook file breaks: logged with FILE:LINE, the daemon runs on, and the hooks that
        #    loaded (other.py) keep running. The broken file's own hook pauses: no interpreter can
        #    import that file any more.
        (hooks / "journal.py").write_text(HOOK_BROKEN)
        p.send_signal(signal.SIGHUP)
        wait_for("the broken hook file reported", lambda: seen(f"{hooks / 'journal.py'}:4: SyntaxError") == 1
                 and seen("hooks: 1 loaded (other.journal)") == 1)
        send_two()
        wait_for("the other hook, after the broken reload", lambda: len(journal_lines(other)) == 6)
        assert p.poll() is None and len(journal_lines(journal)) == 4

        # 3. Fixed: the paused hook catches up on the events it missed, each once.
        (hooks / "journal.py").write_text(HOOK_V.format(path=str(journal), version="v3"))
        p.send_signal(signal.SIGHUP)
        wait_for("the fixed hook catching up", lambda: len(journal_lines(journal)) == 6)
        assert [ln.split()[:2] for ln in journal_lines(journal)][4:] == [["v3", "second"]] * 2
        # Each (hook, event) ran once, and both hooks saw the same six events.
        ids = {}
        for path in (journal, other):
            ids[path.name] = [ln.split()[2] for ln in journal_lines(path)]
            assert len(ids[path.name]) == len(set(ids[path.name])) == 6
        assert set(ids["journal.txt"]) == set(ids["other.txt"])
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=PATIENCE)
        reader.join(timeout=10)
    assert p.returncode == 0, "".join(lines)
    with db.sessions() as s:
        from tomd.db.models import Decision

        fired = dict(s.execute(select(Decision.rule, func.count()).where(Decision.outcome == "fired")
                               .group_by(Decision.rule)).all())
    assert fired == {"first": 2, "second": 4}, fired


# ------------------------------------------------------- the reader goes away


def test_output_to_a_closed_pipe_is_quiet(db, tmp_path):
    """`tomd data list --json | head -1`: the reader left; no traceback, exit 141 (128 + SIGPIPE)."""
    cfg = tmp_path / "tomd.toml"
    cfg.write_text(f'[database]\nurl = "{db.url}"\n')
    for args in (["data", "list", "--json"], ["config", "check"]):
        env = {**os.environ, "TOMD_CONFIG": str(cfg)}
        p = subprocess.Popen([sys.executable, "-m", "tomd.cli", *args], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # before it writes anything: its first write finds no reader
        err = p.stderr.read().decode()
        p.stderr.close()
        assert p.wait(PATIENCE) == 141 and "Traceback" not in err and "BrokenPipe" not in err, (args, err)


def test_exit_when_idle_waits_for_the_group_join_and_for_a_batch_in_hand(db, kafka_broker, make_topic, ztf_values,
                                                                          tmp_path):
    """--exit-when-idle counts no idle time before a stream's first partition, nor during a batch:
    with a limit far shorter than a group join (Tansu answers a join after about half the session
    timeout), the run used to stop before it had read anything."""
    topic = make_topic(partitions=1)
    produce(kafka_broker.bootstrap, topic, ztf_values[:5])
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic)
    out = run_until_idle(cfg, idle=0.3)
    assert count(db, AlertRow) == 5, out
    assert "never got a partition" not in out


def test_exit_when_idle_still_ends_when_the_broker_is_never_reached(db, tmp_path, monkeypatch, caplog):
    """A catch-up run against a broker that never answers ends after the join's grace, and says why."""
    import logging

    from tomd import daemon
    from tomd.config import load_config

    monkeypatch.setattr(daemon, "JOIN_GRACE_S", 2.0)  # 60 s in the daemon; the test need not wait that long
    cfg = write_config(tmp_path, db, "127.0.0.1:1", "nowhere")
    caplog.set_level(logging.INFO, logger="tomd")
    t0 = time.monotonic()
    code = daemon.run(load_config(cfg), idle_exit_s=0.3)
    waited = time.monotonic() - t0
    assert code == 0
    assert waited >= 2.0  # the join had its grace before idle time counted
    (warning,) = [r.getMessage() for r in caplog.records if "never got a partition" in r.getMessage()]
    assert warning.startswith("stream(s) ztf never got a partition in ")
    assert any(r.getMessage() == "no new messages for 0.3 s: stopping" for r in caplog.records)
