"""Scale-out: two real `tomd run` processes, one config, one PostgreSQL, one topic.

Two daemons join one consumer group on a four-partition topic of the local
Kafka-protocol broker (Tansu) and share one simulated observatory (started
here, in the test process, so it counts every request group by name). The
test shows, with the daemons' own /metrics and the database:

- each partition is held by one daemon at a time, and every alert is
  ingested exactly once (per-daemon ingest counts add up, with no
  duplicates; one row per partition and offset);
- no submission is duplicated (each request name reaches the observatory
  once), also when a daemon dies holding claims on intents;
- after a SIGKILL the other daemon takes over all partitions and ingests
  the rest.

Later stages (status polls, hook runs) add their own "nothing twice"
checks to ``side_effect_checks`` below; the test calls all of them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text, update

from tomd.alerts.broker import produce
from tomd.db.models import AlertRow, ObservationRequest, ObservationStatus
from tomd.facilities.sim import SimObservatory

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 4
OPEN = ("intent", "submitting")


def ztf_copies(n: int, seed: int) -> list[bytes]:
    """``n`` real ZTF packets with new ids and positions: one new target per alert."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from ztf_copies import ztf_copies as copies
    finally:
        sys.path.remove(str(REPO / "bench"))
    return copies(n, seed=seed)


def produce_spread(bootstrap: str, topic: str, values: list[bytes]) -> dict[int, int]:
    """Round-robin over the partitions; returns how many went to each."""
    counts = {}
    for p in range(PARTITIONS):
        counts[p] = produce(bootstrap, topic, values[p::PARTITIONS], partition=p)
    return counts


# ------------------------------------------------------------- the daemons


@dataclass
class Daemon:
    """One `tomd run` process; its output is read line by line in a thread."""

    name: str
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    url: str | None = None

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving /metrics, /healthz and /readyz on (http://\S+)", line)
            if m:
                self.url = m.group(1)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def story(self) -> str:
        """What matters when a wait times out: group membership lines, errors, consumer metrics."""
        keep = [ln for ln in self.lines if re.search(r"assigned|revoked|lost|ERROR|WARNING|Traceback|rror:", ln)
                and "rejected:" not in ln]
        try:
            m = [f"{n}{dict(ls)} {v}" for (n, ls), v in self.metrics().items() if n.startswith("tomd_consumer_")]
        except OSError as exc:
            m = [f"(no metrics: {exc})"]
        return "".join(keep[-60:]) + "\n".join(m)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} from /metrics."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            body = resp.read().decode()
        out = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=10) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False


