"""Cost of match-and-upsert per object as the target table grows.

For 10^3, 10^4, 10^5 and 10^6 existing targets (uniform on the sky), on
SQLite and PostgreSQL, time ``tomd.targets.store.upsert`` for a set of probe
objects (half of them within 1" of an existing target, half new), committed
in batches of 100 as ingest does. For contrast, time a naive cone query that
scans the table (a box on unindexed ra/dec) at each size.

Prints one JSON document and a human line per backend. The goal: the 10^6
per-object time is at most 1.5 times the 10^3 time.

    python bench/crossmatch.py [--sizes 1000,10000,100000,1000000] [--probes 2000]
                               [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch_db import scratch_database  # noqa: E402
from tomd import sky  # noqa: E402
from tomd.db import migrate, repository as repo  # noqa: E402
from tomd.db.models import Target  # noqa: E402
from tomd.targets import store  # noqa: E402
from tomd.targets.model import TargetSpec  # noqa: E402



def random_sky(rng, n):
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


def load(sessions, start_id: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Bulk-insert n targets with ids start_id+1 …; returns their positions."""
    ra, dec = random_sky(rng, n)
    hpx = sky.sky_index_array(ra, dec)
    gl, gb = sky.to_galactic(ra, dec)
    chunk = 20000
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        rows, names = [], []
        for i in range(lo, hi):
            tid = start_id + 1 + i
            rows.append({"id": tid, "name": f"bench{tid}", "type": "sidereal", "ra": float(ra[i]),
                         "dec": float(dec[i]), "hpx": int(hpx[i]), "gal_l": float(gl[i]), "gal_b": float(gb[i]),
                         "extras": {}})
            names.append({"target_id": tid, "name": f"bench{tid}", "norm": f"bench{tid}", "primary": True})
        with sessions.begin() as s:
            repo.bulk_insert_targets(s, rows, names)
    return ra, dec


def probe_specs(rng, ra, dec, m: int, tag: str) -> list[TargetSpec]:
    """Half within ~0.5" of existing targets, half at random (new)."""
    specs = []
    pick = rng.integers(0, len(ra), m // 2)
    for k, i in enumerate(pick):
        d = 0.5 / 3600.0
        specs.append(TargetSpec(f"{tag}-m{k}", ra=float((ra[i] + d / max(np.cos(np.radians(dec[i])), 1e-3)) % 360),
                                dec=float(np.clip(dec[i], -90, 90))))
    nra, ndec = random_sky(rng, m - len(specs))
    specs += [TargetSpec(f"{tag}-n{k}", ra=float(a), dec=float(b)) for k, (a, b) in enumerate(zip(nra, ndec))]
    rng.shuffle(specs)
    return specs


def time_upserts(sessions, specs, batch=100, *, batched: bool = False) -> tuple[float, int]:
    """Seconds per object: one upsert call per object, or one upsert_many per batch."""
    created = 0
    t0 = time.perf_counter()
    for lo in range(0, len(specs), batch):
        with sessions.begin() as s:
            if batched:
                created += sum(r.created for r in store.upsert_many(s, specs[lo:lo + batch], radius_arcsec=1.5))
            else:
                for spec in specs[lo:lo + batch]:
                    created += store.upsert(s, spec, radius_arcsec=1.5).created
    return (time.perf_counter() - t0) / len(specs), created


def time_naive(engine, rng, queries=20) -> float:
    """A cone as a box on ra/dec without any index: a scan of the table."""
    ra, dec = random_sky(rng, queries)
    r = 1.5 / 3600.0
    t0 = time.perf_counter()
    with engine.connect() as c:
        for a, b in zip(ra, dec):
            c.execute(select(Target.id).where(Target.dec.between(b - r, b + r), Target.ra.between(a - r, a + r))).all()
    return (time.perf_counter() - t0) / queries


def run_backend(kind: str, sizes: list[int], probes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    url, cleanup = scratch_database(kind, "crossmatch")

    engine = migrate.connect(url)
    migrate.upgrade(engine)
    sessions = migrate.sessions(engine)
    results = []
    try:
        have = 0
        all_ra, all_dec = np.empty(0), np.empty(0)
        for size in sizes:
            t_load = time.perf_counter()
            with sessions() as s:
                # Above every id so far (probes took ids from the sequence).
                start = max(10_000_000, repo.max_target_id(s))
            ra, dec = load(sessions, start, size - have, rng)
            all_ra, all_dec = np.r_[all_ra, ra], np.r_[all_dec, dec]
            have = size
            if kind == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.execute(text("VACUUM ANALYZE targets"))
                    c.execute(text("VACUUM ANALYZE target_names"))
            else:
                with engine.begin() as c:
                    c.execute(text("ANALYZE"))
            load_s = time.perf_counter() - t_load
            # Warm-up, then three timed rounds; the median is reported.
            time_upserts(sessions, probe_specs(rng, all_ra, all_dec, 100, f"w{size}"))
            rounds = [time_upserts(sessions, probe_specs(rng, all_ra, all_dec, probes, f"p{size}r{k}"))
                      for k in range(3)]
            per = statistics.median(r[0] for r in rounds)
            batched = statistics.median(
                time_upserts(sessions, probe_specs(rng, all_ra, all_dec, probes, f"b{size}r{k}"), batched=True)[0]
                for k in range(3))
            naive = time_naive(engine, rng)
            with sessions() as s:
                total = repo.count_targets(s)
            results.append({
                "targets": size, "rows_now": total, "upsert_us_per_object": round(per * 1e6, 1),
                "upsert_many_us_per_object": round(batched * 1e6, 1),
                "created_fraction": round(rounds[0][1] / probes, 3),
                "naive_scan_us_per_query": round(naive * 1e6, 1), "load_s": round(load_s, 1),
            })
            print(f"  {kind:10s} {size:>8d} targets: {per * 1e6:7.1f} µs/object one by one, "
                  f"{batched * 1e6:7.1f} µs/object in batches of 100  "
                  f"(naive scan {naive * 1e6:9.1f} µs/query)", file=sys.stderr, flush=True)
    finally:
        engine.dispose()
        cleanup()
    first, last = results[0], results[-1]
    return {
        "backend": kind,
        "sizes": results,
        "ratio_largest_to_smallest": round(last["upsert_us_per_object"] / first["upsert_us_per_object"], 3),
        "batched_ratio_largest_to_smallest": round(
            last["upsert_many_us_per_object"] / first["upsert_many_us_per_object"], 3),
        "naive_ratio_largest_to_smallest": round(last["naive_scan_us_per_query"] / first["naive_scan_us_per_query"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--probes", type=int, default=2000)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    out = {"benchmark": "crossmatch", "probes_per_round": args.probes, "goal_ratio": 1.5, "backends": []}
    for kind in args.backends.split(","):
        out["backends"].append(run_backend(kind, sizes, args.probes, args.seed))
    print(json.dumps(out, indent=2))
    for b in out["backends"]:
        s0, s1 = b["sizes"][0], b["sizes"][-1]
        print(f"{b['backend']}: {s0['upsert_us_per_object']} µs/object at {s0['targets']} targets, "
              f"{s1['upsert_us_per_object']} µs at {s1['targets']}: ratio {b['ratio_largest_to_smallest']} "
              f"(batched: {s0['upsert_many_us_per_object']} → {s1['upsert_many_us_per_object']} µs, ratio "
              f"{b['batched_ratio_largest_to_smallest']}; goal ≤ 1.5); naive scan ratio "
              f"{b['naive_ratio_largest_to_smallest']}", file=sys.stderr)


if __name__ == "__main__":
    main()
