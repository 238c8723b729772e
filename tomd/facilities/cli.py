"""``tomd obs …`` (submit, list, show, update, cancel, settle), ``tomd facility check`` and ``tomd sim``.

``register(subparsers)`` adds the three command groups to tomd's parser;
each command is ``cmd_*(app, args) -> exit status`` like those in
``tomd.cli`` (``app`` gives ``config`` and ``sessions``). User mistakes raise
``UserError`` subclasses, which ``tomd.cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from tomd.errors import InputError, NotFoundError, PermanentError, RetryableError, TomdError

FINAL_LOCAL = ("completed", "failed", "expired", "cancelled", "rejected")
# Every state an observation request can be in, in its life's order (tomd.submit, tomd.status).
REQUEST_STATES = ("intent", "submitting", "pending", "scheduled", "in_progress", "completed", "failed", "expired",
                  "cancelled", "rejected")


def _parse_time(value: str, field: str, *, after: datetime | None = None) -> datetime:
    """ISO-8601 (UTC unless it says otherwise), "now", or a duration after START ("24h", "+2d")."""
    v = value.strip()
    if v == "now":
        return datetime.now(timezone.utc)
    if after is not None:
        from tomd.config import _Invalid, parse_duration

        try:
            return after + timedelta(seconds=parse_duration(v.lstrip("+")))
        except _Invalid:
            pass
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f'expected an ISO-8601 time (2026-11-24T03:00:00Z), "now"'
                         f'{" or a duration like 24h" if after else ""}, got {value!r}', field=field) from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _row_dict(r: Any, target_name: str | None = None) -> dict[str, Any]:
    iso = lambda t: t.isoformat() if t else None  # noqa: E731
    return {
        "id": r.id, "name": r.name, "target_id": r.target_id, "target": target_name, "facility": r.facility,
        "template": r.template, "mode": r.mode, "priority": r.priority, "state": r.state,
        "facility_state": r.facility_state, "facility_id": r.facility_id, "attempts": r.attempts,
        "decision_id": r.decision_id, "window_start": iso(r.window_start), "window_end": iso(r.window_end),
        "created_at": iso(r.created_at), "submitted_at": iso(r.submitted_at), "last_error": r.last_error,
        "cadence": _cadence_text(r.cadence), "series": r.parent_id,
    }


def _cadence_text(value: Any) -> str | None:
    """A stored cadence in its own words, with the request's place in the series."""
    if not value or "spec" not in value:
        return None
    from tomd.cadence import Cadence

    try:
        text = Cadence.from_json(value["spec"]).describe()
    except (TypeError, ValueError):
        return str(value)
    seq, attempt = value.get("seq", 0), value.get("attempt", 0)
    return f"{text} (repeat {seq + 1}" + (f", retry {attempt}" if attempt else "") + ")"


def _find_row(s, key: str):
    from tomd.db import repository as repo

    k = key.strip()
    row = None
    if k.lstrip("#").isdigit():
        row = repo.get_observation(s, int(k.lstrip("#")))
    if row is None:
        row = repo.observation_by_name(s, k)
    if row is None:
        raise NotFoundError(f"no observation request {key!r} (give its id or name)")
    return row


def _facility_config(app, name: str):
    facilities = app.config.facilities
    if name not in facilities:
        known = ", ".join(sorted(facilities)) or "none configured"
        raise InputError(f"no facility {name!r} in the config (configured: {known})", field="--facility")
    return facilities[name]


# ---------------------------------------------------------------- commands --