def start_daemon(name: str, config: Path) -> Daemon:
    env = {**os.environ, "TOMD_CONFIG": str(config)}
    proc = subprocess.Popen([sys.executable, "-m", "tomd.cli", "run"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Daemon(name, proc)


def total(m: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def held_partitions(m: dict, topic: str) -> set[int]:
    """Partitions this daemon holds now: the per-partition series (lag as of the last fetch,
    committed offset) are exported only for the partitions assigned to it."""
    return {int(dict(ls)["partition"]) for (n, ls), _ in m.items()
            if n in ("tomd_consumer_lag_messages", "tomd_consumer_committed_offset")
            and dict(ls).get("topic") == topic}


def wait_until(what: str, cond: Callable[[], bool], daemons: list[Daemon], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for d in daemons:
            assert d.alive(), f"daemon {d.name} exited while waiting for {what}:\n{d.output}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(
            f"--- {d.name}\n{d.story()}" for d in daemons)
        time.sleep(0.1)


# ------------------------------------------------ "nothing twice" checks


def check_submissions(db, sim: SimObservatory) -> str:
    """Each request name reached the observatory at most once, and every request the database
    holds as submitted is one group there, under its own facility id."""
    names = sim.names()
    twice = {n: c for n, c in names.items() if c > 1}
    assert not twice, f"submitted more than once: {twice}"
    with db.sessions() as s:
        rows = s.execute(select(ObservationRequest.name, ObservationRequest.facility_id)
                         .where(ObservationRequest.facility_id.is_not(None))).all()
    assert {n for n, _ in rows} == set(names), "the database and the observatory disagree"
    by_id = {str(g["id"]): g["name"] for g in sim.groups()}
    assert all(by_id[fid] == n for n, fid in rows)
    return f"{len(rows)} requests, each submitted once"


def side_effect_checks() -> list[Callable]:
    """Every check that something done on the outside happened once, whichever daemon did it.

    Each is ``check(db, sim) -> str`` (a one-line summary) and raises AssertionError otherwise.
    Add the later stages here: status polls (one status row per facility state change of a
    request, whichever daemon polled it), hook runs (one run per hook and event), notifications
    (one per channel and dedupe key), data products (one per facility product id).
    """
    return [check_submissions]


# ------------------------------------------------------------------- test


def write_config(tmp_path: Path, db_url: str, bootstrap: str, topic: str, sim_url: str) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    # Fires on every alert of a new target: each alert means one observation request.
    (rules / "follow-everything.toml").write_text("""
name = "follow-everything"
sources = ["ztf"]
when = "alert.mag < 30"

[observe]
facility = "sim"
template = "1m-gri"
window = "24h"
""")
    path = tmp_path / "tomd.toml"
    path.write_text(f"""
[database]
url = "{db_url}"

[metrics]
listen = "127.0.0.1:0"

[storage]
url = "file://{tmp_path}/data"

[rules]
paths = ["{rules}"]

[hooks]
paths = ["{tmp_path}/hooks"]

[facilities.sim]
kind = "sim"
url = "{sim_url}"
rate_limit = 1000

[[streams]]
name = "ztf"
bootstrap = "{bootstrap}"
topics = ["{topic}"]
format = "ztf-avro"
group = "tomd-scaleout"
batch_size = 20
batch_timeout = "200ms"

[streams.kafka]
"session.timeout.ms" = 2000
"heartbeat.interval.ms" = 500
""")
    return path


def count(db, model) -> int:
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def open_intents(db) -> int:
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(ObservationRequest)
                        .where(ObservationRequest.state.in_(OPEN)))


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_two_daemons_share_partitions_ingest_once_submit_once_and_take_over(db, kafka_broker, make_topic,
                                                                           shared_data, tmp_path):
    first, second = 200, 600
    values = ztf_copies(first + second, seed=11)
    topic = make_topic(partitions=PARTITIONS)
    sim = SimObservatory(token=None, pending_s=3600).start()
    cfg = write_config(tmp_path, db.url, kafka_broker.bootstrap, topic, sim.url)
    a, b = start_daemon("a", cfg), start_daemon("b", cfg)
    daemons = [a, b]
    try:
        # 1. Both join the group; the partitions are split between them.
        wait_until("both daemons serving /metrics", lambda: a.url is not None and b.url is not None, daemons)
        wait_until("both daemons ready", lambda: a.ready() and b.ready(), daemons)
        produced = produce_spread(kafka_broker.bootstrap, topic, values[:first])
        wait_until(f"{first} alerts ingested", lambda: count(db, AlertRow) == first, daemons)
        wait_until("every intent submitted", lambda: open_intents(db) == 0, daemons)

        def split() -> bool:
            ma, mb = a.metrics(), b.metrics()
            return (total(ma, "tomd_alerts_ingested_total") + total(mb, "tomd_alerts_ingested_total") == first
                    and len(held_partitions(ma, topic) | held_partitions(mb, topic)) == PARTITIONS)

        wait_until("the metrics of both daemons to show the split", split, daemons, timeout=30)
        ma, mb = a.metrics(), b.metrics()
        pa, pb = held_partitions(ma, topic), held_partitions(mb, topic)
        assert pa and pb and not pa & pb and pa | pb == set(range(PARTITIONS)), (pa, pb)
        ingested = {d.name: total(m, "tomd_alerts_ingested_total", topic=topic) for d, m in ((a, ma), (b, mb))}
        assert ingested["a"] > 0 and ingested["b"] > 0 and sum(ingested.values()) == first, ingested
        # Nobody handled a message the other one had: no duplicates anywhere.
        assert total(ma, "tomd_alerts_duplicate_total") == total(mb, "tomd_alerts_duplicate_total") == 0
        assert total(ma, "tomd_consumer_assigned_partitions") + total(mb, "tomd_consumer_assigned_partitions") \
            == PARTITIONS
        submitted = {d.name: total(m, "tomd_submissions_total", facility="sim") for d, m in ((a, ma), (b, mb))}
        rejected = sum(total(m, "tomd_submission_rejections_total") for m in (ma, mb))
        assert sum(submitted.values()) == len(sim.names()) and sum(submitted.values()) + rejected == first
        print(f"\nphase 1: {first} alerts on {PARTITIONS} partitions; daemon a held {sorted(pa)} and ingested "
              f"{ingested['a']:.0f}, daemon b held {sorted(pb)} and ingested {ingested['b']:.0f}; submissions "
              f"a={submitted['a']:.0f} b={submitted['b']:.0f}, rejected {rejected:.0f}")

        # 2. A killed mid-stream: b takes over a's partitions and ingests the rest.
        produced2 = produce_spread(kafka_broker.bootstrap, topic, values[first:])
        wait_until("daemon a well into the second batch",
                   lambda: count(db, AlertRow) >= first + second // 4, daemons)
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(30)
        at_kill = count(db, AlertRow)
        daemons = [b]
        wait_until("every alert ingested by the survivor", lambda: count(db, AlertRow) == first + second, daemons)
        wait_until("b holding every partition",
                   lambda: held_partitions(b.metrics(), topic) == set(range(PARTITIONS)), daemons, timeout=60)
        mb = b.metrics()
        assert total(mb, "tomd_consumer_assigned_partitions") == PARTITIONS
        wait_until("b's lag down to 0", lambda: total(b.metrics(), "tomd_consumer_lag_messages") == 0, daemons)

        # Exactly once: one row per (partition, offset), as many per partition as were produced.
        with db.sessions() as s:
            per_partition = dict(s.execute(select(AlertRow.partition, func.count()).group_by(AlertRow.partition)).all())
            distinct = s.scalar(select(func.count()).select_from(
                select(AlertRow.partition, AlertRow.offset).distinct().subquery()))
        assert per_partition == {p: produced[p] + produced2[p] for p in range(PARTITIONS)}
        assert distinct == first + second

        # 3. Intents a claimed when it died stay claimed until their lease ends (10 minutes). End the
        #    leases now, as time would: b looks each "submitting" one up by name before any retry.
        with db.engine.begin() as c:
            stranded = c.execute(update(ObservationRequest)
                                 .where(ObservationRequest.state.in_(OPEN),
                                        ObservationRequest.claimed_by.like(f"%:{a.proc.pid}:%"))
                                 .values(claimed_until=func.now() - text("interval '1 second'"),
                                         next_attempt_at=None)).rowcount
        produce(kafka_broker.bootstrap, topic, ztf_copies(1, seed=12), partition=0)  # wakes b's submitter
        wait_until("every intent resolved", lambda: open_intents(db) == 0, daemons)
        summaries = [check(db, sim) for check in side_effect_checks()]
        with db.sessions() as s:  # those a left in "submitting" were found by name, never sent again
            recovered = s.scalar(select(func.count()).select_from(ObservationStatus)
                                 .where(ObservationStatus.message.like("found by name%")))
        print(f"phase 2: a killed at {at_kill - first} of {second} alerts; b took over all {PARTITIONS} "
              f"partitions and ingested the rest ({first + second} alerts in total, each once); "
              f"{stranded} intents a held when it died were finished by b ({recovered} of them found at the "
              f"observatory by name); " + "; ".join(summaries))
    finally:
        for d in (a, b):
            if d.alive():
                d.proc.send_signal(signal.SIGTERM)
        for d in (a, b):
            try:
                d.proc.wait(60)
            except subprocess.TimeoutExpired:
                d.proc.kill()
        sim.stop()
    assert b.proc.returncode == 0, b.output
