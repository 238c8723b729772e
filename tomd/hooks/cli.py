"""``tomd hook list | run | runs | retry``.

``register(subparsers)`` adds the ``hook`` group to tomd's parser; commands
are ``cmd_hook_*(app, args) -> exit status`` like the others.

``tomd hook run HOOK --event FILE.json`` runs one hook by hand, in this
process, on an event written as JSON in the outbox's shape::

    {"kind": "data.stored", "version": 1,
     "payload": {"data_product_id": 7, "facility": "lco", "product_id": "abc",
                 "product_kind": "image", "filename": "x.fits", "storage_key": "T1/lco/1/x.fits",
                 "size": 2880, "md5": "…", "target_id": 1},
     "id": 123}

``id`` (optional) is the outbox id the hook sees as ``ctx.event_id`` (0 if
absent). ``--event-id N`` takes event N from the outbox instead. The actions
the hook asks for are printed; ``--apply`` applies them (idempotently: the
same hook, event and key never notify or request twice).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

from tomd.errors import InputError, NotFoundError, UserError


def register(subparsers) -> None:
    """Add ``tomd hook ...`` to the top-level subparsers of tomd/cli.py."""
    grp = subparsers.add_parser("hook", help="hooks: list, run by hand, runs, retry").add_subparsers(
        dest="sub", required=True, metavar="SUB")

    def leaf(name, func, help_):
        q = grp.add_parser(name, help=help_, description=help_)
        q.set_defaults(func=func)
        return q

    q = leaf("list", cmd_hook_list, "hooks found in hooks.paths: their events, file:line, last runs and failures")
    q.add_argument("paths", nargs="*", help="files or directories (default: hooks.paths from the config)")
    q.add_argument("--json", action="store_true")
    q = leaf("run", cmd_hook_run, "run one hook by hand on an event (JSON file or an outbox id)")
    q.add_argument("hook", help="<file stem>.<function>, as `tomd hook list` shows it")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--event", metavar="FILE.json", help='{"kind": ..., "version": ..., "payload": {...}}')
    src.add_argument("--event-id", type=int, metavar="N", help="the outbox event N")
    q.add_argument("--apply", action="store_true", help="apply the hook's actions (tags, lists, requests, "
                   "notifications) to the database")
    q.add_argument("--paths", nargs="+", metavar="PATH", help="hook files or directories (default: hooks.paths)")
    q = leaf("runs", cmd_hook_runs, "recorded hook runs, newest first")
    q.add_argument("--failed", action="store_true", help="only runs that gave up")
    q.add_argument("--pending", action="store_true", help="only runs waiting for (another) attempt")
    q.add_argument("--hook", help="only this hook's runs")
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--json", action="store_true")
    q = leaf("retry", cmd_hook_retry, "give failed runs fresh attempts (the daemon runs them again)")
    q.add_argument("run_ids", nargs="*", type=int, help="run ids (default: all failed runs, or --hook's)")
    q.add_argument("--hook", help="only this hook's failed runs")


def _load_isolated(paths):
    """Load hook files in a worker process (a file that exits or hangs cannot take the command down)."""
    from tomd.hooks.worker import WorkerBoot, WorkerProcess

    w = WorkerProcess(WorkerBoot(paths=tuple(paths)), name="tomd-hook-list", load_timeout=60)
    try:
        w.start()
    except RuntimeError:
        pass
    finally:
        w.close()
    return w.specs, w.problems


def _fmt_time(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"


def cmd_hook_list(app, args) -> int:
    from tomd.db import repository as repo

    config = app.config
    specs, problems = _load_isolated(args.paths or list(config.hooks.paths))
    counts: dict = {}
    last: dict = {}
    db_note = None
    try:
        with app.sessions() as s:
            counts, last = repo.hook_run_counts(s), repo.hook_last_runs(s)
    except Exception as exc:  # noqa: BLE001 - the list is useful without a database too
        db_note = f"(no run history: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    rows = []
    for sp in specs:
        c = counts.get(sp.name, {})
        ok_at, failed_at = last.get(sp.name, (None, None))
        rows.append({"hook": sp.name, "events": list(sp.kinds), "where": sp.where,
                     "timeout_s": sp.timeout or config.hooks.timeout,
                     "max_attempts": sp.max_attempts or config.hooks.max_attempts, "since": sp.since,
                     "async": sp.is_async, "done": max(0, c.get("done", 0) - 1),  # less the registration record
                     "pending": c.get("pending", 0) + c.get("running", 0), "failed": c.get("failed", 0),
                     "last_done": _fmt_time(ok_at) if ok_at else None,
                     "last_failed": _fmt_time(failed_at) if failed_at else None})
    gone = sorted(h for h in counts if h not in {sp.name for sp in specs} and not h.startswith("builtin:")
                  and (counts[h].get("pending", 0) or counts[h].get("running", 0)))
    if args.json:
        print(json.dumps({"hooks": rows, "problems": problems, "orphaned": gone}, indent=2))
    else:
        if not rows:
            print("no hooks found in " + ", ".join(args.paths or config.hooks.paths))
        for r in rows:
            flags = "async " if r["async"] else ""
            print(f"{r['hook']}  on {', '.join(r['events'])}  ({r['where']})")
            print(f"    {flags}timeout {r['timeout_s']:g} s, {r['max_attempts']} attempts, since {r['since']}; "
                  f"done {r['done']}, pending {r['pending']}, failed {r['failed']}; "
                  f"last done {r['last_done'] or '-'}, last failure {r['last_failed'] or '-'}")
        for h in gone:
            print(f"{h}: no longer in the hook files, {counts[h].get('pending', 0)} run(s) wait for it")
        if db_note:
            print(db_note)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


def _read_event(args, app):
    from tomd.hooks.api import event_from_json

    if args.event_id is not None:
        from tomd.db import repository as repo

        with app.sessions() as s:
            row = repo.get_outbox_event(s, args.event_id)
            if row is None:
                raise NotFoundError(f"no outbox event #{args.event_id}")
            data = {"kind": row.kind, "version": row.version, "payload": row.payload, "id": row.id}
            where, outbox_target = f"outbox #{row.id}", row.target_id
    else:
        path = Path(args.event)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError("no such file", where=str(path)) from None
        except json.JSONDecodeError as exc:
            raise InputError(f"not JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
        where, outbox_target = str(path), None
    try:
        event = event_from_json(data, where=where)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    event_id = data.get("id", 0) if isinstance(data, dict) else 0
    if not isinstance(event_id, int):
        raise UserError(f"{where}: id: expected an integer outbox id")
    return event, event_id, outbox_target


def cmd_hook_run(app, args) -> int:
    from tomd.hooks.api import HookContext, Reader, apply_actions, facility_map
    from tomd.hooks.registry import load_hooks
    from tomd.hooks.worker import invoke

    config = app.config
    loaded = load_hooks(args.paths or list(config.hooks.paths))
    fn = loaded.functions.get(args.hook)
    if fn is None:
        for p in loaded.problems:
            print(p, file=sys.stderr)
        known = ", ".join(sorted(loaded.functions)) or "none"
        raise NotFoundError(f"no hook {args.hook!r} (hooks found: {known})")
    spec = next(sp for sp in loaded.specs if sp.name == args.hook)
    event, event_id, outbox_target = _read_event(args, app)
    if not spec.wants(event.kind):
        print(f"note: {args.hook} does not take {event.kind} events (it takes {', '.join(spec.kinds)}); "
              "running it anyway", file=sys.stderr)
    try:
        sessions = app.sessions
    except Exception as exc:  # noqa: BLE001 - a hook may not need the database
        if args.apply:
            raise
        print(f"note: no database ({type(exc).__name__}); ctx queries will fail", file=sys.stderr)
        sessions = None
    from tomd.storage import storage_from_config

    ctx = HookContext(hook=args.hook, event=event, event_id=event_id, reader=Reader(sessions,
                      storage_from_config(config.storage)), target_id=outbox_target,
                      settings=config.hooks.settings.get(args.hook.split(".", 1)[0], {}),
                      logger=logging.getLogger("tomd.hooks.user"))
    t0 = time.monotonic()
    try:
        invoke(fn, ctx)
    except BaseException:  # noqa: BLE001 - show the hook's traceback, as the daemon would record it
        print(traceback.format_exc(), file=sys.stderr, end="")
        print(f"{args.hook}: failed after {time.monotonic() - t0:.2f} s", file=sys.stderr)
        return 1
    print(f"{args.hook}: ok in {time.monotonic() - t0:.2f} s, {len(ctx.actions)} action(s)")
    for a in ctx.actions:
        print("  " + json.dumps(a, default=str))
    if args.apply and ctx.actions:
        try:  # the daemon's checks: requests name a configured facility and template, get its proposal
            with sessions.begin() as s:
                changes = apply_actions(s, ctx.actions, hook=args.hook, event_id=event_id or None,
                                        facilities=facility_map(config))
        except ValueError as exc:
            raise UserError(f"{args.hook}: nothing applied: {exc}") from None
        for line in changes or ["nothing new (already applied)"]:
            print(f"  applied: {line}")
    elif ctx.actions:
        print("  (not applied: --apply applies them)")
    return 0


def cmd_hook_runs(app, args) -> int:
    from tomd.db import repository as repo

    state = "failed" if args.failed else "pending" if args.pending else None
    with app.sessions() as s:
        rows = repo.query_hook_runs(s, state=state, hook=args.hook, limit=args.limit)
    out = [{"id": r.id, "hook": r.hook, "event_id": r.event_id, "event": kind, "state": r.state,
            "attempts": r.attempts, "next_attempt_at": _fmt_time(r.next_attempt_at) if r.next_attempt_at else None,
            "finished_at": _fmt_time(r.finished_at) if r.finished_at else None, "error": r.error}
           for r, kind in rows if kind != "hook.registered"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print("no runs")
    for r in out:
        when = r["finished_at"] or (f"next {r['next_attempt_at']}" if r["next_attempt_at"] else "")
        print(f"#{r['id']}  {r['hook']}  event #{r['event_id']} {r['event']}  {r['state']}  "
              f"attempts {r['attempts']}  {when}")
        if r["error"] and (args.failed or r["state"] != "done"):
            for line in r["error"].rstrip().splitlines()[-6:]:
                print(f"    {line}")
    return 0


def cmd_hook_retry(app, args) -> int:
    from tomd.db import repository as repo

    with app.sessions.begin() as s:
        n = repo.requeue_hook_runs(s, ids=args.run_ids or None, hook=args.hook)
    print(f"{n} failed run(s) queued again")
    return 0
