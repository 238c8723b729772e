"""Notifications: enqueue, channels (real loopback Slack/webhook HTTP servers, aiosmtpd), the notifier."""

from __future__ import annotations

from sqlalchemy import select

from tomd.db.models import Notification
from tomd.notify import Message, enqueue


def test_enqueue_is_idempotent_per_channel_and_key(db):
    msg = Message("SN candidate", "rose 1.2 mag", fields={"rule": "fast-risers"}, target_id=None)
    with db.sessions.begin() as s:
        assert enqueue(s, channel="slack", dedupe_key="rule.fired:1", message=msg) is True
        assert enqueue(s, channel="slack", dedupe_key="rule.fired:1", message=msg) is False
        assert enqueue(s, channel="mail", dedupe_key="rule.fired:1", message=msg.as_json()) is True
    with db.sessions.begin() as s:  # another transaction, later: still one row
        assert enqueue(s, channel="slack", dedupe_key="rule.fired:1", message={"subject": "again"}) is False
        rows = s.scalars(select(Notification).order_by(Notification.id)).all()
    assert [(r.channel, r.state) for r in rows] == [("slack", "pending"), ("mail", "pending")]
    assert Message.from_json(rows[0].message) == msg
    assert rows[0].message["fields"] == [["rule", "fast-risers"]]
