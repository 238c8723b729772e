"""Status polling at scale: one full poll cycle over 10,000 open requests.

An in-process simulated observatory holds N request groups, all changed to
COMPLETED since tomd last looked (the worst case: every request has a change
to record); the database holds the N matching ``observation_requests`` rows
in state ``pending``, inserted directly. One ``Poller.poll()`` — the first,
without a cursor — must list the groups in few HTTP calls and record every
change (state, history row, outbox event, data_due_at) once. A second cycle
with nothing new shows the steady state. Goal: ≤ 30 s and ≤ 1 HTTP request
per 100 open requests.

``--mix`` (the second scenario of ``--save``): half of the groups complete,
a quarter are scheduled and a quarter in progress. The portal's groups say
PENDING for those; only the observations API tells, so the cycle also lists
the observations of pending requests (batched, 1000 per page).

Prints JSON on stdout and one human line on stderr; ``--save`` writes
bench/results/poll.json (both backends with ``--backend both``).

    python bench/poll.py [--requests 10000] [--backend sqlite|postgresql|both] [--save]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, insert, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch_db import scratch_database  # noqa: E402
from tomd.db import migrate  # noqa: E402
from tomd.db.models import ObservationRequest, ObservationStatus, OutboxEvent, Target  # noqa: E402
from tomd.facilities.lco import LCOClient  # noqa: E402
from tomd.facilities.sim import SimObservatory  # noqa: E402
from tomd.status import Poller  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "poll.json"


def group_doc(i: int, now: datetime) -> dict:
    return {"name": f"bench-poll-{i}", "proposal": "SIM2026A-001", "ipp_value": 1.0, "operator": "SINGLE",
            "observation_type": "NORMAL",
            "requests": [{"acceptability_threshold": 90,
                          "windows": [{"start": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                       "end": (now + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}],
                          "configurations": [{"type": "EXPOSE", "instrument_type": "1M0-SCICAM-SINISTRO",
                                              "target": {"name": f"bench {i}", "type": "ICRS", "ra": 150.0,
                                                         "dec": -20.0, "epoch": 2000.0},
                                              "instrument_configs": [{"exposure_time": 60, "exposure_count": 1,
                                                                      "optical_elements": {"filter": "rp"}}]}]}]}


def run(backend: str, n: int, mix: bool = False) -> dict:
    url, drop = scratch_database(backend, "poll")
    try:
        engine = migrate.connect(url)
        migrate.upgrade(engine)
        sessions = migrate.sessions(engine)
        with SimObservatory(token=None) as sim:
            now = datetime.now(timezone.utc)
            t0 = time.perf_counter()
            ids = sim.add_groups([group_doc(i, now) for i in range(n)], state="COMPLETED")
            if mix:  # a quarter scheduled, a quarter observed now: their groups stay PENDING
                for k, gid in enumerate(ids):
                    if k % 4 in (1, 3):
                        sim.set_state(gid, "SCHEDULED" if k % 4 == 1 else "IN_PROGRESS")
            with sessions.begin() as s:
                tid = s.execute(insert(Target).returning(Target.id),
                                [{"name": "bench", "ra": 150.0, "dec": -20.0, "created_at": now,
                                  "modified_at": now}]).scalar_one()
                submitted = now - timedelta(minutes=5)
                s.execute(insert(ObservationRequest), [{
                    "name": f"bench-poll-{i}", "target_id": tid, "facility": "sim", "template": "1m-gri",
                    "state": "pending", "facility_state": "PENDING", "facility_id": str(gid), "request": {},
                    "attempts": 1, "created_at": submitted, "updated_at": submitted, "submitted_at": submitted,
                } for i, gid in enumerate(ids)])
            setup_s = time.perf_counter() - t0

            fac = LCOClient("sim", url=sim.url, token=None, proposal="SIM2026A-001", timeout=30.0,
                            rate_limit=50.0)
            poller = Poller(sessions, {"sim": fac})
            before = len(sim.received)
            t0 = time.perf_counter()
            (first,) = poller.poll()
            first_s = time.perf_counter() - t0
            first_calls = len(sim.received) - before

            before = len(sim.received)
            t0 = time.perf_counter()
            (second,) = poller.poll()
            second_s = time.perf_counter() - t0
            second_calls = len(sim.received) - before
            fac.close()
        with sessions() as s:
            completed = s.scalar(select(func.count()).select_from(ObservationRequest)
                                 .where(ObservationRequest.state == "completed", ObservationRequest.data_due_at.is_not(None)))
            history = s.scalar(select(func.count()).select_from(ObservationStatus))
            events = s.scalar(select(func.count()).select_from(OutboxEvent)
                              .where(OutboxEvent.kind == "observation.status_changed"))
        engine.dispose()
    finally:
        drop()
    return {
        "backend": backend, "scenario": "half completed, a quarter scheduled, a quarter in progress" if mix
        else "all completed", "open_requests": n, "setup_s": round(setup_s, 2),
        "first_cycle": {"seconds": round(first_s, 2), "http_requests": first_calls,
                        "http_requests_per_100_open": round(100.0 * first_calls / n, 3),
                        "changes_recorded": len(first.changes), "error": first.error},
        "steady_cycle": {"seconds": round(second_s, 2), "http_requests": second_calls,
                         "changes_recorded": len(second.changes), "error": second.error},
        "rows_completed_with_data_due": completed, "history_rows": history, "events": events,
        "goal": {"seconds_max": 30, "http_per_100_max": 1.0,
                 "met": first_s <= 30 and first_calls <= n / 100 and len(first.changes) == n},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="sqlite")
    ap.add_argument("--mix", action="store_true", help="only the mixed scenario (scheduled, in progress, completed)")
    ap.add_argument("--save", action="store_true",
                    help=f"both scenarios, written to {RESULTS.relative_to(RESULTS.parents[2])}")
    args = ap.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    mixes = [False, True] if args.save else [args.mix]
    results = [run(b, args.requests, m) for m in mixes for b in backends]
    doc = {"command": f"python bench/poll.py --requests {args.requests} --backend {args.backend}"
                      + (" --save" if args.save else " --mix" if args.mix else ""),
           "results": results}
    print(json.dumps(doc, indent=2))
    for r in results:
        f = r["first_cycle"]
        print(f"{r['backend']}, {r['scenario']}: one poll cycle over {r['open_requests']:,} open requests: "
              f"{f['seconds']} s, {f['http_requests']} HTTP requests ({f['http_requests_per_100_open']} per 100), "
              f"{f['changes_recorded']:,} changes recorded; steady cycle {r['steady_cycle']['seconds']} s, "
              f"{r['steady_cycle']['http_requests']} request(s); goal {'met' if r['goal']['met'] else 'NOT met'}",
              file=sys.stderr)
    if args.save:
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(r["goal"]["met"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
