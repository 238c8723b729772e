"""Decision latency: from an alert's Kafka timestamp to the facility receiving the POST.

Alerts (Lasair-ZTF JSON, each a new object) are produced to a local Kafka
broker at ``--rate`` per second with their CreateTime timestamp; ``--fire``
of them are bright enough for the benchmark rule. tomd's own parts do the
rest, wired as the daemon will be: StreamConsumer → Ingestor → RuleEngine
(decision + intent in the batch's transaction) → WakeAfterCommit → Submitter
→ LCOClient → the simulated observatory on loopback, which records when each
POST arrives. Prints JSON with p50/p90/p99 (seconds) on stdout and one human
line on stderr.

    python bench/latency.py [--alerts 6000] [--rate 333] [--fire 0.01] [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from confluent_kafka import Producer
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch_db import scratch_database  # noqa: E402
from tomd.alerts.broker import LOCAL_GROUP_SETTINGS, LocalBroker, create_topics  # noqa: E402
from tomd.alerts.consumer import ConsumerSettings, StreamConsumer  # noqa: E402
from tomd.alerts.ingest import IngestSettings, Ingestor  # noqa: E402
from tomd.config import Config, Database, Facility, Rules  # noqa: E402
from tomd.daemon import parser_for  # noqa: E402
from tomd.db import migrate  # noqa: E402
from tomd.db.models import AlertRow, Decision, ObservationRequest  # noqa: E402
from tomd.facilities import open_facilities  # noqa: E402
from tomd.facilities.sim import SimObservatory  # noqa: E402
from tomd.rules.engine import RuleEngine  # noqa: E402
from tomd.submit import SubmitSettings, Submitter, WakeAfterCommit  # noqa: E402


RULE = '''
name = "bench-bright"
description = "latency benchmark: alerts brighter than 14 mag"
when = "alert.mag < 14"

[observe]
facility = "sim"
template = "1m-gri"
mode = "RAPID_RESPONSE"
window = "24h"
'''


def alert(i: int, bright: bool) -> bytes:
    ra, dec = (37.0 * i) % 360.0, -60.0 + (i * 0.0137) % 80.0  # spread: every alert is a new target
    return json.dumps({"objectId": f"ZTF26bench{i:07d}", "ramean": ra, "decmean": dec,
                       "jdmax": 2461000.5 + i * 1e-6, "latestmag": 13.5 if bright else 18.5}).encode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alerts", type=int, default=6000)
    ap.add_argument("--rate", type=float, default=333.0, help="alerts per second")
    ap.add_argument("--fire", type=float, default=0.01, help="fraction of alerts that fire the rule")
    ap.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--batch-timeout", type=float, default=0.05, help="consumer batch timeout, seconds")
    ap.add_argument("--no-validate", action="store_true", help="skip the validation round trip")
    args = ap.parse_args()

    every = max(1, round(1 / args.fire)) if args.fire > 0 else 0
    tmp = Path(tempfile.mkdtemp(prefix="tomd-latency-"))
    (tmp / "rules").mkdir()
    (tmp / "rules" / "bench.toml").write_text(RULE)
    url, drop = scratch_database(args.backend, "latency")
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        engine = migrate.connect(url)
        migrate.upgrade(engine)
        sessions = migrate.sessions(engine)
        with LocalBroker() as broker, SimObservatory(token=None) as sim:
            topic = "bench-latency"
            create_topics(broker.bootstrap, {topic: 1})
            config = Config(database=Database(url=url), rules=Rules(paths=[str(tmp / "rules")]), facilities={
                "sim": Facility(kind="sim", url=sim.url, proposal="SIM2026A-001", rate_limit=100.0, templates={
                    "1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"],
                               "exposure_time": 120}})})
            facilities = open_facilities(config)
            submitter = Submitter(sessions, facilities, SubmitSettings(validate=not args.no_validate))
            rules = RuleEngine.from_config(config)
            ingestor = Ingestor(sessions, IngestSettings(stream="bench", format="lasair-json"),
                                parser_for("lasair-json", include_test=False),
                                sinks=[rules, WakeAfterCommit(submitter.wake)])
            consumer = StreamConsumer(ConsumerSettings(bootstrap=broker.bootstrap, topics=[topic],
                                                       group=f"bench-{secrets.token_hex(3)}", start="earliest",
                                                       batch_size=500, batch_timeout_s=args.batch_timeout,
                                                       kafka=LOCAL_GROUP_SETTINGS), ingestor)
            threads = [threading.Thread(target=submitter.run, args=(stop,), daemon=True),
                       threading.Thread(target=consumer.run, args=(stop,), daemon=True)]
            for t in threads:
                t.start()
            time.sleep(3.0)  # let the consumer join its group

            producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "acks": "1"})
            sent_at: dict[str, float] = {}
            t0 = time.time()
            for i in range(args.alerts):
                due = t0 + i / args.rate
                lag = due - time.time()
                if lag > 0:
                    time.sleep(lag)
                bright = every > 0 and i % every == every // 2
                ts_ms = int(time.time() * 1000)
                if bright:
                    sent_at[f"ZTF26bench{i:07d}"] = ts_ms / 1000.0
                producer.produce(topic, value=alert(i, bright), timestamp=ts_ms)
                producer.poll(0)
            producer.flush(30)
            produced_s = time.time() - t0

            deadline = time.time() + 60
            while len(sim.submissions()) < len(sent_at) and time.time() < deadline:
                time.sleep(0.1)
            stop.set()
            submitter.wake()

            posts: dict[str, float] = {}
            for r in sim.submissions():
                posts.setdefault(r.name, r.wall)
            with sessions() as s:
                pairs = s.execute(select(ObservationRequest.name, AlertRow.object_id)
                                  .join(Decision, Decision.id == ObservationRequest.decision_id)
                                  .join(AlertRow, AlertRow.id == Decision.alert_id)).all()
            lat = np.array([posts[name] - sent_at[obj] for name, obj in pairs if name in posts and obj in sent_at])
            names = sim.names()
            for t in threads:
                t.join(10)
            facilities.close()
        engine.dispose()
    finally:
        stop.set()
        drop()

    pct = {f"p{q}": round(float(np.percentile(lat, q)), 4) for q in (50, 90, 99)} if len(lat) else {}
    result = {"backend": args.backend, "alerts": args.alerts, "rate_target": args.rate,
              "rate_produced": round(args.alerts / produced_s, 1), "fire_fraction": args.fire,
              "expected_fired": len(sent_at), "submitted": len(lat), "duplicates": sum(c > 1 for c in names.values()),
              "validate": not args.no_validate, "latency_s": {**pct, "max": round(float(lat.max()), 4) if len(lat) else None}}
    print(json.dumps(result, indent=2))
    print(f"{args.backend}: {len(lat)}/{len(sent_at)} fired alerts reached the facility; alert→POST "
          f"p50 {pct.get('p50')} s, p90 {pct.get('p90')} s, p99 {pct.get('p99')} s", file=sys.stderr)
    return 0 if len(lat) == len(sent_at) else 1


if __name__ == "__main__":
    sys.exit(main())
