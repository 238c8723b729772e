"""Rule evaluation speed: µs per alert for 1, 25 and 100 rules, with the full context.

Alerts are the shared real ZTF packets (their histories give each target a
light curve); each round builds the per-alert context (alert view, target
view, light-curve features on first use) and runs every rule, like the
engine does inside the ingest transaction (the database work around it is
not timed here: see bench/ingest.py). Also timed: the reasons written for
not-fired verdicts, and one visibility check per alert (LCO network, 24 h).

Also the engine's own verdict path (``RuleEngine.decide``): the reason and
the decision row it writes for every rule and alert, per rule, and per verdict
on a built context, for "not fired" (the common case) and "all clauses true"
(every clause's values; a firing in the daemon, whose database work is
bench/ingest.py's). One rule template asks visible(), cached per alert.

Prints one JSON object and human lines; saves bench/results/rules.json.
Usage: ``python bench/rules.py [ROUNDS]``. Goal: <= 2 µs per rule per alert.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from tomd.alerts.parse import parse_message
from tomd.rules.context import AlertView, Context, Point, TargetView, mjd_of
from tomd.rules.expr import compile_expression

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ztf"

TEMPLATES = [
    "alert.mag < {m} and alert.fields.real_bogus > {rb} and target.n_detections >= 2 and target.age_days < {age} "
    "and target.rise_rate > {rate} and abs(target.gal_b) > 10",
    "alert.source in ['ztf', 'rubin'] and alert.fields.sgscore1 < {sg} and target.peak_mag < {m}",
    "target.decline_rates.g > {rate} and target.n_detections > {n} and alert.fields.drb > {rb}",
    "color('g', 'r') < {c} and alert.fields.distnr >= 0 and alert.fields.distnr < {d}",
    "'monitor' in target.lists and target.since_last_days < {age}",
    "alert.payload.candidate.magpsf - alert.fields.diffmaglim < {c} and log10(alert.fields.ndethist + 1) > {l}",
    "max(target.rise_rates.g, target.rise_rates.r) > {rate} and known(target.extras.redshift) == False",
    "in_circle(alert.ra, alert.dec, {ra}, {dec}, 20) or abs(alert.dec) > 80",
    # Every rule asks the same question of the sky, so the context computes it once per alert.
    "alert.mag < {m} and visible('lco', hours=24, max_airmass=2)",
]


def as_rules(compiled):
    """Rule objects around compiled expressions, for the engine's own verdict path."""
    from tomd.rules.load import Rule

    return [Rule(name=f"r{i}", when=c, add_tags=("x",)) for i, c in enumerate(compiled)]


def run_engine(alerts_ctx, rules, rounds, repeat=3):
    """µs per alert through RuleEngine.decide: verdict, reason with values, the decision row as written.

    The alerts have no target, so a rule whose clauses all hold ends "not fired: no target" after
    building its reason from every clause's values (the most a not-fired verdict costs); the rows'
    COPY into the database is bench/ingest.py's.
    """
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from tomd.rules.engine import RuleEngine

    eng = RuleEngine(rules, facility_kinds={"lco": "lco"})
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    best = float("inf")
    outcomes: dict[str, int] = {}
    for _ in range(repeat):
        n = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            for a, now_mjd, row, pts in alerts_ctx:
                c = Context(AlertView(a, 1), TargetView(row, tags=(), lists=("monitor",) if row["id"] % 7 == 0
                                                        else (), points=pts, now_mjd=now_mjd), now_mjd,
                            facility_kinds={"lco": "lco"})
                st = SimpleNamespace(alert_id=1, target_id=None, alert=a, coords="bench")
                buffered: list = []
                for r in rules:
                    eng.decide(None, r, st, c, now, None, buffered)
                n += 1
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def engine_outcomes(alerts_ctx, rules) -> dict[str, int]:
    from collections import Counter
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from tomd.rules.engine import RuleEngine

    eng = RuleEngine(rules, facility_kinds={"lco": "lco"})
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    out: Counter = Counter()
    for a, now_mjd, row, pts in alerts_ctx:
        c = Context(AlertView(a, 1), TargetView(row, tags=(), lists=(), points=pts, now_mjd=now_mjd), now_mjd,
                    facility_kinds={"lco": "lco"})
        st = SimpleNamespace(alert_id=1, target_id=None, alert=a, coords="bench")
        for r in rules:
            v = eng.decide(None, r, st, c, now, None, [])
            out["all true (no target)" if "no target" in v.reason else v.outcome] += 1
    return dict(out)