def cmd_obs_submit(app, args) -> int:
    from tomd.facilities import open_facilities
    from tomd.submit import SubmitSettings, Submitter, create_intent
    from tomd.targets.store import resolve

    cfg = _facility_config(app, args.facility)
    start = end = None
    if args.window:
        start = _parse_time(args.window[0], "--window START")
        end = _parse_time(args.window[1], "--window END", after=start)
        if end <= start:
            raise InputError("the window must end after it starts", field="--window")
    from tomd.cadence import cadence_option

    cadence = cadence_option(args.cadence)  # checked before anything is recorded
    mode = args.mode.upper() if args.mode else None
    if mode and mode not in ("NORMAL", "RAPID_RESPONSE", "TIME_CRITICAL"):
        raise InputError(f"expected NORMAL, RAPID_RESPONSE or TIME_CRITICAL, got {args.mode!r}", field="--mode")
    from tomd.facilities import SIM_TEMPLATES

    templates = cfg.templates or (SIM_TEMPLATES if cfg.kind == "sim" else {})
    if args.template not in templates:
        raise InputError(f"facility {args.facility} has no template {args.template!r} "
                         f"(known: {', '.join(sorted(templates)) or 'none configured'})", field="--template")
    with app.sessions.begin() as s:
        target = resolve(s, args.target)
        if target is None:
            raise NotFoundError(f"no target named {args.target!r}")
        rid = create_intent(s, target_id=target.id, facility=args.facility, template=args.template, mode=mode,
                            priority=args.priority, window_start=start, window_end=end, config=app.config)
        if cadence is not None:
            from tomd.db import repository as repo

            repo.update_observation(s, rid, {"cadence": cadence})
    settings = SubmitSettings(settle_s=min(5.0, cfg.timeout), backoff_base_s=1.0, backoff_cap_s=10.0)
    with open_facilities(app.config, only=args.facility) as facs:
        Submitter(app.sessions, facs, settings, worker_id="cli").run_until_settled(timeout_s=args.wait, ids=[rid])
    with app.sessions() as s:
        row = _find_row(s, str(rid))
    if row.state in ("intent", "submitting"):
        print(f"#{row.id} {row.name}: not submitted yet ({row.last_error}); it stays queued and "
              f"`tomd run` will go on trying", file=sys.stderr)
        return 1
    if row.state in ("rejected", "failed"):
        print(f"#{row.id} {row.name}: {row.state}: {row.last_error}", file=sys.stderr)
        return 1
    print(f"#{row.id} {row.name}: submitted to {row.facility} as {row.facility_id} ({row.facility_state})"
          + (f"; cadence {_cadence_text(row.cadence)}" if row.cadence else ""))
    return 0


def cmd_obs_update(app, args) -> int:
    """Poll now: every facility (or one), print each change recorded."""
    from tomd.facilities import open_facilities
    from tomd.status import Poller

    if args.facility:
        _facility_config(app, args.facility)
    with open_facilities(app.config, only=args.facility) as facs:
        if args.facility and args.facility not in facs.clients:
            raise InputError(f"facility {args.facility} (kind {app.config.facilities[args.facility].kind}) "
                             "has no client yet", field="--facility")
        results = Poller(app.sessions, facs).poll(full=args.full)
    out = [{"facility": r.facility, "followed": r.followed, "reported": r.reported, "skipped": r.skipped,
            "error": r.error, "seconds": round(r.seconds, 3),
            "changes": [{"id": c.request_id, "name": c.name, "facility_id": c.facility_id, "old": c.old_state,
                         "new": c.new_state, "facility_state": c.facility_state, "reopened": c.reopened,
                         "next_intent": c.next_intent} for c in r.changes]} for r in results]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in out:
            for c in r["changes"]:
                extra = " (reopened)" if c["reopened"] else ""
                if c["next_intent"]:
                    extra += f"; cadence: next request #{c['next_intent']}"
                print(f"#{c['id']} {c['name']}: {c['old']} → {c['new']} ({r['facility']} says "
                      f"{c['facility_state']}){extra}")
            if r["skipped"]:
                print(f"{r['facility']}: skipped: {r['skipped']}", file=sys.stderr)
            elif r["error"]:
                print(f"{r['facility']}: {r['error']}", file=sys.stderr)
            else:
                print(f"{r['facility']}: {len(r['changes'])} change(s) among {r['followed']} followed request(s)")
        if not out:
            print("no facility to poll", file=sys.stderr)
    return 1 if any(r["error"] for r in out) else 0


