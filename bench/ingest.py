"""End-to-end ingest rate: real ZTF packets through a local Kafka broker into the database.

Produces ``--alerts`` copies of the real ZTF alerts in ../shared/data (cutouts included,
unique candid/objectId, spread positions) to a local Tansu broker, then:

1. the ceiling: consume the same messages with plain confluent-kafka and
   decode them as tomd's decoder does (each distinct writer schema parsed
   once, then the records read with cavro), nothing else;
2. ``tomd run``'s consumer and ingestor (the daemon's own wiring) into a
   fresh SQLite database and a fresh PostgreSQL database, with 0 and 25
   rules, cutouts stored as data products or not;
3. with ``--daemons N`` (N >= 2; PostgreSQL only: SQLite takes one writer,
   so those runs are skipped with a message), the scale-out the README
   describes: N real ``tomd run`` processes (one per core), one consumer
   group, one fresh PostgreSQL database, the same stream settings
   (bench/ingest_daemons.py writes their config, starts and watches them).
   One Python process uses one core; N processes can use N.

The topic has a partition per daemon at least (2 or more), filled round
robin. The ceiling is measured again right before each tomd run, so each
run's ratio compares two measurements taken under the same machine load
(the machine is shared). Prints JSON (rates, ratio, milliseconds per alert
spent in each stage, CPU per alert by process) and one human line per run.

    python bench/ingest.py [--alerts 5000] [--backends sqlite,postgresql] [--rules 0,25]
                           [--cutouts on,off] [--batch-size 500] [--repeat 1] [--parse-workers 0,1]
                           [--daemons 1,2]

``--daemons 1`` (the default) is tomd's daemon in this process, its stages
timed apart (``ms_per_alert``). With N >= 2 the daemons are other processes:
there is no per-stage breakdown (``ms_per_alert`` is empty), only the rate,
each daemon's share (``per_daemon``) and the CPU per alert of the daemons
(with their children: "tomd"), PostgreSQL and the broker. Every run record
says ``daemons``. A daemon that exits, or does not come up within two
minutes, ends the benchmark with its output.

How the N daemons' clock is started: the messages are in the topic before
the daemons start (as for the in-process run), and the daemons' group is
new, so they read from the earliest offset. The clock starts when the first
daemon has consumed its first message (its /metrics counter) and stops when
the daemons' counters say all messages were handled (committed); alerts/s is
the alerts stored over that time. Producing the messages only after the
daemons joined would put the producer and the broker's intake on the two
cores during the timed window, which the in-process run does not have. The
cost of reading from the start instead: the group must form once, with all N
members, before anyone consumes. The daemons start together, each is held
(SIGSTOP) once it serves /metrics, before its streams start, and all go on
together (SIGCONT); the local broker answers a JoinGroup only after about a
second (it waits for other members), so they join in one go. The run records
each daemon's partition assignments (``per_daemon[].rebalances``,
``group_formed_once``), and a group that formed more than once (a late
daemon took partitions while the others were busy) is said on the run's
line: that run's rate counts a rebalance.

Stored cutouts go under ``--data-dir`` (default ``.bench/data`` in the
repository), a directory per run, all kept until the benchmark ends. Before
each run the benchmark times creating files and directories there
(``storage_us_per_create``, CPU per inode): storing cutouts is mostly that
(three files per alert, three directories per new target). On this
machine's ext4 it was 10-25 us, and 100-900 us for a while near where tens
of thousands of files had just been deleted (a test run's /tmp, or the
previous run's cutouts when each run deleted its own: hence they are kept).
A deployment's data directory, where files accumulate, is like the former.

With ``--repeat N`` every configuration runs N times, the configurations
taking turns (a burst of load on the shared machine then hits all of them,
not one), and each reports its median run by alerts/s, with every run's
rate beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer
from sqlalchemy import text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tomd.alerts.broker import LOCAL_GROUP_SETTINGS, LocalBroker, create_topics, produce  # noqa: E402
from tomd.alerts.decode import decode_avro_ocf  # noqa: E402
from tomd.alerts.formats import FORMATS  # noqa: E402
from tomd.config import Config, Database, Rules, Storage, Stream  # noqa: E402
from tomd.daemon import Daemon  # noqa: E402
from tomd.db import migrate  # noqa: E402
from ingest_daemons import (Counters, DaemonFailed, DaemonProcess, StreamSettings, start_daemons,  # noqa: E402
                            stop_daemons, wait_until, write_config)
from ingest_daemons import cpu_seconds  # noqa: E402
from scratch_db import scratch_database  # noqa: E402
from ztf_copies import ztf_copies  # noqa: E402



def ceiling(bootstrap: str, topic: str, n: int, batch_size: int) -> dict:
    """Alerts/s for consume + decode, nothing else, and the milliseconds per alert of each.

    Decoding is tomd's decoder itself (``decode_avro_ocf``), the cheapest
    correct way: the container header read, its schema parsed once per
    distinct text (cached), the records read with cavro (fastavro for a
    schema cavro refuses). Re-reading the schema of every message
    (``fastavro.reader``) would be no ceiling: it costs several times the
    decode itself.
    """
    # The prefetch queue tomd's consumer sets (StreamConsumer._kafka_config): without
    # it this loop waits for fetches as long as it decodes.
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ceiling-{secrets.token_hex(3)}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "queued.max.messages.kbytes": 256 * 1024, **LOCAL_GROUP_SETTINGS})
    c.subscribe([topic])
    done = 0
    t0 = None
    consume_s = decode_s = 0.0
    deadline = time.monotonic() + 300
    while done < n and time.monotonic() < deadline:
        ta = time.perf_counter()
        batch = c.consume(batch_size, 1.0)
        values = [m.value() for m in batch if m.error() is None]
        tb = time.perf_counter()
        if values and t0 is None:
            t0 = ta  # from the first consume that returned records (the group join is not counted)
        if t0 is not None:
            consume_s += tb - ta
        for v in values:
            decode_avro_ocf(v)
            done += 1
        decode_s += time.perf_counter() - tb
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return {"alerts_per_s": round(done / elapsed, 1) if elapsed else 0.0,
            "ms_per_alert": {"consume": round(consume_s / max(done, 1) * 1e3, 3),
                             "decode": round(decode_s / max(done, 1) * 1e3, 3)}}


class StageClock:
    """Times tomd's own ZTF decode and parse steps separately (the Ingestor
    times them together): the format's two functions, wrapped."""

    def __init__(self, name: str = "ztf-avro"):
        self.name = name
        self.seconds = {"decode": 0.0, "parse": 0.0}

    def __enter__(self) -> StageClock:
        self.original = FORMATS[self.name]
        FORMATS[self.name] = dataclasses.replace(self.original, decode=self._timed("decode", self.original.decode),
                                                 parse=self._timed("parse", self.original.parse))
        return self

    def __exit__(self, *exc) -> None:
        FORMATS[self.name] = self.original

    def _timed(self, stage: str, fn):
        def timed(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[stage] += time.perf_counter() - t0
        return timed


RULE_TEMPLATES = [
    "alert.mag < {m} and alert.fields.real_bogus > 0.{r}",
    "target.n_detections >= {n} and alert.mag < {m}",
    "abs(target.gal_b) > {b} and alert.mag < {m} and target.age_days < {n}",
    "target.rise_rate > 0.{r} and alert.mag < {m}",
    "alert.band == 'ztfg' and alert.mag < {m} and alert.fields.sgscore1 < 0.5",
]


def write_rules(directory: Path, count: int) -> None:
    """``count`` realistic rules: most alerts pass some clauses, few fire (tags only, no requests)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        when = RULE_TEMPLATES[i % len(RULE_TEMPLATES)].format(m=14 + i % 5, r=5 + i % 4, n=2 + i % 3, b=10 + i)
        (directory / f"bench-{i:03d}.toml").write_text(
            f'name = "bench-{i:03d}"\nsources = ["ztf"]\nwhen = "{when}"\nadd_tags = ["bench-{i:03d}"]\n')


def storage_us_per_create(directory: Path, n: int = 300) -> float:
    """CPU microseconds to create an inode in ``directory``: n empty files and n directories."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=directory))
    try:
        t0 = time.process_time()
        for i in range(n):
            os.mkdir(probe / f"d{i}")
            os.close(os.open(probe / f"d{i}" / "f", os.O_WRONLY | os.O_CREAT, 0o644))
        return round(1e6 * (time.process_time() - t0) / (2 * n), 1)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def tomd_rate(kind: str, bootstrap: str, topic: str, n: int, batch_size: int, rules: int = 0,
              cutouts: bool = True, parse_workers: int = 0, broker_pid: int | None = None,
              data_root: Path | None = None) -> dict:
    url, drop = scratch_database(kind, "ingest")
    # The run's rules go when it ends; its stored cutouts (~300 MB per 5,000 alerts) when the benchmark does.
    rules_dir = Path(tempfile.mkdtemp(prefix="tomd-bench-rules-"))
    data_dir = tempfile.mkdtemp(prefix="tomd-bench-data-", dir=data_root)
    try:
        engine = migrate.connect(url)
        migrate.upgrade(engine)
        write_rules(rules_dir, rules)
        config = Config(
            database=Database(url=url),
            rules=Rules(paths=[str(rules_dir)]),
            storage=Storage(url=f"file://{data_dir}"),
            streams=[Stream(name="bench", bootstrap=bootstrap, topics=[topic], format="ztf-avro",
                            group=f"bench-{kind}-{secrets.token_hex(3)}", batch_size=batch_size,
                            kafka=dict(LOCAL_GROUP_SETTINGS), store_cutouts=cutouts,
                            parse_workers=parse_workers)],
        )
        daemon = Daemon(config, engine=engine)
        ing = daemon.runners[0].ingestor
        consumer = daemon.runners[0].consumer
        with StageClock() as clock:
            daemon.start()
            waiter = threading.Thread(target=daemon.wait, daemon=True)
            waiter.start()
            t0 = None
            deadline = time.monotonic() + 900
            db_name = url.rsplit("/", 1)[-1] if kind == "postgresql" else None
            cpu0: dict[str, float] = {}
            while ing.totals.messages < n and time.monotonic() < deadline:
                if t0 is None and consumer.stats.consumed:
                    t0 = time.perf_counter()
                    cpu0 = cpu_seconds({os.getpid()}, db_name, broker_pid, children_as="parse_workers")
                time.sleep(0.01)
            elapsed = time.perf_counter() - (t0 or time.perf_counter())
            cpu1 = cpu_seconds({os.getpid()}, db_name, broker_pid, children_as="parse_workers")
            daemon.stop.set()
            waiter.join(60)
        with engine.connect() as c:
            decisions = c.execute(text("SELECT count(*) FROM decisions")).scalar_one()
            products = c.execute(text("SELECT count(*) FROM data_products WHERE kind = 'cutout'")).scalar_one()
        engine.dispose()
        t = ing.totals
        per = 1e3 / max(t.alerts, 1)
        sec = ing.seconds
        # The database stage without its parts timed apart: cutouts (what is left to
        # wait for of the writes, and their rows) and rules (the sinks).
        # With parse workers the decode and parse happen in another process: what the stream
        # thread spent on them is its wait for the worker ("parse_wait").
        parsing = ({"parse_wait": sec["parse"]} if parse_workers else
                   {"decode": clock.seconds["decode"], "parse": sec["parse"] - clock.seconds["decode"]})
        stages = {
            "consume": consumer.stats.consume_seconds,
            **parsing,
            "database": sec["database"] - sec["cutouts"] - sec["sinks"],
            "cutouts": sec["cutouts"],
            "rules": sec["sinks"],
        }
        stages["other"] = max(0.0, elapsed - sum(stages.values()))
        # CPU per alert by process over the timed window: with 2 cores, 2 / (their sum) bounds the rate
        # whatever the code does in which process.
        cpu = {k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1e3 / max(t.alerts, 1), 3) for k in cpu1} if cpu0 else {}
        if cpu:
            cpu["cpu_bound_alerts_per_s"] = round((os.cpu_count() or 1) * 1e3 / max(sum(cpu.values()), 1e-9), 1)
        return {
            "backend": kind, "rules": rules, "cutouts": cutouts, "parse_workers": parse_workers, "alerts": t.alerts,
            "alerts_per_s": round(t.alerts / elapsed, 1), "seconds": round(elapsed, 2),
            "ms_per_alert": {k: round(v * per, 3) for k, v in stages.items()},
            "cpu_ms_per_alert": cpu,
            "photometry_points": t.photometry_points, "targets_created": t.targets_created,
            "decisions_recorded": decisions, "cutouts_stored": products,
        }
    finally:
        drop()
        shutil.rmtree(rules_dir, ignore_errors=True)
        # data_dir stays until the benchmark ends (see main): deleting tens of thousands of files
        # makes creating the next ones nearby slow for a while (ext4, measured: 25 -> 100-900 us).