def verdict_costs(alerts_ctx, rules, repeat=7) -> dict[str, float]:
    """µs per verdict through RuleEngine.decide: not fired (the first false clause and its values, the
    row as written) and all clauses true (every clause's values; "no target" here, a firing in the daemon)."""
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from tomd.rules.engine import RuleEngine

    eng = RuleEngine(rules, facility_kinds={"lco": "lco"})
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    pairs = []
    for a, now_mjd, row, pts in alerts_ctx:
        c = Context(AlertView(a, 1), TargetView(row, tags=(), lists=(), points=pts, now_mjd=now_mjd), now_mjd,
                    facility_kinds={"lco": "lco"})
        st = SimpleNamespace(alert_id=1, target_id=None, alert=a, coords="bench")
        for r in rules:
            eng.decide(None, r, st, c, now, None, [])  # builds what the context caches
            pairs.append((r, c, st, r.when.first_false(*c.args()) >= 0))
    out = {}
    for name, want in (("not_fired", True), ("all_true", False), ("evaluation_only", None)):
        items = [p for p in pairs if want is None or p[3] is want]
        best = float("inf")
        for _ in range(repeat):
            buf: list = []
            t0 = time.perf_counter()
            if want is None:
                for r, c, st, _ in items:
                    r.when.first_false(*c.args())
            else:
                for r, c, st, _ in items:
                    eng.decide(None, r, st, c, now, None, buf)
            best = min(best, (time.perf_counter() - t0) / max(1, len(items)) * 1e6)
        out[name] = round(best, 3)
        out[f"{name}_count"] = len(items)
    return out


def make_rules(n: int, rng: random.Random):
    out = []
    for i in range(n):
        t = TEMPLATES[i % len(TEMPLATES)]
        text = t.format(m=rng.uniform(16, 20), rb=rng.uniform(0.3, 0.9), age=rng.uniform(1, 30),
                        rate=rng.uniform(0.01, 0.3), sg=rng.uniform(0.2, 0.8), n=rng.randint(1, 10),
                        c=rng.uniform(-0.5, 0.5), d=rng.uniform(0.3, 2), l=rng.uniform(0.2, 1),
                        ra=rng.uniform(0, 360), dec=rng.uniform(-30, 60))
        out.append(compile_expression(text))
    return out


def load_alerts():
    alerts = []
    for p in sorted(DATA.rglob("*.avro")):
        alerts.extend(parse_message("ztf-avro", p.read_bytes()))
    return alerts


def contexts(alerts, rng):
    for i, a in enumerate(alerts):
        now = mjd_of(a.time) + 0.01
        pts = [Point(p.mjd, p.band, p.kind, p.mag, p.limit) for p in a.photometry]
        row = {"id": i, "name": a.object_id, "ra": a.ra, "dec": a.dec, "gal_l": rng.uniform(0, 360),
               "gal_b": rng.uniform(-90, 90), "extras": {}}
        yield a, now, row, pts


def run(alerts_ctx, rules, rounds, reasons=False, repeat=5):
    """µs per alert: the best of ``repeat`` runs (other processes only ever add time)."""
    return min(_run(alerts_ctx, rules, rounds, reasons) for _ in range(repeat)), None