def _state_option(value: str | None) -> str | None:
    """``--state``: one of REQUEST_STATES (a typo would list nothing and look like an empty queue)."""
    if value is None:
        return None
    v = value.strip().lower().replace("-", "_")
    if v in REQUEST_STATES:
        return v
    import difflib

    close = difflib.get_close_matches(v, REQUEST_STATES, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise InputError(f"unknown state {value!r}{hint} (states: {', '.join(REQUEST_STATES)})", field="--state")


def cmd_obs_list(app, args) -> int:
    from tomd.db import repository as repo

    args.state = _state_option(args.state)
    with app.sessions() as s:
        rows = repo.query_observations(s, state=args.state, facility=args.facility, limit=args.limit)
        targets = {r.target_id: (repo.get_target(s, r.target_id).name if repo.get_target(s, r.target_id) else None)
                   for r in rows}
        out = [_row_dict(r, targets[r.target_id]) for r in rows]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print("no observation requests", file=sys.stderr)
        return 0
    cols = ["id", "name", "target", "facility", "state", "facility_state", "facility_id", "last_error"]
    table = [[("-" if d[c] is None else str(d[c]))[:60] for c in cols] for d in out]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    return 0


def cmd_obs_show(app, args) -> int:
    from tomd.db import repository as repo

    with app.sessions() as s:
        row = _find_row(s, args.id)
        target = repo.get_target(s, row.target_id)
        d = _row_dict(row, target.name if target else None)
        d["request"] = row.request
        d["history"] = [{"time": h.time.isoformat(), "state": h.state, "facility_state": h.facility_state,
                         "message": h.message} for h in repo.observation_history(s, row.id)]
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"#{d['id']} {d['name']} — {d['state']}" + (f" ({d['facility_state']})" if d["facility_state"] else ""))
    for k in ("target", "facility", "template", "mode", "priority", "facility_id", "attempts", "decision_id",
              "window_start", "window_end", "created_at", "submitted_at", "cadence", "series", "last_error"):
        if d[k] not in (None, ""):
            print(f"  {k:13s} {d[k]}")
    if d["history"]:
        print("  history:")
        for h in d["history"]:
            fs = f" ({h['facility_state']})" if h["facility_state"] else ""
            print(f"    {h['time']}  {h['state']}{fs}  {h['message']}")
    return 0


def cmd_obs_cancel(app, args) -> int:
    from tomd.db import repository as repo
    from tomd.events import ObservationCancelled
    from tomd.facilities import open_facilities
    from tomd.facilities.base import ValidationRejected

    now = datetime.now(timezone.utc)
    with app.sessions.begin() as s:
        row = _find_row(s, args.id)
        rid, name, facility, target_id = row.id, row.name, row.facility, row.target_id
        state, fid = row.state, row.facility_id
        if state in FINAL_LOCAL:
            raise InputError(f"#{rid} {name} is already {state}; nothing to cancel")
        claimed = False
        if state in ("intent", "submitting"):
            # Take the intent away from any submitter first (a live claim means it is being sent now).
            claimed = bool(repo.claim_observation_intents(s, "cli-cancel", now=now, lease_until=now + timedelta(
                minutes=5), limit=1, ids=[rid]))
            if not claimed:
                raise InputError(f"#{rid} {name} is being submitted right now; try again in a minute")
    if state == "submitting" or fid:
        _facility_config(app, facility)
        with open_facilities(app.config, only=facility) as facs:
            fac = facs[facility]
            try:
                if fid is None:
                    found = fac.find_by_name(name)
                    fid = found[0].facility_id if found else None
                status = fac.cancel(fid) if fid else None
            except (RetryableError, PermanentError, ValidationRejected, NotFoundError) as exc:
                # NotFoundError (a 404) too: whatever failed, the claim taken above must not outlive us.
                if claimed:
                    with app.sessions.begin() as s:
                        repo.update_observation(s, rid, {"claimed_by": None, "claimed_until": None},
                                                worker="cli-cancel")
                print(f"#{rid} {name}: {exc}", file=sys.stderr)
                return 1
    else:
        status = None
    word = status.state.word if status else None
    message = f"cancelled by a person ({facility} request group {fid})" if fid else \
        "cancelled by a person before submission"
    with app.sessions.begin() as s:
        repo.update_observation(s, rid, {"state": "cancelled", "facility_state": word, "claimed_by": None,
                                         "claimed_until": None, "next_attempt_at": None,
                                         **({"facility_id": fid} if fid else {})})
        repo.add_observation_status(s, rid, "cancelled", word, message)
        repo.add_event(s, ObservationCancelled(rid, name, facility, fid, target_id), target_id=target_id)
    print(f"#{rid} {name}: {message}")
    return 0


