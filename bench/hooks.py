"""Cost of a failing hook on the pipeline: 1,000 real ZTF alerts ingested with and without it.

The pipeline is the daemon's own ingest path: a ``Daemon`` built from a
config (rules as sinks, WakeAfterCommit waking the components after each
commit), its stream's ``Ingestor`` fed batches of real ZTF packets (copies
with new ids, cutouts stored), and the daemon's ``HookRunner`` added as
``tomd run`` adds it (``wake_on_ingest``), running in its thread with its
worker process. Each run first ingests another ``--alerts`` alerts untimed,
so the runner is already busy with their events when the timed ingest
starts.

Cases (each on a fresh database):

- ``baseline``: no user hooks (the runner runs, with nothing to do);
- ``failing``: one hook on alert.ingested and target.created that raises on
  every event, 5 attempts, retries from 50 ms (``retry_backoff = 0.05``,
  ``retry_max = 0.4``), so its first tries AND its retries run while the
  timed ingest runs: the case the goal is judged on;
- ``failing_default_backoff``: the same hook at the ``[hooks]`` defaults
  (retries 10 s later): only first tries fall inside the window;
- ``failing_unpaced``: as ``failing`` with ``busy_share = 1.0`` (the worker
  does not yield to the busy ingest, as before that pacing existed);
- ``failing_batch100``: as ``failing``, claiming 100 runs per transaction.

How many hook attempts finished inside the timed window is counted (the
sum of ``hook_runs.attempts`` just before and just after it), so a case
whose hook did nothing while the clock ran shows it. Runs are interleaved
(baseline, failing, failing_default_backoff, then the next repeat, the
order of each repeat rotated), and each failing run is compared with the
baseline of the same repeat: the result is the median of those paired
ratios (the machine is shared; pairs see the same background load). CPU
seconds of the bench process (ingest and runner threads), of the
worker process and of the PostgreSQL server processes inside the window, and the load average, are recorded per run.

    python bench/hooks.py [--alerts 1000] [--backends sqlite,postgresql] [--repeat 7]

Prints JSON and one human line per backend; writes bench/results/hooks.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sqlalchemy import func, select  # noqa: E402

from ingest import write_rules  # noqa: E402
from scratch_db import scratch_database  # noqa: E402
from ztf_copies import ztf_copies  # noqa: E402

from tomd.alerts.ingest import FileMessage  # noqa: E402
from tomd.config import Config, Database, Hooks, Rules, Storage, Stream  # noqa: E402
from tomd.daemon import Daemon  # noqa: E402
from tomd.db import migrate  # noqa: E402
from tomd.db.models import HookRun  # noqa: E402
from tomd.hooks.runner import HookRunner, RunnerSettings  # noqa: E402

FAILING_HOOK = '''
from tomd.hooks import on

@on("alert.ingested", "target.created", max_attempts=5)
def always_fails(ctx):
    raise RuntimeError(f"bench: failing on purpose (event {ctx.event_id})")
'''

CASES = {  # name: (failing hook, retry_backoff, retry_max, RunnerSettings changes)
    "baseline": (False, 10.0, 3600.0, {}),
    "failing": (True, 0.05, 0.4, {}),
    "failing_default_backoff": (True, 10.0, 3600.0, {}),
    # the same as "failing", without the worker's pacing (as before it): what the pacing buys
    "failing_unpaced": (True, 0.05, 0.4, {"busy_share": 1.0}),
    # the same as "failing", claiming 100 runs at a time (fewer transactions per attempt)
    "failing_batch100": (True, 0.05, 0.4, {"claim_batch": 100}),
}


def _cpu_of(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _postgres_cpu() -> float:
    """CPU seconds of every PostgreSQL server process (the server is local; other users' too)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() in ("postgres", "postmaster"):
                    total += _cpu_of(int(d.name))
            except OSError:
                pass
    return total


def _attempts(sessions) -> tuple[int, int]:
    with sessions() as s:
        return (int(s.scalar(select(func.coalesce(func.sum(HookRun.attempts), 0))) or 0),
                int(s.scalar(select(func.count()).select_from(HookRun)) or 0))


def one_run(kind: str, case: str, warm: list[bytes], packets: list[bytes], batch: int, rules: int) -> dict:
    failing, backoff, backoff_max, changes = CASES[case]
    url, drop = scratch_database(kind, "hooks")
    tmp = Path(tempfile.mkdtemp(prefix="tomd-bench-hooks-"))
    (tmp / "hooks").mkdir()
    if failing:
        (tmp / "hooks" / "bench.py").write_text(FAILING_HOOK)
    write_rules(tmp / "rules", rules)
    engine = migrate.connect(url)
    try:
        migrate.upgrade(engine)
        config = Config(
            database=Database(url=url),
            rules=Rules(paths=[str(tmp / "rules")]),
            storage=Storage(url=f"file://{tmp / 'data'}"),
            hooks=Hooks(paths=[str(tmp / "hooks")], retry_backoff=backoff, retry_max=backoff_max, poll=0.5),
            streams=[Stream(name="bench", kind="file", topics=[str(tmp / "in")], format="ztf-avro")],
        )
        daemon = Daemon(config, engine=engine)
        settings = dataclasses.replace(RunnerSettings.from_config(config.hooks), **changes)
        hooks = HookRunner(daemon.sessions, settings, database_url=url, storage_config=config.storage)
        hooks.start()
        daemon.add(hooks, wake_on_ingest=True)  # as add_components does: woken after every ingest commit
        ingestor = daemon.runners[0].ingestor
        stop = threading.Event()
        thread = threading.Thread(target=hooks.run, args=(stop,), name="hooks", daemon=True)
        thread.start()
        # Untimed: earlier alerts whose events keep the runner busy (failing, retrying) when the clock starts.
        for i in range(0, len(warm), batch):
            ingestor.handle([FileMessage(f"warm-{j}", 0, p) for j, p in enumerate(warm[i:i + batch], i)])
        warm_alerts = ingestor.totals.alerts
        messages = [FileMessage(f"bench-{i}", 0, p) for i, p in enumerate(packets)]
        worker = hooks._slots[0].worker
        worker_pid = worker.proc.pid if worker.proc is not None else None
        a0, runs0 = _attempts(daemon.sessions)
        load = os.getloadavg()[0]
        w0, c0, p0 = _cpu_of(worker_pid), time.process_time(), _postgres_cpu() if kind == "postgresql" else 0.0
        t0 = time.perf_counter()
        for i in range(0, len(messages), batch):
            ingestor.handle(messages[i:i + batch])  # its WakeAfterCommit sink wakes the runner
        ingest_s = time.perf_counter() - t0
        cpu_s, worker_cpu = time.process_time() - c0, _cpu_of(worker_pid) - w0
        pg_cpu = _postgres_cpu() - p0 if kind == "postgresql" else 0.0
        a1, runs1 = _attempts(daemon.sessions)
        # then, untimed: how long the runner needs to finish (bounded; the default backoff waits 10 s+)
        t1 = time.perf_counter()
        limit = 60 if backoff < 1 else 0
        while time.perf_counter() - t1 < limit:
            with daemon.sessions() as s:
                if not s.scalar(select(func.count()).select_from(HookRun).where(
                        HookRun.state.in_(("pending", "running")))):
                    break
            time.sleep(0.1)
        drain_s = time.perf_counter() - t1
        with daemon.sessions() as s:
            states = dict(s.execute(select(HookRun.state, func.count()).group_by(HookRun.state)).all())
        stop.set()
        hooks.wake()
        thread.join(60)
        timed = ingestor.totals.alerts - warm_alerts
        return {"case": case, "alerts": timed, "ingest_s": round(ingest_s, 3),
                "alerts_per_s": round(timed / ingest_s, 1), "attempts_in_window": a1 - a0,
                "runs_added_in_window": runs1 - runs0, "bench_cpu_s": round(cpu_s, 3),
                "worker_cpu_s": round(worker_cpu, 3), "postgres_cpu_s": round(pg_cpu, 3), "load_1min": round(load, 2),
                "drain_s": round(drain_s, 2), "runs_after": states}
    finally:
        engine.dispose()
        drop()


def main() -> None:
    # The daemon logs; so does the bench (to /dev/null): formatting the lines is part of the cost.
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alerts", type=int, default=1000)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--rules", type=int, default=25)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hooks.json"))
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c != "baseline"]
    copies = ztf_copies(2 * args.alerts)
    warm, packets = copies[:args.alerts], copies[args.alerts:]
    results = {"alerts": args.alerts, "batch_size": args.batch_size, "rules": args.rules, "repeat": args.repeat,
               "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
               "goal": "failing / baseline - 1 < 0.10 (median of paired runs, case 'failing')", "backends": {}}
    lines = []
    for kind in args.backends.split(","):
        order = ["baseline"] + cases
        runs: dict[str, list[dict]] = {c: [] for c in order}
        for r in range(args.repeat):
            rot = order[r % len(order):] + order[:r % len(order)]  # no case always first or last
            for case in rot:
                runs[case].append(one_run(kind, case, warm, packets, args.batch_size, args.rules))
        paired = {c: [round(f["ingest_s"] / b["ingest_s"] - 1.0, 4) for f, b in zip(runs[c], runs["baseline"])]
                  for c in cases}
        med = {c: round(statistics.median(v), 4) for c, v in paired.items()}
        attempts = {c: statistics.median(x["attempts_in_window"] for x in runs[c]) for c in cases}
        results["backends"][kind] = {
            "median_ingest_s": {c: statistics.median(x["ingest_s"] for x in rs) for c, rs in runs.items()},
            "paired_slowdowns": paired, "slowdown_paired_median": med,
            "median_attempts_in_window": attempts,
            "met": med.get("failing", 1.0) < 0.10, "runs": runs}
        base = statistics.median(x["ingest_s"] for x in runs["baseline"])
        parts = [f"{c}: {med[c]:+.1%} ({attempts[c]:.0f} hook attempts in the window)" for c in cases]
        lines.append(f"{kind}: {args.alerts} alerts with {args.rules} rules ingest in {base:.2f} s without hooks "
                     f"(median of {args.repeat}); paired medians with a hook failing on every event: "
                     + "; ".join(parts) + f" (goal < +10%: {'met' if results['backends'][kind]['met'] else 'NOT met'})")
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    for line in lines:
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
