"""End-to-end ingest rate: real ZTF packets through a local Kafka broker into the database.

Produces N copies of the real ZTF alerts in ../shared/data (cutouts included,
unique candid/objectId, spread positions) to a local Tansu broker, then:

1. the ceiling: consume and decode the same messages with plain
   confluent-kafka + fastavro and nothing else;
2. ``tomd run``'s consumer and ingestor (the daemon's own wiring) into a
   fresh SQLite database and a fresh PostgreSQL database.

Prints JSON (rates, where the time goes) and one human line per backend.

    python bench/ingest.py [--alerts 5000] [--backends sqlite,postgresql] [--rules 0,25] [--batch-size 500]
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import fastavro
from confluent_kafka import Consumer
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tomd.alerts.broker import LOCAL_GROUP_SETTINGS, LocalBroker, create_topics, produce  # noqa: E402
from tomd.config import Config, Database, Rules, Storage, Stream  # noqa: E402
from tomd.daemon import Daemon  # noqa: E402
from tomd.db import migrate  # noqa: E402
from scratch_db import scratch_database  # noqa: E402
from ztf_copies import ztf_copies  # noqa: E402



def ceiling(bootstrap: str, topic: str, n: int) -> float:
    """Alerts/s for consume + fastavro decode, nothing else."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ceiling-{secrets.token_hex(3)}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False, **LOCAL_GROUP_SETTINGS})
    c.subscribe([topic])
    done = 0
    t0 = None
    deadline = time.monotonic() + 300
    while done < n and time.monotonic() < deadline:
        for m in c.consume(500, 1.0):
            if m.error():
                continue
            if t0 is None:
                t0 = time.perf_counter()
            for _ in fastavro.reader(io.BytesIO(m.value())):
                pass
            done += 1
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return done / elapsed if elapsed else 0.0


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


def tomd_rate(kind: str, bootstrap: str, topic: str, n: int, batch_size: int, rules: int = 0) -> dict:
    url, drop = scratch_database(kind, "ingest")
    try:
        engine = migrate.connect(url)
        migrate.upgrade(engine)
        rules_dir = Path(tempfile.mkdtemp(prefix="tomd-bench-rules-"))
        write_rules(rules_dir, rules)
        config = Config(
            database=Database(url=url),
            rules=Rules(paths=[str(rules_dir)]),
            storage=Storage(url=f"file://{tempfile.mkdtemp(prefix='tomd-bench-data-')}"),
            streams=[Stream(name="bench", bootstrap=bootstrap, topics=[topic], format="ztf-avro",
                            group=f"bench-{kind}-{secrets.token_hex(3)}", batch_size=batch_size,
                            kafka=dict(LOCAL_GROUP_SETTINGS))],
        )
        daemon = Daemon(config, engine=engine)
        ing = daemon.runners[0].ingestor
        daemon.start()
        waiter = threading.Thread(target=daemon.wait, daemon=True)
        waiter.start()
        t0 = None
        deadline = time.monotonic() + 900
        while ing.totals.messages < n and time.monotonic() < deadline:
            if t0 is None and daemon.runners[0].consumer.stats.consumed:
                t0 = time.perf_counter()
            time.sleep(0.01)
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
        daemon.stop.set()
        waiter.join(60)
        with engine.connect() as c:
            decisions = c.execute(text("SELECT count(*) FROM decisions")).scalar_one()
        engine.dispose()
        t = ing.totals
        busy = ing.seconds["parse"] + ing.seconds["database"]
        return {
            "backend": kind, "rules": rules, "alerts": t.alerts, "alerts_per_s": round(t.alerts / elapsed, 1),
            "seconds": round(elapsed, 2),
            "time_share": {
                "decode_parse": round(ing.seconds["parse"] / elapsed, 3),
                "database": round(ing.seconds["database"] / elapsed, 3),
                "kafka_and_other": round(max(0.0, 1 - busy / elapsed), 3),
            },
            "ms_per_alert": {"decode_parse": round(ing.seconds["parse"] / max(t.alerts, 1) * 1e3, 3),
                             "database": round(ing.seconds["database"] / max(t.alerts, 1) * 1e3, 3)},
            "photometry_points": t.photometry_points, "targets_created": t.targets_created,
            "decisions_recorded": decisions,
        }
    finally:
        drop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alerts", type=int, default=5000)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--rules", default="0,25", help="rule counts to run with, e.g. 0,25")
    args = p.parse_args()
    values = ztf_copies(args.alerts, seed=11)
    mb = sum(map(len, values)) / 1e6
    out: dict = {"benchmark": "ingest", "alerts": args.alerts, "megabytes": round(mb, 1),
                 "batch_size": args.batch_size, "goal_alerts_per_s_postgresql": 2000}
    with LocalBroker() as broker:
        topic = "ztf_bench"
        create_topics(broker.bootstrap, {topic: 2})
        produce(broker.bootstrap, topic, values)
        out["ceiling_alerts_per_s"] = round(ceiling(broker.bootstrap, topic, args.alerts), 1)
        out["runs"] = [tomd_rate(k, broker.bootstrap, topic, args.alerts, args.batch_size, int(r))
                       for k in args.backends.split(",") for r in args.rules.split(",")]
    print(json.dumps(out, indent=2))
    for r in out["runs"]:
        print(f"{r['backend']} with {r['rules']} rules: {r['alerts_per_s']} alerts/s end to end "
              f"({r['alerts_per_s'] / out['ceiling_alerts_per_s']:.2f} of the plain consume+decode ceiling, "
              f"{out['ceiling_alerts_per_s']} alerts/s); decode+parse {r['ms_per_alert']['decode_parse']} ms, "
              f"database {r['ms_per_alert']['database']} ms per alert", file=sys.stderr)


if __name__ == "__main__":
    main()