def _run(alerts_ctx, rules, rounds, reasons=False):
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for a, now, row, pts in alerts_ctx:
            c = Context(AlertView(a, 1), TargetView(row, tags=(), lists=("monitor",) if row["id"] % 7 == 0 else (),
                                                    points=pts, now_mjd=now), now, facility_kinds={"lco": "lco"})
            args = c.args()
            for r in rules:
                i = r.first_false(*args)
                if reasons and i >= 0:
                    r.json_values(i, *args)  # what a not-fired row keeps
            n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    rng = random.Random(7)
    alerts = load_alerts()
    if not alerts:
        print(json.dumps({"error": f"no ZTF samples under {DATA}"}))
        return 1
    ctxs = list(contexts(alerts, rng))
    result = {"benchmark": "rules", "alerts": len(alerts), "rounds": rounds, "per_alert_us": {},
              "per_rule_per_alert_us": {}, "with_reasons_per_alert_us": {}}
    base, _ = run(ctxs, [], rounds)  # context only (no rule reads the features)
    result["context_only_per_alert_us"] = round(base, 2)
    # Context + every light-curve feature and colour computed (what the first rule reading them pays).
    feats = [compile_expression("target.n_detections >= 0 and target.rise_rate > -99 and color('g', 'r') > -99")]
    full, _ = run(ctxs, feats, rounds)
    result["context_with_features_per_alert_us"] = round(full, 2)
    for n in (1, 25, 100):
        rules = make_rules(n, rng)
        run(ctxs, feats + rules, 1)  # warm
        us, _ = run(ctxs, feats + rules, rounds)
        full = min(full, run(ctxs, feats, rounds)[0])  # measured next to it: the machine's load varies
        rus, _ = run(ctxs, feats + rules, max(1, rounds // 4), reasons=True)
        result["per_alert_us"][str(n)] = round(us, 2)
        # The marginal cost of a rule, once the per-alert context is built.
        result["per_rule_per_alert_us"][str(n)] = round((us - full) / n, 3)
        result["with_reasons_per_alert_us"][str(n)] = round(rus, 2)
    result["context_with_features_per_alert_us"] = round(full, 2)
    # The engine's verdict path: what each rule costs with the reason the engine always writes.
    # Measured against the same context (features, one visible()) in alternation, best of each:
    # the machine is shared, and other processes only ever add time.
    result["engine_per_alert_us"], result["engine_per_rule_per_alert_us"] = {}, {}
    vis = [compile_expression("alert.mag > -99 and visible('lco', hours=24, max_airmass=2)")]
    base_rules = as_rules(feats + vis)
    base_engine = float("inf")
    for n in (1, 25, 100):
        rules = as_rules(feats + vis + make_rules(n, random.Random(11)))
        run_engine(ctxs, rules, 1, repeat=1)  # warm
        us = float("inf")
        for _ in range(4):
            base_engine = min(base_engine, run_engine(ctxs, base_rules, max(1, rounds // 4), repeat=1))
            us = min(us, run_engine(ctxs, rules, max(1, rounds // 4), repeat=1))
        result["engine_per_alert_us"][str(n)] = round(us, 2)
        # One rule's share is below the context's own jitter (its visibility, ~20 µs): not reported.
        result["engine_per_rule_per_alert_us"][str(n)] = round((us - base_engine) / n, 3) if n > 1 else None
    result["engine_context_with_features_and_visibility_per_alert_us"] = round(base_engine, 2)
    # Verdicts by outcome for the 100 rules (what the reasons were), and one verdict's cost by path,
    # the context already built (its features computed): the rule's own share.
    rules100 = as_rules(make_rules(100, random.Random(11)))
    result["engine_outcomes_100"] = engine_outcomes(ctxs, rules100)
    result["engine_verdict_us"] = verdict_costs(ctxs, rules100)
    # One visibility check per alert (the day's Sun/Moon grid is cached after the first).
    from tomd import visibility

    a0, now0, _, _ = ctxs[0]
    visibility.observability(visibility.FACILITY_SITES["lco"], 10.0, 10.0, now0, 24)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        k = 0
        for _ in range(max(1, rounds // 4)):
            for a, now, row, pts in ctxs:
                visibility.observability(visibility.FACILITY_SITES["lco"], a.ra, a.dec, now0, 24)
                k += 1
        best = min(best, (time.perf_counter() - t0) / k * 1e6)
    result["visibility_lco_24h_per_alert_us"] = round(best, 1)
    result["goal_per_rule_per_alert_us"] = 2.0
    print(json.dumps(result))
    out = Path(__file__).resolve().parent / "results" / "rules.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    p = result["per_alert_us"]
    print(f"rules: {p['1']:.1f} / {p['25']:.1f} / {p['100']:.1f} µs per alert for 1 / 25 / 100 rules "
          f"({result['per_rule_per_alert_us']['100']:.2f} µs per rule at 100 on top of the context: "
          f"{base:.1f} µs, {full:.1f} µs with every light-curve feature; "
          f"with not-fired reasons {result['with_reasons_per_alert_us']['100']:.1f} µs at 100); "
          f"visibility {result['visibility_lco_24h_per_alert_us']:.0f} µs per alert; {len(alerts)} ZTF alerts x {rounds}")
    e = result["engine_per_rule_per_alert_us"]
    v = result["engine_verdict_us"]
    print(f"engine verdicts with reasons: {e['25']:.2f} / {e['100']:.2f} µs per rule per alert "
          f"for 25 / 100 rules, features and one visible() included (goal {result['goal_per_rule_per_alert_us']:g}); "
          f"one verdict on a built context: not fired {v['not_fired']:.2f} µs ({v['not_fired_count']}), "
          f"all clauses true {v['all_true']:.2f} µs ({v['all_true_count']}), the evaluation alone "
          f"{v['evaluation_only']:.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