def daemons_rate(bootstrap: str, topic: str, n: int, batch_size: int, daemons: int, rules: int = 0,
                 cutouts: bool = True, parse_workers: int = 0, broker_pid: int | None = None,
                 data_root: Path | None = None) -> dict:
    """``daemons`` real ``tomd run`` processes in one consumer group into one fresh PostgreSQL
    database: the run record of ``tomd_rate`` without its per-stage times (see the module docstring)."""
    url, drop = scratch_database("postgresql", "ingest")
    db_name = url.rsplit("/", 1)[-1]
    work = Path(tempfile.mkdtemp(prefix="tomd-bench-daemons-", dir=data_root))  # config, rules, hooks, cutouts
    procs: list[DaemonProcess] = []
    engine = None
    try:
        engine = migrate.connect(url)
        migrate.upgrade(engine)  # once, before any daemon starts (each refuses an unmigrated database)
        write_rules(work / "rules", rules)
        (work / "hooks").mkdir()
        stream = StreamSettings(bootstrap=bootstrap, topic=topic, group=f"bench-daemons-{secrets.token_hex(3)}",
                                batch_size=batch_size, store_cutouts=cutouts, parse_workers=parse_workers,
                                kafka=dict(LOCAL_GROUP_SETTINGS))
        config = write_config(work / "tomd.toml", db_url=url, stream=stream, rules_dir=work / "rules",
                              hooks_dir=work / "hooks", data_dir=work / "data")
        # Each one held once it serves /metrics, and all let go together: they join the group together.
        procs = start_daemons(daemons, config, hold=True)
        wait_until("every daemon serving /metrics", lambda: all(d.url for d in procs), procs, timeout=120)
        for d in procs:
            d.release()

        seen = Counters(procs)

        def first_message() -> bool:
            seen.look()
            return any(seen.consumed)

        wait_until("the first message consumed (the group formed)", first_message, procs, timeout=120)
        t0 = time.perf_counter()
        cpu0 = cpu_seconds({d.proc.pid for d in procs}, db_name, broker_pid)
        seen.restart_clock()

        def all_handled() -> bool:
            seen.look()
            return sum(seen.handled) >= n

        def next_look() -> float:
            # Each look is a scrape of every daemon (their CPU): look often only near the end,
            # where the end time is decided (a fifth of the time the rest should take), and
            # until every daemon has its first message (when it started is in the record).
            done, spent = sum(seen.handled), time.perf_counter() - t0
            if not done or None in seen.first_message_s:
                return 0.02
            return min(0.5, max(0.02, 0.2 * (n - done) * spent / done))

        wait_until(f"{n} messages handled", all_handled, procs, timeout=900, interval=next_look)
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds({d.proc.pid for d in procs}, db_name, broker_pid)
        finals = [d.metrics() for d in procs]
        with engine.connect() as c:
            stored = c.execute(text("SELECT count(*) FROM alerts")).scalar_one()
            decisions = c.execute(text("SELECT count(*) FROM decisions")).scalar_one()
            products = c.execute(text("SELECT count(*) FROM data_products WHERE kind = 'cutout'")).scalar_one()
        alerts = int(sum(m.get("tomd_alerts_ingested_total", 0.0) for m in finals))
        cpu = {k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1e3 / max(alerts, 1), 3) for k in cpu1} if cpu0 else {}
        if cpu:
            cpu["cpu_bound_alerts_per_s"] = round((os.cpu_count() or 1) * 1e3 / max(sum(cpu.values()), 1e-9), 1)
        # When each daemon had its first message and finished its last batch, seconds after the
        # clock started (to the resolution of the looks: 20 ms at the start, up to 0.5 s later).
        per_daemon = [{"messages": int(m.get("tomd_messages_handled_total", 0.0)),
                       "partitions": int(m.get("tomd_consumer_assigned_partitions", 0.0)),
                       "rebalances": int(m.get("tomd_consumer_rebalances_total", 0.0)),
                       "first_message_s": first if first is None else round(first, 3),
                       "last_batch_s": last if last is None else round(last, 3)}
                      for m, first, last in zip(finals, seen.first_message_s, seen.last_batch_s)]
        return {
            "backend": "postgresql", "rules": rules, "cutouts": cutouts, "parse_workers": parse_workers,
            "daemons": daemons, "alerts": alerts,
            "alerts_per_s": round(alerts / elapsed, 1), "seconds": round(elapsed, 2),
            "ms_per_alert": {},  # the stages run in other processes: not timed apart
            "cpu_ms_per_alert": cpu,
            "photometry_points": int(sum(m.get("tomd_photometry_points_total", 0.0) for m in finals)),
            "targets_created": int(sum(m.get("tomd_targets_created_total", 0.0) for m in finals)),
            "decisions_recorded": decisions, "cutouts_stored": products, "alerts_in_database": stored,
            "per_daemon": per_daemon,
            # One assignment each: the group formed once, before anyone consumed.
            "group_formed_once": all(x["rebalances"] == 1 for x in per_daemon),
        }
    finally:
        stop_daemons(procs)
        if engine is not None:
            engine.dispose()
        drop()  # work (stored cutouts) stays until the benchmark ends, as in tomd_rate