def cmd_obs_settle(app, args) -> int:
    """A person settles a request whose submission outcome tomd could not learn.

    Two cases: a ``submitting`` row (the POST's answer was lost and the
    facility is unreachable or cannot be asked), or a trigger ended
    ``rejected`` because its outcome is unknown (Gemini's ToO interface
    cannot be asked whether a trigger exists). The person looked at the
    facility and says what is there:

    - ``--facility-id X``: it exists as X. Recorded as submitted (pending);
      the status poller follows it from there.
    - ``--absent``: it does not exist. Recorded as failed; a cadence series
      goes on with its next request.
    """
    from tomd.cadence import next_intent
    from tomd.db import repository as repo
    from tomd.events import ObservationFailed, ObservationSubmitted
    from tomd.submit import UNKNOWN_OUTCOME

    if bool(args.facility_id) == bool(args.absent):
        raise InputError("say what the facility holds: --facility-id ID (it exists) or --absent (it does not)",
                         field="--facility-id")
    fid = args.facility_id.strip() if args.facility_id else None
    if args.facility_id is not None and not fid:
        raise InputError("expected the facility's id of the request, got an empty string", field="--facility-id")
    now = datetime.now(timezone.utc)
    worker = "cli-settle"
    with app.sessions.begin() as s:
        row = _find_row(s, args.id)
        rid, name, state = row.id, row.name, row.state
        unknown = state == "rejected" and UNKNOWN_OUTCOME in (row.last_error or "")
        if state not in ("intent", "submitting") and not unknown:
            raise InputError(f"#{rid} {name} is {state}; only a request whose submission outcome is unknown "
                             "(submitting, or rejected because the outcome is unknown) can be settled")
        if state == "intent":
            raise InputError(f"#{rid} {name} was never sent (state intent); nothing to settle "
                             "(`tomd obs cancel` takes it back)")
        if state == "submitting":
            # Take it from the submitters first: a live claim means a POST or a look-up runs right now.
            if not repo.claim_observation_intents(s, worker, now=now, lease_until=now + timedelta(minutes=5),
                                                  limit=1, ids=[rid]):
                raise InputError(f"#{rid} {name} is being submitted right now; try again in a minute")
    fence = worker if state == "submitting" else None
    with app.sessions.begin() as s:
        row = repo.get_observation(s, rid)
        if fid:
            message = f"settled by a person: {row.facility} holds it as {fid}"
            values = {"state": "pending", "facility_id": fid, "facility_state": None, "submitted_at": now,
                      "last_error": None}
            event: Any = ObservationSubmitted(rid, name, row.facility, fid, row.target_id, row.decision_id, "",
                                              recovered=True)
            new_state = "pending"
        else:
            message = f"settled by a person: {row.facility} holds no such request"
            values = {"state": "failed", "last_error": message}
            event = ObservationFailed(rid, name, row.facility, message, row.attempts or 0, row.target_id,
                                      row.decision_id)
            new_state = "failed"
        guard = {"claimed_by": None, "claimed_until": None, "next_attempt_at": None}
        if state == "rejected":
            # No submitter touches a rejected row; still, settle only what was read (a second settle loses).
            done = repo.set_request_status(s, rid, "rejected", row.facility_state, {**values, **guard})
        else:
            done = repo.update_observation(s, rid, {**values, **guard}, worker=fence)
        if not done:
            raise InputError(f"#{rid} {name} changed meanwhile; look again with `tomd obs show {rid}`")
        repo.add_observation_status(s, rid, new_state, None, message)
        repo.add_event(s, event, target_id=row.target_id)
        nxt = next_intent(s, rid, "failed", now) if new_state == "failed" else None
    print(f"#{rid} {name}: {message}" + (f"; cadence: next request #{nxt}" if nxt else ""))
    return 0


