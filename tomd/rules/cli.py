"""``tomd rule check | explain | backtest``.

``register(subparsers)`` adds the ``rule`` command group to tomd's parser;
each command is ``cmd_rule_*(app, args) -> exit status`` like the others in
tomd/cli.py (``app`` gives ``config`` and ``sessions``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tomd.errors import InputError, NotFoundError


def register(subparsers) -> None:
    """Add ``tomd rule ...`` to the top-level subparsers of tomd/cli.py."""
    rule = subparsers.add_parser("rule", help="rule files: check, explain, backtest").add_subparsers(
        dest="sub", required=True, metavar="SUB")

    def leaf(name, func, help_):
        q = rule.add_parser(name, help=help_, description=help_)
        q.set_defaults(func=func)
        return q

    q = leaf("check", cmd_rule_check, "check rule files; every problem as FILE:LINE:COL: message, exit 1 if any")
    q.add_argument("paths", nargs="*", help="files or directories (default: rules.paths from the config)")
    q = leaf("explain", cmd_rule_explain, "each rule's verdict on an alert and the clause that decided")
    q.add_argument("alert_id", type=int)
    q.add_argument("--json", action="store_true")
    q = leaf("backtest", cmd_rule_backtest,
             "replay alerts in time order through the rules (each target's history as it stood then)")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--alerts", nargs="+", metavar="FILE", help="alert files (Avro, JSON, XML, GCN binary)")
    src.add_argument("--since", metavar="DATE", help="alerts stored in the database from this UTC date/time on")
    q.add_argument("--until", metavar="DATE", help="with --since: up to this date/time")
    q.add_argument("--rules", nargs="+", metavar="PATH", help="rule files or directories (default: rules.paths)")
    q.add_argument("--format", default="auto", help="with --alerts: alert format (default: guess)")
    q.add_argument("--stream", metavar="NAME",
                   help="with --alerts: the [[streams]] name the files stand for, for rules that select by "
                        "stream (stored alerts know their own)")
    q.add_argument("--assume-old", "--assume-old-tags", dest="assume_old_tags", action="store_true",
                   help="count tags, list memberships and target extras of unknown time (added or set before "
                        "tomd kept the time) as present from the start (default: absent)")
    q.add_argument("--json", action="store_true")


def _env(app):
    from tomd.rules.engine import load_features
    from tomd.rules.load import RuleEnv

    config = app.config
    features = load_features(getattr(config.rules, "features", None) or {})
    return config, features, RuleEnv.from_config(config, features.keys())


def cmd_rule_check(app, args) -> int:
    from tomd.rules.load import load_paths

    config, _, env = _env(app)
    paths = args.paths or list(config.rules.paths)
    rules, problems = load_paths(paths, env)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        names = ", ".join(f"{r.name}{' (test)' if r.mode == 'test' else ''}" for r in rules)
        print(f"{len(rules)} rule{'s' if len(rules) != 1 else ''} OK" + (f": {names}" if names else ""))
    if env.streams is None and any(r.streams for r in rules):
        print("note: no config file with [[streams]]: the stream names rules listen to were not checked",
              file=sys.stderr)
    return 1 if problems else 0


def cmd_rule_explain(app, args) -> int:
    from tomd.db import repository as repo
    from tomd.rules.engine import full_reason

    with app.sessions() as s:
        alert = repo.get_alert(s, args.alert_id)
        if alert is None:
            raise NotFoundError(f"no alert #{args.alert_id}")
        rows = []
        for d in repo.decisions_of_alert(s, args.alert_id):
            req = repo.request_of_decision(s, d.id) if d.outcome == "fired" else None
            rows.append({"rule": d.rule, "outcome": d.outcome, "reason": full_reason(d.reason, d.details),
                         "decision_id": d.id,
                         "rule_version": d.rule_version, "at": d.created_at.isoformat(),
                         "request": {"id": req.id, "name": req.name, "state": req.state} if req else None,
                         "details": d.details})
        head = {"alert_id": alert.id, "source": alert.source, "key": alert.key, "object_id": alert.object_id,
                "time": alert.time.isoformat(), "target_id": alert.target_id, "stream": alert.stream,
                "kind": alert.kind}
    if args.json:
        print(json.dumps({"alert": head, "decisions": rows}, indent=2, default=str))
        return 0
    # A notice whose localisation is too large to be one object (a GW skymap) has no target.
    target = f"target #{head['target_id']}" if head["target_id"] is not None else "no target"
    name = f" {head['object_id']}" if head["object_id"] else ""
    print(f"alert #{head['alert_id']} {head['source']} {head['key']}{name} at {head['time']}"
          f" ({target}" + (f", stream {head['stream']})" if head["stream"] else ")"))
    if not rows:
        # Rules that do not listen record nothing: name every selector they could have missed on.
        on = f"stream {head['stream']!r}" if head["stream"] else "an unrecorded stream"
        print("  no verdicts recorded: no rule was loaded when it was ingested, or none listens to "
              f"source {head['source']!r}, kind {head['kind']!r} on {on}")
    width = max((len(r["rule"]) for r in rows), default=0)
    for r in rows:
        extra = f"  → request {r['request']['name']} ({r['request']['state']})" if r["request"] else ""
        print(f"  {r['rule']:<{width}}  {r['outcome']:<12}  {r['reason']}{extra}")
    return 0


# ---------------------------------------------------------------- backtest --

def _parse_date(text: str, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"expected a date like 2025-03-01 or 2025-03-01T12:00, got {text!r}", field=what) from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _alerts_from_files(paths: list[str], fmt: str):
    from tomd.alerts.parse import parse_message
    from tomd.errors import AlertError

    out, bad = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InputError("no such file", where=str(path))
        try:
            out.extend(parse_message(fmt, path.read_bytes(), include_test=False))
        except AlertError as exc:
            bad.append(f"{path}: {exc}")
    return out, bad


def _alerts_from_db(app, since: datetime, until: datetime | None, notes: list[str] | None = None,
                    target_ids: set[int] | None = None, streams: dict[tuple[str, str], str | None] | None = None):
    """Stored alerts rebuilt as Alerts, each with the photometry it brought (so the replay sees no future).

    ``streams`` is filled with each alert's stream, by ``(source, key)``.

    A notice alert (GRB, GW) is rebuilt with its OWN localisation, notice type
    and retraction, never the notice row's (which later refinements
    overwrite): the alert row keeps ra/dec, and the ``notice.received`` event
    written with it keeps error_deg, notice_type and whether the event was
    retracted by then. Where those events are gone (the k-th event of a
    notice no longer matches its k-th alert), only the notice's latest alert
    takes the notice row; the others get no error circle, and ``notes`` says
    how many.
    """
    from tomd.alerts.model import Alert, Localization, PhotPoint
    from tomd.db import repository as repo
    from tomd.db.models import Notice

    out = []
    unknown_loc = 0
    with app.sessions() as s:
        rows = repo.alerts_since(s, since)
        if until is not None:
            rows = [r for r in rows if r.time < until]
        notice_ids = sorted({r.notice_id for r in rows if r.notice_id})
        order = repo.notice_alert_ids(s, notice_ids)
        received = repo.notice_received_payloads(s, notice_ids)
        # Every alert's points in a few queries by target (photometry.alert_id has no index: a query
        # per alert scanned the table each time); popped as used, so the rows go as the Alerts grow.
        phot = repo.photometry_of_alerts(s, [(r.id, r.target_id) for r in rows])
        for row in rows:
            if target_ids is not None and row.target_id is not None:
                target_ids.add(row.target_id)
            if streams is not None:
                streams[(row.source, row.key)] = row.stream
            pts = tuple(PhotPoint(mjd=p.mjd, band=p.band, kind=p.kind, mag=p.mag, mag_err=p.mag_err, flux=p.flux,
                                  flux_err=p.flux_err, limit=p.limit, source=p.source)
                        for p in phot.pop(row.id, ()))
            event_id = notice_type = loc = None
            retraction = False
            if row.notice_id:
                notice = s.get(Notice, row.notice_id)
                ids, evs = order.get(row.notice_id, []), received.get(row.notice_id, [])
                own = evs[ids.index(row.id)] if len(ids) == len(evs) and row.id in ids else None
                if own is not None:
                    notice_type, retraction = own.get("notice_type"), bool(own.get("retracted"))
                    ra = own.get("ra") if own.get("ra") is not None else row.ra
                    dec = own.get("dec") if own.get("dec") is not None else row.dec
                    loc = Localization(ra, dec, own.get("error_deg"), None, None,
                                       notice.area_90_deg2 if notice is not None and ids[-1] == row.id else None)
                elif notice is not None and ids and ids[-1] == row.id:  # the latest: the row is its own
                    notice_type, retraction = notice.notice_type, bool(notice.retracted)
                    loc = Localization(notice.ra, notice.dec, notice.error_deg, None, None, notice.area_90_deg2)
                else:
                    unknown_loc += 1
                    loc = Localization(row.ra, row.dec, None) if row.ra is not None else None
                event_id = notice.event_id if notice is not None else None
            out.append(Alert(source=row.source, key=row.key, time=row.time, kind=row.kind, object_id=row.object_id,
                             ra=row.ra, dec=row.dec, band=row.band, mag=row.mag, mag_err=row.mag_err, flux=row.flux,
                             flux_err=row.flux_err, photometry=pts, event_id=event_id, notice_type=notice_type,
                             localization=loc, retraction=retraction,
                             fields=dict(row.fields or {}), payload=dict(row.payload or {})))
    if unknown_loc and notes is not None:
        notes.append(f"{unknown_loc} notice alert(s) replayed without an error circle: their notice.received events "
                     "are no longer in the outbox, and the notices table holds only the latest refinement")
    return out


#: What a replay cannot know: said with every report.
HISTORY_NOTE = ("tags and list memberships count from when they were added (added_at), target.extras keys from "
                "when they were last set (extras_set_at): each alert saw those of stored targets added or set "
                "at or before its time, and what the replayed rules had added by then; an extra changed after "
                "an alert is absent for it (its earlier value is not kept); "
                "no earlier requests or decisions exist for limits and duplicates")
UNKNOWN_TIME_NOTE = ("{n} tag(s)/list membership(s) of these targets have no time (added before tomd kept it): "
                     "{how}")
UNKNOWN_EXTRAS_NOTE = ("{n} target.extras key(s) of these targets have no time (set before tomd kept it): "
                       "{how}")


def _history_from_db(app, alerts, target_ids: set[int], match_radius_arcsec: float) -> dict[str, list]:
    """The stored targets the replayed alerts belong to, with names, tags and lists (their times), to seed a replay.

    Stored alerts name their target; alerts from files are matched to stored
    targets by object name, then by position (``targets.match_radius_arcsec``).
    """
    from tomd.db import repository as repo
    from tomd.sky import cone_ranges, separation_deg
    from tomd.targets.names import normalize

    ids = set(target_ids)
    with app.sessions() as s:
        norms = sorted({normalize(a.object_id) for a in alerts if a.object_id} - {""})
        ids.update(repo.target_id_by_norm(s, norms).values())
        r_deg = match_radius_arcsec / 3600.0
        for a in alerts:
            if a.ra is None or a.dec is None or (a.localization is not None and a.localization.error_deg):
                continue  # a notice's error circle is not a target's position
            for tid, (ra, dec) in repo.targets_in_range_set(s, cone_ranges(a.ra, a.dec, r_deg)).items():
                if separation_deg(a.ra, a.dec, ra, dec) <= r_deg:
                    ids.add(tid)
        # The targets' rows as they are, extras and their times (extras_set_at) included: the engine's
        # as_of mode shows each alert only the keys set by then.
        return repo.target_history_rows(s, sorted(ids))


def backtest(alerts, rules, *, facility_kinds=None, features=None, match_radius_arcsec: float = 1.5,
             history: dict[str, list] | None = None, assume_old_tags: bool = False,
             stream_of: Callable[[Any], str | None] | None = None) -> dict[str, Any]:
    """Replay ``alerts`` in time order through ``rules`` in a scratch SQLite database; the report as a dict.

    Each alert is ingested on its own, then judged with "now" = its time, so
    a rule sees the target's history as it stood at that alert and never
    later (the limits and duplicates likewise see only earlier decisions).
    ``history`` (from :func:`_history_from_db`) seeds the scratch database
    with stored targets; their tags and list memberships count from their
    ``added_at`` on, their extras keys from their ``extras_set_at`` time on,
    those without a time only with ``assume_old_tags`` (``--assume-old``).
    ``stream_of(alert)`` gives the stream an alert arrived on, for rules that
    select by stream (None: unknown; such rules then do not judge it, and
    the report warns).
    """
    from dataclasses import replace

    from sqlalchemy import select

    from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
    from tomd.db import migrate, repository as repo
    from tomd.db.models import ObservationRequest, TargetName
    from tomd.rules.engine import RuleEngine, RuleSet, facility_longitude, night_of

    alerts = sorted(alerts, key=lambda a: a.time)
    stream_of = stream_of or (lambda a: None)
    with tempfile.TemporaryDirectory(prefix="tomd-backtest-") as tmp:
        engine = migrate.connect(f"sqlite:///{tmp}/backtest.db")
        migrate.upgrade(engine)
        sessions = migrate.sessions(engine)
        unknown_time = unknown_extras = 0
        if history:
            with sessions.begin() as s:
                repo.seed_target_history(s, history)
            unknown_time = sum(1 for r in history.get("tags", []) + history.get("members", [])
                               if r.get("added_at") is None)
            unknown_extras = sum(1 for t in history.get("targets", []) for k in (t.get("extras") or {})
                                 if k not in (t.get("extras_set_at") or {}))
        eng = RuleEngine(RuleSet.of(rules), facility_kinds=facility_kinds, features=features,
                         clock=lambda st: st.alert.time, as_of=True, assume_old_tags=assume_old_tags)
        by_index = {str(i).encode(): a for i, a in enumerate(alerts)}

        def judge(s, stored) -> None:
            # The scratch ingest is one stream of its own: each alert goes to the rules with the stream it came on.
            eng(s, [replace(st, stream=stream_of(st.alert)) for st in stored])

        ing = Ingestor(sessions, IngestSettings(stream="backtest", format="backtest", include_test=False,
                                                match_radius_arcsec=match_radius_arcsec, keep_payload=False),
                       lambda data: [by_index[data]], sinks=[judge])
        for i in range(len(alerts)):
            ing.handle([FileMessage("backtest", i, str(i).encode())])
        with sessions() as s:
            rows = [(d.rule, d.outcome, d.reason, d.target_id, d.created_at, d.details, d.id)
                    for d in repo.all_verdicts(s)]
            hours = {r.decision_id: r.estimated_hours or 0.0 for r in s.scalars(select(ObservationRequest))}
            names = {t: n for t, n in s.execute(select(TargetName.target_id, TargetName.name)
                                                 .where(TargetName.primary.is_(True)))}
        engine.dispose()
    n_alerts = ing.totals.alerts
    report: dict[str, Any] = {"alerts": n_alerts, "duplicates_skipped": ing.totals.duplicates,
                              "first": alerts[0].time.isoformat() if alerts else None,
                              "last": alerts[-1].time.isoformat() if alerts else None, "rules": {}, "warnings": [],
                              "notes": [HISTORY_NOTE]}
    how = ("counted as present from the start (--assume-old)" if assume_old_tags
           else "left out of every replayed alert (--assume-old counts them as present)")
    if unknown_time:
        report["notes"].append(UNKNOWN_TIME_NOTE.format(n=unknown_time, how=how))
    if unknown_extras:
        report["notes"].append(UNKNOWN_EXTRAS_NOTE.format(n=unknown_extras, how=how))
    per: dict[str, dict[str, Any]] = {}
    lon: dict[str, float] = {}
    for r in rules:
        per[r.name] = {"mode": r.mode, "evaluated": 0, "outcomes": Counter(), "firings": 0, "nights": {},
                       "targets": set(), "estimated_hours": 0.0}
        # Nights as the engine's limits count them: noon to noon at the facility's first site (UTC without one).
        lon[r.name] = facility_longitude(facility_kinds or {}, r.observe.facility if r.observe else None)
    for rule, outcome, reason, tid, at, details, did in rows:
        p = per[rule]
        p["evaluated"] += 1
        p["outcomes"][outcome] += 1
        fires = outcome == "fired" or (outcome == "test" and reason.startswith("would fire"))
        if fires:
            p["firings"] += 1
            if outcome == "fired":
                h = hours.get(did, 0.0)
            else:
                h = (((details or {}).get("would") or {}).get("observe") or {}).get("estimated_hours") or 0.0
            p["estimated_hours"] += h
            n = p["nights"].setdefault(night_of(at, lon[rule])[1], {"firings": 0, "targets": set(),
                                                                     "estimated_hours": 0.0})
            n["firings"] += 1
            n["estimated_hours"] += h
            if tid is not None:
                p["targets"].add(tid)
                n["targets"].add(tid)

    def named(tids) -> list[str]:
        return sorted(names.get(t, f"#{t}") for t in tids)

    for name, p in per.items():
        frac = p["firings"] / p["evaluated"] if p["evaluated"] else 0.0
        nights = dict(sorted(p["nights"].items()))
        report["rules"][name] = {
            "mode": p["mode"], "evaluated": p["evaluated"], "outcomes": dict(p["outcomes"]), "firings": p["firings"],
            "fraction": round(frac, 4), "per_night": {k: v["firings"] for k, v in nights.items()},
            "targets": len(p["targets"]), "target_names": named(p["targets"]),
            "estimated_hours": round(p["estimated_hours"], 3),
            "nights": {k: {"firings": v["firings"], "targets": named(v["targets"]),
                           "estimated_hours": round(v["estimated_hours"], 3)} for k, v in nights.items()},
        }
        if p["evaluated"] and frac > 0.05:
            report["warnings"].append(f"rule {name} fires on {100 * frac:.1f}% of the {p['evaluated']} alerts it "
                                      "saw (more than 5%): is the condition too loose?")
    # A rule that selects by stream judges no alert of unknown stream: say so, or its silence looks like a verdict.
    seen: dict[tuple[str, str], tuple[Any, str | None]] = {}  # (source, key) → (alert, stream), as ingested
    for a in alerts:
        seen.setdefault((a.source, a.key), (a, stream_of(a)))
    report["streams"] = dict(Counter(st if st is not None else "(unknown)" for _, st in seen.values()))
    for r in rules:
        if not r.streams:
            continue
        # Alerts it would have judged had their stream been one of its own (its sources and kinds match).
        unknown = sum(1 for a, st in seen.values() if st is None and r.listens_to(a.source, a.kind, r.streams[0]))
        if unknown:
            report["warnings"].append(
                f"rule {r.name} listens only to stream{'s' if len(r.streams) > 1 else ''} {', '.join(r.streams)}, "
                f"and {unknown} alert(s) of its sources and kinds came on no known stream: it judged none of them "
                "(alert files: give --stream NAME for the stream they stand for)")
    return report


def cmd_rule_backtest(app, args) -> int:
    from tomd.rules.load import load_paths

    config, features, env = _env(app)
    rules, problems = load_paths(args.rules or list(config.rules.paths), env)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    if not rules:
        raise InputError("no rules to test", field="--rules")
    bad: list[str] = []
    notes: list[str] = []
    tids: set[int] = set()
    stream = getattr(args, "stream", None)
    if args.alerts:
        if stream is not None and env.streams is not None and stream not in env.streams:
            known = ", ".join(sorted(env.streams)) or "none configured"
            raise InputError(f"no stream named {stream!r} (streams: {known})", field="--stream")
        alerts, bad = _alerts_from_files(args.alerts, args.format)
        stream_of = lambda a: stream  # noqa: E731 - every file stands for the one stream named
    else:
        if stream is not None:
            raise InputError("only with --alerts: stored alerts are replayed with the stream they came on",
                             field="--stream")
        stored: dict[tuple[str, str], str | None] = {}
        alerts = _alerts_from_db(app, _parse_date(args.since, "--since"),
                                 _parse_date(args.until, "--until") if args.until else None, notes, tids, stored)
        stream_of = lambda a: stored.get((a.source, a.key))  # noqa: E731
    for b in bad:
        print(f"skipped: {b}", file=sys.stderr)
    radius = config.targets.match_radius_arcsec
    history = None
    if args.alerts:
        # Alerts from files: stored targets they match bring their tags and lists; no database, none.
        from sqlalchemy.exc import DBAPIError

        from tomd.errors import UserError

        why = "no database"
        try:
            history = _history_from_db(app, alerts, tids, radius) if app.sessions is not None else None
        except (DBAPIError, UserError) as exc:
            why = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
        if history is None:
            notes.append(f"targets start empty: no stored targets were read ({why}), so target.tags and "
                         "target.lists hold only what the replayed rules added, and target.extras are empty")
    else:
        history = _history_from_db(app, alerts, tids, radius)
    report = backtest(alerts, rules, facility_kinds=env.facility_kinds, features=features,
                      match_radius_arcsec=radius, history=history,
                      assume_old_tags=getattr(args, "assume_old_tags", False), stream_of=stream_of)
    report["notes"] = notes + report["notes"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        by_stream = ", ".join(f"{k} {v}" for k, v in sorted(report["streams"].items()))
        print(f"{report['alerts']} alerts replayed ({report['first']} .. {report['last']})"
              + (f"; streams: {by_stream}" if set(report["streams"]) - {"(unknown)"} else ""))
        for name, r in report["rules"].items():
            oc = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
            print(f"  {name}{' (test)' if r['mode'] == 'test' else ''}: fired {r['firings']} "
                  f"({100 * r['fraction']:.1f}%) on {r['targets']} targets, {r['estimated_hours']:.2f} h "
                  f"estimated; {oc}")
            for night, n in r["nights"].items():
                shown = ", ".join(n["targets"][:10]) + (f" and {len(n['targets']) - 10} more"
                                                        if len(n["targets"]) > 10 else "")
                print(f"      night of {night}: {n['firings']}, {n['estimated_hours']:.2f} h: {shown}")
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        for note in report["notes"]:
            print(f"note: {note}", file=sys.stderr)
    return 0
