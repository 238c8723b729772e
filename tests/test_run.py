"""`tomd run` end to end: the real broker, the real daemon process, both databases.

Invariant 1 tested by breaking it: the daemon is killed with SIGKILL in the
middle of a stream and restarted; every alert ends up stored exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from tests.alert_samples import ztf_files
from tomd.alerts.broker import produce
from tomd.db.models import AlertRow, DeadLetter, Photometry

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path, db, bootstrap, topic, *, group="tomd-test", batch_size=50) -> Path:
    path = tmp_path / "tomd.toml"
    path.write_text(f"""
[database]
url = "{db.url}"

[metrics]
listen = "127.0.0.1:0"

[storage]
url = "file://{tmp_path}/data"

[rules]
paths = ["{tmp_path}/rules"]

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
    return path


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
    assert count(db, AlertRow) == 10 and count(db, Photometry) == photometry and count(db, DeadLetter) == 2


def test_sigkill_mid_stream_loses_nothing_and_doubles_nothing(db, kafka_broker, make_topic, ztf_values, tmp_path):
    # (ztf_values needs ../shared/data: the test skips without it, as ztf_copies does too)
    import sys as _sys

    _sys.path.insert(0, str(REPO / "bench"))
    from ztf_copies import ztf_copies

    n = 600
    topic = make_topic(partitions=3)
    produce(kafka_broker.bootstrap, topic, ztf_copies(n, seed=5))
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic, batch_size=25)
    p = tomd(cfg, "run")
    deadline = time.monotonic() + 120
    while count(db, AlertRow) < 100:  # well into the stream, but not at its end
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "the daemon ingested too little in 120 s"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    at_kill = count(db, AlertRow)
    assert at_kill < n
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
    deadline = time.monotonic() + 60
    while count(db, AlertRow) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "SIGTERM" in out
    # Everything was committed: the same group sees nothing new.
    assert "messages=0" in run_until_idle(cfg, idle=3.0)


def test_invalid_config_refuses_to_start(tmp_path):
    cfg = tmp_path / "tomd.toml"
    cfg.write_text('[[streams]]\nname = "x"\ntopics = []\nformat = "nope"\n')
    p = tomd(cfg, "run")
    out, _ = p.communicate(timeout=60)
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
        topic = make_topic(partitions=2)
        produce(kafka_broker.bootstrap, topic, ztf_copies(n, seed=9))

        proxied = SimpleNamespace(kind=db.kind, url=url.set(port=proxy.port).render_as_string(hide_password=False))
        cfg = write_config(tmp_path, proxied, kafka_broker.bootstrap, topic, batch_size=20)
        p = tomd(cfg, "run", "--exit-when-idle", "6")
        deadline = time.monotonic() + 120
        while count(db, AlertRow) < 60:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proxy.cut()
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
    cfg = tmp_path / "tomd.toml"
    cfg.write_text(f"""
[database]
url = "{db.url}"

[metrics]
enabled = false

[storage]
url = "file://{tmp_path}/data"

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
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    topic = make_topic(partitions=1)
    produce(kafka_broker.bootstrap, topic, ztf_values[:5])
    cfg = write_config(tmp_path, db, kafka_broker.bootstrap, topic)
    cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    p = tomd(cfg, "run")
    try:
        deadline = time.monotonic() + 60
        while count(db, AlertRow) < 5:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        m = re.search(r'^tomd_alerts_ingested_total\{[^}]*stream="ztf"[^}]*\} (\S+)$', body, re.M)
        assert m and float(m.group(1)) == 5.0
        deadline = time.monotonic() + 30
        while True:  # ready once the consumer holds its partition
            try:
                if urllib.request.urlopen(base + "/readyz", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # A second daemon on the same port refuses to start, with the reason.
        q = tomd(cfg, "run")
        out, _ = q.communicate(timeout=60)
        assert q.returncode == 1 and f"metrics.listen 127.0.0.1:{port}" in out and "Traceback" not in out
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