def cmd_facility_check(app, args) -> int:
    from tomd.facilities import open_facilities

    names = [args.facility] if args.facility else sorted(app.config.facilities)
    if args.facility:
        _facility_config(app, args.facility)
    bad = 0
    for name in names:
        # One facility's failure (a 404 from a wrong URL, a bad template) is its problem line;
        # the others are still checked.
        try:
            with open_facilities(app.config, only=name) as facs:
                if name not in facs.clients:
                    print(f"{name}: kind {app.config.facilities[name].kind} has no client yet; skipped")
                    continue
                r = facs[name].check()
        except TomdError as exc:
            bad += 1
            print(f"{name}: {exc}", file=sys.stderr)
            continue
        if r.ok:
            print(f"{name}: OK — proposals {', '.join(r.proposals) or 'none'}; "
                  f"{len(r.instruments)} instrument types")
        else:
            bad += 1
            for p in r.problems:
                print(f"{name}: {p}", file=sys.stderr)
    return 1 if bad else 0


def cmd_sim(app, args) -> int:
    from tomd.facilities.sim import serve

    return serve(args)


# ------------------------------------------------------------------ parser --


def register(subparsers) -> None:
    """Add the ``obs``, ``facility`` and ``sim`` command groups to tomd's parser."""

    def leaf(parent, name, func, help_):
        q = parent.add_parser(name, help=help_, description=help_)
        q.set_defaults(func=func)
        return q

    obs = subparsers.add_parser("obs", help="observation requests").add_subparsers(
        dest="sub", required=True, metavar="SUB")
    q = leaf(obs, "submit", cmd_obs_submit, "submit an observation request for a target, exactly once")
    q.add_argument("target", help="any name of the target, or #ID")
    q.add_argument("--facility", required=True)
    q.add_argument("--template", required=True, help="a template of facilities.<facility>.templates")
    q.add_argument("--mode", help="NORMAL, RAPID_RESPONSE or TIME_CRITICAL (default: the template's)")
    q.add_argument("--priority", type=float, help="LCO: the IPP value (default: the template's)")
    q.add_argument("--window", nargs=2, metavar=("START", "END"),
                   help='ISO-8601 UTC times; START may be "now", END a duration like 24h')
    q.add_argument("--cadence", metavar="WORDS",
                   help='a series: "every 1d x5", "every 12h for 10d", "every 1d until \'target.last_mag > 20\'", '
                        '"retry 3 shift 12h", "every 1d x5 retry 2 shift 6h resume"')
    q.add_argument("--wait", type=float, default=60.0, help=argparse.SUPPRESS)
    q = leaf(obs, "list", cmd_obs_list, "list observation requests, newest first")
    q.add_argument("--json", action="store_true")
    q.add_argument("--state", help="intent, submitting, pending, ..., rejected")
    q.add_argument("--facility")
    q.add_argument("--limit", type=int)
    q = leaf(obs, "show", cmd_obs_show, "show one observation request and its history")
    q.add_argument("id", help="id or name")
    q.add_argument("--json", action="store_true")
    q = leaf(obs, "update", cmd_obs_update, "poll the facilities now and print every state change recorded")
    q.add_argument("--facility", help="only this one")
    q.add_argument("--full", action="store_true",
                   help="ask about every followed request, not only those changed since the last poll")
    q.add_argument("--json", action="store_true")
    q = leaf(obs, "cancel", cmd_obs_cancel, "cancel an observation request (at the facility when submitted)")
    q.add_argument("id", help="id or name")
    q = leaf(obs, "settle", cmd_obs_settle,
             "settle a request whose submission outcome is unknown, after looking at the facility")
    q.add_argument("id", help="id or name")
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--facility-id", metavar="ID", help="it exists at the facility as ID: the poller follows it")
    how.add_argument("--absent", action="store_true",
                     help="it does not exist: recorded failed (a cadence goes on)")

    fac = subparsers.add_parser("facility", help="facilities").add_subparsers(dest="sub", required=True, metavar="SUB")
    q = leaf(fac, "check", cmd_facility_check, "check each facility's token, proposals, instruments and templates")
    q.add_argument("--facility", help="only this one")

    from tomd.facilities.sim import add_arguments

    q = leaf(subparsers, "sim", cmd_sim, "run the simulated observatory (portal and archive API) until Ctrl-C")
    add_arguments(q)
