"""Notifications: durable messages to Slack, e-mail, webhooks and the log.

Rules and hooks never talk to Slack or an SMTP server themselves: they
*enqueue* a :class:`Message` for a channel in their own transaction
(:func:`enqueue`), and a :class:`Notifier` sends what is queued::

    rule.fired / observation.failed / … (outbox)        hook code
              │ notifications_for(event, config)           │ api.notify(...)
              ▼                                            ▼
         enqueue(s, channel=…, dedupe_key=…, message=…)   ── table ``notifications``
              │    (idempotent: one row per channel and dedupe key)
              ▼
         Notifier.run_once(): claim due rows → rate limit / digest → send → sent | retry | failed

- Enqueueing is idempotent: an event delivered twice, or a hook retried,
  queues its message once per channel (unique ``(channel, dedupe_key)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from tomd.db import repository as repo

log = logging.getLogger(__name__)

__all__ = ["Message", "enqueue"]

_MAX_KEY = 300  # notifications.dedupe_key is VARCHAR(300)
_MAX_CHANNEL = 100


@dataclass(frozen=True)
class Message:
    """What to tell people; the channel decides how it looks.

    ``fields`` are (label, value) pairs shown as a small table (Slack
    fields, e-mail lines, webhook JSON object); ``links`` are (label, URL)
    pairs. With ``target_id`` set the notifier adds the target's names,
    position, latest brightness and broker links when it sends; with
    ``image`` it also adds a light curve where the channel can carry one
    (attached to e-mails; a public URL on Slack when the store is S3).
    ``level`` (info | warning | error) colours Slack and prefixes e-mail
    subjects of errors. ``kind`` names what caused the message (an event
    kind, "test", "hook:<name>").
    """

    subject: str
    text: str = ""
    fields: tuple[tuple[str, str], ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    target_id: int | None = None
    image: bool = False
    level: str = "info"
    kind: str = ""

    def __post_init__(self) -> None:
        # Accept lists / mappings from hooks and JSON, keep tuples inside.
        object.__setattr__(self, "fields", _pairs(self.fields, "fields"))
        object.__setattr__(self, "links", _pairs(self.links, "links"))
        if self.level not in ("info", "warning", "error"):
            raise ValueError(f"Message.level: expected info, warning or error, got {self.level!r}")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError("Message.subject: expected a non-empty string")

    def as_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "text": self.text, "fields": [list(p) for p in self.fields],
                "links": [list(p) for p in self.links], "target_id": self.target_id, "image": self.image,
                "level": self.level, "kind": self.kind}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Message:
        known = {"subject", "text", "fields", "links", "target_id", "image", "level", "kind"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Message: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(known))}")
        return cls(**{k: data[k] for k in known if k in data and data[k] is not None})


def _pairs(value: Any, name: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        value = list(value.items())
    out = []
    for item in value or ():
        if isinstance(item, (str, bytes)) or len(item) != 2:
            raise ValueError(f"Message.{name}: expected (label, value) pairs or a mapping, got {item!r}")
        out.append((str(item[0]), "" if item[1] is None else str(item[1])))
    return tuple(out)


def as_message(message: Message | Mapping[str, Any]) -> Message:
    return message if isinstance(message, Message) else Message.from_json(message)


def _fit_key(key: str) -> str:
    """Keys longer than the column keep a readable prefix and a hash of the whole."""
    if len(key) <= _MAX_KEY:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return key[:_MAX_KEY - 33] + "#" + digest


def enqueue(s: Session, *, channel: str, dedupe_key: str, message: Message | Mapping[str, Any],
            event_id: int | None = None, target_id: int | None = None) -> bool:
    """Queue ``message`` for ``channel`` in the caller's transaction.

    Returns True if queued, False if this (channel, dedupe_key) was queued
    before (whatever became of it): callers may call it again safely.
    ``target_id`` defaults to the message's. The channel name is not checked
    here (the caller knows the config); a row for an unknown channel is
    recorded failed by the notifier, with the reason.
    """
    if not channel or len(channel) > _MAX_CHANNEL:
        raise ValueError(f"channel: expected a name of 1 to {_MAX_CHANNEL} characters, got {channel!r}")
    if not dedupe_key:
        raise ValueError("dedupe_key: expected a non-empty string")
    msg = as_message(message)
    if target_id is None:
        target_id = msg.target_id
    body = msg.as_json()
    json.dumps(body)  # fail here, in the caller, not in the sender
    return repo.enqueue_notification(s, {"channel": channel, "dedupe_key": _fit_key(dedupe_key),
                                         "event_id": event_id, "target_id": target_id, "message": body})
