"""``tomd notify …``: try a channel, look at the queue, retry failures, flush.

Wired by ``tomd.cli.build_parser``::

    from tomd.notify_cli import register as register_notify
    register_notify(sub)

Each command is ``cmd_*(app, args) -> exit status`` like the others in
``tomd.cli``; ``app`` offers ``config`` and ``sessions``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tomd.errors import InputError, NotFoundError, PermanentError, RetryableError


def _notifier(app):
    from tomd.notify import Notifier
    from tomd.storage import storage_from_config

    try:
        storage = storage_from_config(app.config.storage)
    except InputError:
        storage = None
    return Notifier.from_config(app.config, app.sessions, storage)


def cmd_notify_test(app, args) -> int:
    from tomd.notify import Message

    if args.channel not in app.config.notify.channels:
        known = ", ".join(sorted(app.config.notify.channels)) or "none configured"
        raise NotFoundError(f"no notification channel {args.channel!r} in {app.config.source or 'the config'} "
                            f"(known: {known})")
    target_id = None
    if args.target:
        from tomd.targets.store import resolve

        with app.sessions() as s:
            t = resolve(s, args.target)
            if t is None:
                raise NotFoundError(f"no target {args.target!r}")
            target_id = t.id
    text = args.message or "A test message from tomd: this channel works."
    msg = Message("tomd test message" + (" about {target}" if target_id else ""), text,
                  (("Channel", args.channel),), target_id=target_id, image=target_id is not None, kind="test")
    notifier = _notifier(app)
    try:
        notifier.send_now(args.channel, msg)
    except (RetryableError, PermanentError) as exc:
        print(f"tomd: not sent: {exc}", file=sys.stderr)
        return 1
    finally:
        notifier.close()
    print(f"sent a test message to {args.channel} ({app.config.notify.channels[args.channel].kind})")
    return 0


def cmd_notify_list(app, args) -> int:
    from tomd.db import repository as repo

    with app.sessions() as s:
        rows = repo.query_notifications(s, state=args.state, channel=args.channel, limit=args.limit)
        subjects = _subjects(s, rows)
    if args.json:
        print(json.dumps([{
            "id": r.id, "channel": r.channel, "state": r.state, "dedupe_key": r.dedupe_key, "event_id": r.event_id,
            "target_id": r.target_id, "attempts": r.attempts, "subject": subjects[r.id],
            "error": r.error, "created_at": r.created_at.isoformat() if r.created_at else None,
            "sent_at": r.sent_at.isoformat() if r.sent_at else None,
            "next_attempt_at": r.next_attempt_at.isoformat() if r.next_attempt_at else None,
        } for r in rows], indent=2))
        return 0
    if not rows:
        print("no notifications" + (f" in state {args.state}" if args.state else ""))
        return 0
    for r in rows:
        when = (r.sent_at or r.created_at).strftime("%Y-%m-%d %H:%M:%S")
        subject = subjects[r.id]
        line = f"#{r.id:<6} {r.state:<8} {r.channel:<16} {when}  {subject}"
        if r.state == "pending" and r.attempts:
            line += f"  (attempt {r.attempts}, next {r.next_attempt_at:%H:%M:%S})" if r.next_attempt_at else ""
        print(line)
        if r.error and r.state != "sent":
            print(f"         {r.error}")
    return 0


def _subjects(s, rows) -> dict[int, str]:
    """Each row's subject as it is (or was) sent: ``{target}`` becomes the target's name, which the
    notifier fills in only when sending (the queue keeps the template)."""
    from types import SimpleNamespace

    from tomd.db import repository as repo
    from tomd.notify import fill_target

    def tid(r) -> int | None:
        t = r.target_id if r.target_id is not None else (r.message or {}).get("target_id")
        return t if isinstance(t, int) else None

    wanted = {tid(r) for r in rows if "{target}" in str((r.message or {}).get("subject") or "")} - {None}
    names = {i: row["name"] for i, row in repo.target_rows(s, sorted(wanted)).items()}
    out = {}
    for r in rows:
        subject = str((r.message or {}).get("subject") or "")
        name = names.get(tid(r))  # type: ignore[arg-type]
        out[r.id] = fill_target(subject, SimpleNamespace(name=name) if name is not None else None)
    return out


def cmd_notify_retry(app, args) -> int:
    from tomd.db import repository as repo

    with app.sessions.begin() as s:
        ids = list(args.ids)
        if args.all_failed:
            ids += [r.id for r in repo.query_notifications(s, state="failed")]
        if not ids:
            raise InputError("name notification ids or use --all-failed", field="ids")
        n = repo.requeue_notifications(s, ids)
    print(f"{n} failed notification{'s' if n != 1 else ''} queued again")
    return 0


def cmd_notify_flush(app, args) -> int:
    notifier = _notifier(app)
    try:
        results = notifier.run_until_idle(timeout_s=args.timeout)
    finally:
        notifier.close()
    by = {"sent": 0, "retry": 0, "failed": 0}
    for r in results:
        by[r.state] += len(r.ids)
    print(f"sent {by['sent']}, to retry {by['retry']}, failed {by['failed']}")
    return 1 if by["failed"] else 0


def _leaf(parent, name: str, func, help_: str) -> argparse.ArgumentParser:
    q = parent.add_parser(name, help=help_, description=help_)
    q.set_defaults(func=func)
    return q


def register(subparsers: Any) -> None:
    """Add the ``notify`` command group to tomd's top-level subparsers."""
    notify = subparsers.add_parser("notify", help="notifications: test a channel, list, retry, flush").add_subparsers(
        dest="sub", required=True, metavar="SUB")
    q = _leaf(notify, "test", cmd_notify_test, "send one message to a channel now (outside the queue and its limits)")
    q.add_argument("channel", help="a [notify.channels.NAME] of the config")
    q.add_argument("--message", help="the text (default: a short test sentence)")
    q.add_argument("--target", help="about this target (name or #ID): its links and light curve")
    q = _leaf(notify, "list", cmd_notify_list, "list queued, sent and failed notifications (newest first)")
    q.add_argument("--state", choices=["pending", "sent", "failed"])
    q.add_argument("--channel")
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--json", action="store_true")
    q = _leaf(notify, "retry", cmd_notify_retry, "queue failed notifications again (fresh attempts)")
    q.add_argument("ids", nargs="*", type=int)
    q.add_argument("--all-failed", action="store_true")
    q = _leaf(notify, "flush", cmd_notify_flush, "send what is due now, within each channel's limits, and exit")
    q.add_argument("--timeout", type=float, default=60.0, help="stop after this many seconds")