def run_line(run: dict) -> str:
    """One run for people: its configuration, rate, where the time or the CPU went."""
    d = run["daemons"]
    ceil = run["ceiling"]
    line = (f"{run['backend']}, {run['rules']} rules, cutouts {'on' if run['cutouts'] else 'off'}, "
            f"{run['parse_workers']} parse workers, "
            + ("1 daemon (in this process)" if d == 1 else f"{d} daemons (tomd run processes)")
            + f": {run['alerts_per_s']} alerts/s end to end, {run['of_ceiling']:.2f} of the consume+decode "
            f"ceiling measured just before ({ceil['alerts_per_s']} alerts/s); "
            + (f"creating a file or directory where cutouts go cost {run['storage_us_per_create']} us; "
               if run["cutouts"] else ""))
    if d == 1:
        line += "ms per alert: " + ", ".join(f"{s} {v}" for s, v in run["ms_per_alert"].items())
    else:
        line += "no per-stage times across processes; per daemon: " + ", ".join(
            f"{x['messages']} messages from {x['partitions']} partition(s), its first at {x['first_message_s']} s, "
            f"its last batch done at {x['last_batch_s']} s" for x in run["per_daemon"])
        if not run["group_formed_once"]:
            line += (" (THE GROUP REBALANCED after consuming began: a daemon joined late; assignments per daemon "
                     f"{[x['rebalances'] for x in run['per_daemon']]})")
    if run["cpu_ms_per_alert"]:
        line += "; CPU ms per alert: " + ", ".join(f"{s} {v}" for s, v in run["cpu_ms_per_alert"].items())
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alerts", type=int, default=5000)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--rules", default="0,25", help="rule counts to run with, e.g. 0,25")
    p.add_argument("--cutouts", default="on,off", help="store cutouts as data products: on, off or on,off")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median reported)")
    p.add_argument("--parse-workers", default="0", help="[[streams]] parse_workers to run with, e.g. 0,1")
    p.add_argument("--daemons", default="1",
                   help="daemons sharing the work, e.g. 1,2: 1 runs in this process (stages timed), "
                        "N >= 2 starts N `tomd run` processes in one consumer group (PostgreSQL only)")
    p.add_argument("--data-dir", type=Path, default=REPO / ".bench" / "data",
                   help="where runs store cutouts, a new directory each (default: .bench/data in the repository)")
    args = p.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    # Every run's cutouts stay here until the end (tomd_rate says why), then go at once.
    data_root = Path(tempfile.mkdtemp(prefix="tomd-bench-", dir=args.data_dir))
    try:
        run_all(args, data_root)
    finally:
        shutil.rmtree(data_root, ignore_errors=True)


def run_all(args: argparse.Namespace, data_root: Path) -> None:
    configs = []
    skipped: set[tuple[str, int]] = set()
    for k, r, cut, w, d in [(k, r, cut, int(w), int(d)) for k in args.backends.split(",")
                            for r in args.rules.split(",") for cut in args.cutouts.split(",")
                            for w in args.parse_workers.split(",") for d in args.daemons.split(",")]:
        if d < 1:
            raise SystemExit(f"--daemons {d}: at least 1")
        if d > 1 and k != "postgresql":
            if (k, d) not in skipped:
                skipped.add((k, d))
                print(f"skipping {k} with {d} daemons: {k} takes one writer at a time; several daemons "
                      "share one PostgreSQL (README, Scale-out)", file=sys.stderr)
            continue
        configs.append((k, r, cut, w, d))
    if not configs:
        raise SystemExit("nothing to run")
    values = ztf_copies(args.alerts, seed=11)
    mb = sum(map(len, values)) / 1e6
    out: dict = {"benchmark": "ingest", "alerts": args.alerts, "megabytes": round(mb, 1),
                 "batch_size": args.batch_size, "goal_alerts_per_s_postgresql": 2000, "cpus": os.cpu_count(),
                 "repeat": args.repeat}
    all_runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    with LocalBroker() as broker:
        topic = "ztf_bench"
        # A partition per daemon at least: Kafka gives each partition to one member of the group.
        partitions = max([2] + [c[4] for c in configs])
        create_topics(broker.bootstrap, {topic: partitions})
        # Round robin, as evenly as a real survey's topic: left to the producer (sticky batches to
        # one partition at a time), 2,000 messages split 857/1,143, and N daemons would wait for
        # the one with the biggest share. One daemon reads them all either way.
        for part in range(partitions):
            produce(broker.bootstrap, topic, values[part::partitions], partition=part)
        for _ in range(args.repeat):
            for k, r, cut, w, d in configs:
                ceil = ceiling(broker.bootstrap, topic, args.alerts, args.batch_size)
                create_us = storage_us_per_create(data_root)
                if d == 1:
                    run = tomd_rate(k, broker.bootstrap, topic, args.alerts, args.batch_size, int(r), cut == "on", w,
                                    broker_pid=broker.pid, data_root=data_root)
                    run["daemons"] = 1
                else:
                    try:
                        run = daemons_rate(broker.bootstrap, topic, args.alerts, args.batch_size, d, int(r),
                                           cut == "on", w, broker_pid=broker.pid, data_root=data_root)
                    except DaemonFailed as exc:
                        raise SystemExit(f"{k}, {r} rules, cutouts {cut}, {w} parse workers, {d} daemons: {exc}")
                run["ceiling"] = ceil
                run["storage_us_per_create"] = create_us
                # The machine is shared: the load says how much of it this run had.
                run["load_average_1min"] = round(os.getloadavg()[0], 2)
                run["of_ceiling"] = round(run["alerts_per_s"] / ceil["alerts_per_s"], 3)
                all_runs[(k, r, cut, w, d)].append(run)
                print(run_line(run), file=sys.stderr)
    runs = []
    for c in configs:
        ordered = sorted(all_runs[c], key=lambda x: x["alerts_per_s"])
        median = dict(ordered[len(ordered) // 2])
        if args.repeat > 1:
            median["alerts_per_s_runs"] = [x["alerts_per_s"] for x in all_runs[c]]
        runs.append(median)
    out["runs"] = runs
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
