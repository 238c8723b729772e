"""Notifications: durable messages to Slack, e-mail, webhooks and the log.

Rules and hooks never talk to Slack or an SMTP server themselves: they
*enqueue* a :class:`Message` for a channel in their own transaction
(:func:`enqueue`), and a :class:`Notifier` sends what is queued::

    outbox event (rule.fired, observation.failed, …)        hook code
              │ notifications_for(event, config)               │ api.notify(...)
              ▼                                                ▼
         enqueue(s, channel=…, dedupe_key=…, message=…)  ──►  table ``notifications``
              (idempotent: one row per channel and dedupe key)       │
                                                                     ▼
         Notifier.run_once(): per channel, under its lock: count what was sent
         (rate limit, digest interval) → claim due rows (lease) → commit →
         send outside any transaction → sent | retry with backoff | failed

- **Idempotent enqueue**: an event delivered twice, or a hook retried,
  queues its message once per channel (unique ``(channel, dedupe_key)``).
- **Several notifiers** (several daemons) share the queue: rows are claimed
  with ``FOR UPDATE SKIP LOCKED`` and a lease, each channel's claims are
  serialised by an advisory lock, and every write after sending is fenced on
  the claim. Delivery is at least once: a notifier that dies after the
  remote side accepted a message but before recording it sends it again once
  its lease ends (webhook receivers dedupe on ``Tomd-Delivery``).
- **Limits are counted from the table**, so they hold across restarts and
  daemons: ``rate_limit_per_hour`` (a digest counts once; messages over the
  limit wait, nothing is dropped) and ``digest`` (at most one message per
  interval, carrying everything queued meanwhile; the first message after a
  quiet interval goes at once).
- **Retries**: timeouts, connection errors, HTTP 5xx, 429 (honouring
  ``Retry-After``) and SMTP 4xx are retried with exponential backoff and
  jitter; other 4xx answers, SMTP 5xx and authentication failures are final.
  After ``max_attempts`` the row is ``failed`` with the reason.
- **Secrets** (webhook URLs, SMTP passwords, signing secrets) never reach a
  log line or an error text: errors name the channel and host only, and any
  text from the other side is scrubbed of the channel's secrets.

Channels render a message their own way: Slack Block Kit (header, text,
fields, links, a light-curve image by URL), plain-text e-mail with the light
curve attached, a signed JSON webhook (see :func:`sign` / :func:`verify`),
or a log line.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import logging
import os
import random
import re
import smtplib
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from sqlalchemy.orm import Session, sessionmaker

from tomd.db import repository as repo
from tomd.errors import NotFoundError, PermanentError, RetryableError
from tomd.logs import FailureLog

log = logging.getLogger(__name__)

__all__ = [
    "Message",
    "Notifier",
    "NotifySettings",
    "SendResult",
    "enqueue",
    "notification_kinds",
    "notifications_for",
    "sign",
    "subscriber",
    "verify",
]

_MAX_KEY = 300  # notifications.dedupe_key is VARCHAR(300)
_MAX_CHANNEL = 100
SIGNATURE_HEADER = "Tomd-Signature"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Message:
    """What to tell people; the channel decides how it looks.

    ``fields`` are (label, value) pairs shown as a small table (Slack
    fields, e-mail lines, webhook JSON object); ``links`` are (label, URL)
    pairs. With ``target_id`` set the notifier adds the target's names,
    position, latest brightness and broker links when it sends; with
    ``image`` it also adds a light curve where the channel can carry one
    (attached to e-mails; a public URL on Slack when the store is S3).
    ``level`` (info | warning | error) marks Slack headers (⚠ / 🚨) and
    e-mail subjects (``[tomd warning]`` / ``[tomd ERROR]``). ``kind`` names
    what caused the message (an event kind, "test", "hook:<name>").
    ``{target}`` in the subject, text or a field becomes the target's name.
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
        object.__setattr__(self, "text", "" if self.text is None else str(self.text))
        object.__setattr__(self, "fields", _pairs(self.fields, "fields"))
        object.__setattr__(self, "links", _pairs(self.links, "links"))
        if self.level not in ("info", "warning", "error"):
            raise ValueError(f"Message.level: expected info, warning or error, got {self.level!r}")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError("Message.subject: expected a non-empty string")
        for label, url in self.links:
            # Slack writes links as <url|label>: a URL with spaces, "|" or ">" would break the message.
            if not re.fullmatch(r"https?://[^\s|<>]+", url):
                raise ValueError(f"Message.links: expected an http(s) URL for {label!r}, got {url!r}")

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
        if not data.get("subject"):
            raise ValueError("Message.subject: expected a non-empty string")
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


# ------------------------------------------------------------------ fan-out --
# Outbox events → messages. Pure: the hook dispatcher calls it for every event
# and enqueues what it returns, in the transaction that records the delivery.

# The payload field that names what an event is about, so that the dedupe
# key survives the same change being written to the outbox twice.
_NATURAL_KEY: dict[str, tuple[str, ...]] = {
    "rule.fired": ("decision_id",),
    # (rule, alert) names the same verdict as its decision_id does; kept as the key from before
    # RuleTested carried decision_id, so messages already queued keep their dedupe keys
    "rule.tested": ("rule", "alert_id"),
    "observation.submitted": ("request_id",),
    "observation.rejected": ("request_id",),
    "observation.failed": ("request_id",),
    "observation.cancelled": ("request_id",),
    "observation.cadence_step": ("request_id",),
    "alert.dead_lettered": ("dead_letter_id",),
    "alert.ingested": ("alert_id",),
    "data.stored": ("data_product_id",),
    "data.retrieval_failed": ("request_id", "attempts"),
    "target.created": ("target_id",),
    "hook.failed": ("hook", "event_id"),
}


def _event_parts(event: Any) -> tuple[str, dict[str, Any], int | None]:
    """(kind, payload, outbox id) of an Event, an outbox row or a {"kind", "payload"} mapping."""
    if isinstance(event, Mapping):
        return str(event["kind"]), dict(event.get("payload") or {}), event.get("id")
    kind, payload = str(getattr(event, "kind")), getattr(event, "payload")
    if callable(payload):  # an Event dataclass: not in the outbox yet, no id
        return kind, dict(payload()), None
    return kind, dict(payload or {}), getattr(event, "id", None)  # an outbox row


def subscribes(patterns: Iterable[str], kind: str) -> bool:
    """Does a channel's ``events`` list take ``kind``? ("observation.*" takes "observation.failed")."""
    for p in patterns:
        if p == "*" or p == kind or (p.endswith(".*") and kind.startswith(p[:-1])):
            return True
    return False


def is_test_event(kind: str, payload: Mapping[str, Any]) -> bool:
    """A test-mode rule's would-be firing (however the event marks it)."""
    return bool(payload.get("test")) or payload.get("mode") == "test" or kind.endswith(".test") \
        or kind == "rule.tested"


def notifications_for(event: Any, config: Any, *, event_id: int | None = None
                      ) -> list[tuple[str, str, Message]]:
    """The (channel, dedupe_key, message) triples one outbox event asks for.

    Channels: for ``rule.fired`` those the rule names (``[notify] channels``),
    plus every configured channel whose ``events`` list takes the kind. A
    test-mode firing (``test``/``mode = "test"`` in the payload) is labelled
    as such. ``config`` is a :class:`tomd.config.Config` (or its ``notify``).
    The dedupe key is ``kind:<natural id>`` (decision, request, dead letter…),
    else ``kind:event:<outbox id>``, else a hash of the payload.
    """
    kind, payload, own_id = _event_parts(event)
    event_id = event_id if event_id is not None else own_id
    channels_cfg = getattr(getattr(config, "notify", config), "channels", {})
    wanted: list[str] = []
    if kind == "rule.fired" or kind.startswith("rule."):
        wanted += [c for c in payload.get("channels") or () if isinstance(c, str)]
    wanted += [name for name, ch in channels_cfg.items() if subscribes(ch.events, kind)]
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        return []
    msg = message_for_event(kind, payload)
    natural = _NATURAL_KEY.get(kind, ())
    if natural and all(payload.get(f) is not None for f in natural):
        key = f"{kind}:" + ":".join(str(payload[f]) for f in natural)
    elif event_id is not None:
        key = f"{kind}:event:{event_id}"
    else:
        blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
        key = f"{kind}:{hashlib.sha256(blob.encode()).hexdigest()[:32]}"
    return [(c, key, msg) for c in wanted]


def notification_kinds(config: Any) -> list[str]:
    """The event kinds the fan-out needs to see: every ``rule.*`` kind (rules' ``[notify]``)
    and what the channels' ``events`` lists name ("observation.*" expanded)."""
    from tomd.events import EVENT_TYPES

    channels = getattr(getattr(config, "notify", config), "channels", {})
    if not channels:
        return []
    patterns = [p for ch in channels.values() for p in ch.events]
    return sorted(k for k in EVENT_TYPES if k.startswith("rule.") or subscribes(patterns, k))


def subscriber(config: Any, *, wake: Callable[[], None] | None = None) -> Callable[[Session, Any], None]:
    """``fn(session, event)`` for the hook runner's builtin subscribers: enqueue what
    :func:`notifications_for` asks for, in the transaction that marks the event handled,
    and ``wake`` the notifier once that commits."""

    def notify_builtin(s: Session, event: Any) -> None:
        queued = 0
        for channel, key, msg in notifications_for(event, config):
            queued += enqueue(s, channel=channel, dedupe_key=key, message=msg)
        if queued and wake is not None:
            from sqlalchemy import event as sa_event

            sa_event.listen(s, "after_commit", lambda _s: wake(), once=True)

    return notify_builtin


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def message_for_event(kind: str, p: Mapping[str, Any]) -> Message:
    """A readable message for one event; ``{target}`` is filled in when it is sent."""
    tid = p.get("target_id")
    test = is_test_event(kind, p)
    pre = "[test] " if test else ""
    fields: list[tuple[str, str]] = []

    def add(label: str, key: str, fmt: Callable[[Any], str] = _scalar) -> None:
        v = p.get(key)
        if v not in (None, "", (), []):
            fields.append((label, fmt(v)))

    if kind.startswith("rule."):
        rule = p.get("rule", "?")
        subject = f"{pre}Rule {rule} {'would fire' if test else 'fired'} on {{target}}"
        text = p.get("message") or p.get("reason") or ""
        if p.get("message") and p.get("reason"):
            fields.append(("Why", str(p["reason"])))
        add("Rule", "rule")
        add("Observation request", "request_id", lambda v: f"#{v}")
        add("Tags added", "tags_added")
        add("Lists joined", "lists_joined")
        if test:
            text = (text + "\n" if text else "") + "Test mode: nothing was requested, tagged or listed."
        return Message(subject, text, tuple(fields), target_id=tid, image=tid is not None, kind=kind)
    if kind == "observation.status_changed":
        new, old = p.get("new_state", "?"), p.get("old_state", "?")
        reopened = bool(p.get("reopened"))
        subject = f"Observation of {{target}} {new} at {p.get('facility', '?')}" + (" (reopened)" if reopened else "")
        add("Request", "request_id", lambda v: f"#{v} {p.get('name', '')}")
        fields.append(("State", f"{old} → {new}" + (f" ({p['facility_state']})" if p.get("facility_state") else "")))
        add("Facility id", "facility_id")
        bad = new.lower() in ("failed", "expired", "window_expired", "cancelled", "canceled", "failure_limit_reached")
        return Message(subject, "", tuple(fields), target_id=tid, level="warning" if bad or reopened else "info",
                       image=new.lower() == "completed", kind=kind)
    if kind.startswith("observation."):
        what = kind.split(".", 1)[1]
        name, fac = p.get("name", "?"), p.get("facility", "?")
        level = {"failed": "error", "rejected": "warning"}.get(what, "info")
        verb = {"rejected": f"rejected by {fac}", "failed": f"failed ({fac})", "submitted": f"submitted to {fac}",
                "cancelled": f"cancelled at {fac}"}.get(what, f"{what} ({fac})")
        subject = f"Observation of {{target}} {verb}"
        add("Request", "request_id", lambda v: f"#{v} {name}")
        add("Facility", "facility")
        add("Facility id", "facility_id")
        add("State", "state")
        add("Attempts", "attempts")
        add("Decision", "decision_id", lambda v: f"#{v}")
        if p.get("recovered"):
            fields.append(("Recovered", "found by name after a timeout"))
        return Message(subject, str(p.get("reason") or p.get("message") or ""), tuple(fields), target_id=tid,
                       level=level, kind=kind)
    if kind == "alert.dead_lettered":
        add("Stream", "stream")
        add("Where", "coords")
        add("Dead letter", "dead_letter_id", lambda v: f"#{v} (tomd alert dead-letters)")
        return Message(f"Alert dead-lettered on stream {p.get('stream', '?')}", str(p.get("error", "")),
                       tuple(fields), level="error", kind=kind)
    if kind == "data.retrieval_failed":
        add("Request", "request_id", lambda v: f"#{v}")
        add("Facility", "facility")
        add("Stored", "stored")
        add("Missing", "missing")
        add("Attempts", "attempts")
        return Message(f"Data of {{target}} could not be retrieved from {p.get('facility', '?')}",
                       str(p.get("error", "")), tuple(fields), target_id=tid, level="error", kind=kind)
    if kind == "hook.failed":
        add("Event", "event_id", lambda v: f"#{v} {p.get('event_kind', '')}")
        add("Attempts", "attempts")
        fields.append(("Traceback", f"tomd hook runs --failed --hook {p.get('hook', '?')}"))
        return Message(f"Hook {p.get('hook', '?')} failed", str(p.get("error", "")), tuple(fields), target_id=tid,
                       level="error", kind=kind)
    if kind == "data.stored":
        add("File", "filename")
        add("Kind", "product_kind")
        add("Facility", "facility")
        add("Size", "size", lambda v: f"{int(v):,} bytes")
        add("Stored as", "storage_key")
        return Message(f"New {p.get('product_kind', 'data')} for {{target}}: {p.get('filename', '')}", "",
                       tuple(fields), target_id=tid, image=p.get("product_kind") == "photometry", kind=kind)
    if kind == "target.created":
        add("Origin", "origin")
        return Message(f"New target {p.get('name', '{target}')}", "", tuple(fields), target_id=tid, kind=kind)
    if kind == "notice.received":
        add("Type", "notice_type")
        add("RA, Dec", "ra", lambda v: f"{v:.4f}, {p.get('dec', float('nan')):.4f} deg")
        add("Error radius", "error_deg", lambda v: f"{v:.3g} deg")
        retracted = bool(p.get("retracted"))
        subject = f"{'RETRACTED: ' if retracted else ''}{p.get('source', '?')} notice {p.get('event_id', '?')}"
        return Message(subject, "", tuple(fields), target_id=tid, level="warning" if retracted else "info",
                       kind=kind)
    if kind == "alert.ingested":
        add("Source", "source")
        add("Magnitude", "mag", lambda v: f"{v:.2f} ({p.get('band') or '?'})")
        add("Time", "time")
        add("Where", "coords")
        return Message(f"{pre}Alert {p.get('object_id') or p.get('key', '?')} on {{target}}", "", tuple(fields),
                       target_id=tid, kind=kind)
    for k, v in p.items():  # an event this module does not know (yet): its scalar fields
        if k != "target_id" and v not in (None, "", (), [], {}) and not isinstance(v, dict):
            fields.append((k.replace("_", " ").capitalize(), _scalar(v)))
    return Message(f"{pre}{kind}" + (" on {target}" if tid is not None else ""), "", tuple(fields[:12]),
                   target_id=tid, kind=kind)


# --------------------------------------------------------------- rendering --


@dataclass(frozen=True)
class TargetInfo:
    """What a message says about its target, read when it is sent."""

    id: int
    name: str
    aliases: tuple[str, ...] = ()
    ra: float | None = None
    dec: float | None = None
    latest: str | None = None  # "18.42 ± 0.05 mag (ztfg) at 2026-11-28 04:12 UTC"

    def links(self) -> list[tuple[str, str]]:
        return target_links((self.name, *self.aliases), self.ra, self.dec)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "aliases": list(self.aliases), "ra": self.ra, "dec": self.dec,
                "latest": self.latest}


_ZTF = re.compile(r"ZTF\d{2}[a-z]{7}")
_TNS = re.compile(r"(?:AT|SN)?\s?(20\d{2}[a-z]{1,4})")


def target_links(names: Sequence[str], ra: float | None, dec: float | None) -> list[tuple[str, str]]:
    """Broker and archive pages for a target: by ZTF name, TNS name, position."""
    out: list[tuple[str, str]] = []
    for n in names:
        if _ZTF.fullmatch(n):
            out += [("ALeRCE", f"https://alerce.online/object/{n}"), ("Fink", f"https://fink-portal.org/{n}"),
                    ("Lasair", f"https://lasair-ztf.lsst.ac.uk/objects/{n}/")]
            break
    for n in names:
        m = _TNS.fullmatch(n.strip())
        if m:
            out.append(("TNS", f"https://www.wis-tns.org/object/{m.group(1)}"))
            break
    if ra is not None and dec is not None:
        out.append(("SIMBAD", f"https://simbad.cds.unistra.fr/simbad/sim-coo?Coord={ra:.6f}%20{dec:+.6f}"
                              "&Radius=10&Radius.unit=arcsec"))
        out.append(("Legacy Survey", f"https://www.legacysurvey.org/viewer?ra={ra:.6f}&dec={dec:.6f}&zoom=16"))
    return out


def sexagesimal(ra: float, dec: float) -> str:
    """"12:34:56.78 +12:34:56.7" (ICRS), rounding carried through the fields."""
    total = round(ra / 15.0 * 3600 * 100) % (24 * 3600 * 100)
    h, rem = divmod(total, 3600 * 100)
    m, cs = divmod(rem, 60 * 100)
    sign = "-" if dec < 0 else "+"
    total_d = round(abs(dec) * 3600 * 10)
    d, rem = divmod(total_d, 3600 * 10)
    dm, ds = divmod(rem, 60 * 10)
    return f"{h:02d}:{m:02d}:{cs / 100:05.2f} {sign}{d:02d}:{dm:02d}:{ds / 10:04.1f}"


def load_target(s: Session, target_id: int) -> TargetInfo | None:
    t = repo.get_target(s, target_id)
    if t is None:
        return None
    names = [n.name for n in repo.names_of(s, [target_id]).get(target_id, []) if n.name != t.name]
    latest = None
    ph = repo.latest_photometry(s, target_id)
    if ph is not None:
        from astropy.time import Time

        when = Time(ph.mjd, format="mjd", scale="utc").strftime("%Y-%m-%d %H:%M UTC")
        if ph.mag is not None:
            err = f" ± {ph.mag_err:.2f}" if ph.mag_err is not None else ""
            latest = f"{ph.mag:.2f}{err} mag ({ph.band}) at {when}"
        elif ph.limit is not None:
            latest = f"> {ph.limit:.2f} mag ({ph.band}, upper limit) at {when}"
        elif ph.flux is not None:
            latest = f"{ph.flux:.4g} nJy ({ph.band}, {ph.kind}) at {when}"
    return TargetInfo(t.id, t.name, tuple(dict.fromkeys(names)), t.ra, t.dec, latest)


@dataclass(frozen=True)
class Entry:
    """One queued notification, with its target read from the database."""

    id: int | None  # notifications.id (None: sent directly, ``tomd notify test``)
    message: Message
    target: TargetInfo | None = None
    created_at: datetime | None = None
    dedupe_key: str = ""
    event_id: int | None = None

    @property
    def subject(self) -> str:
        return fill_target(self.message.subject, self.target)

    @property
    def text(self) -> str:
        return fill_target(self.message.text, self.target)

    def all_fields(self) -> list[tuple[str, str]]:
        """The target's lines first, then the message's."""
        out: list[tuple[str, str]] = []
        t = self.target
        if t is not None:
            out.append(("Target", t.name + (f" ({', '.join(t.aliases[:4])})" if t.aliases else "")))
            if t.ra is not None and t.dec is not None:
                out.append(("RA, Dec", f"{sexagesimal(t.ra, t.dec)} ({t.ra:.5f}, {t.dec:+.5f})"))
            if t.latest:
                out.append(("Latest", t.latest))
        return out + [(k, fill_target(v, t)) for k, v in self.message.fields]

    def all_links(self) -> list[tuple[str, str]]:
        links = list(self.message.links)
        if self.target is not None:
            seen = {u for _, u in links}
            links += [(lbl, u) for lbl, u in self.target.links() if u not in seen]
        return links


def fill_target(text: str, target: TargetInfo | None) -> str:
    """``{target}`` in a subject or text becomes the target's name."""
    if "{target}" not in text:
        return text
    return text.replace("{target}", target.name if target is not None else "(no target)")


@dataclass(frozen=True)
class Outgoing:
    """What one send delivers: one notification, or a digest of several."""

    channel: str
    entries: tuple[Entry, ...]
    image_png: bytes | None = None  # the light curve, for channels that attach it
    image_name: str = "light-curve.png"
    image_url: str | None = None  # the light curve at a public (presigned) URL

    @property
    def digest(self) -> bool:
        return len(self.entries) > 1

    @property
    def delivery_id(self) -> str:
        """Stable across retries of the same rows: receivers dedupe on it."""
        ids = [e.id for e in self.entries if e.id is not None]
        if not ids:
            return "test-" + uuid.uuid4().hex[:12]
        return f"n{ids[0]}" if len(ids) == 1 else f"d{ids[0]}-{ids[-1]}-{len(ids)}"

    @property
    def subject(self) -> str:
        if not self.digest:
            return self.entries[0].subject
        first = self.entries[0].subject
        return f"{len(self.entries)} notifications: {first}" + (", …" if len(self.entries) > 1 else "")

    @property
    def level(self) -> str:
        order = ["info", "warning", "error"]
        return max((e.message.level for e in self.entries), key=order.index)

    @property
    def kind(self) -> str:
        return "digest" if self.digest else (self.entries[0].message.kind or "message")


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


_LEVEL_EMOJI = {"info": "", "warning": ":warning: ", "error": ":rotating_light: "}


def slack_payload(out: Outgoing) -> dict[str, Any]:
    """An incoming-webhook body: Block Kit blocks and a plain ``text`` fallback (notifications, old clients).

    Limits from Slack's reference: header 150 characters, section text
    3000, at most 10 fields of 2000 each, 50 blocks per message.
    """
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {
        "type": "plain_text", "text": _cut(_LEVEL_EMOJI[out.level] + out.subject, 150), "emoji": True}}]

    def link_line(links: list[tuple[str, str]]) -> str:
        return " · ".join(f"<{u}|{_slack_escape(lbl)}>" for lbl, u in links)

    if not out.digest:
        e = out.entries[0]
        if e.text:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut(_slack_escape(e.text), 3000)}})
        fields = e.all_fields()
        if fields:
            blocks.append({"type": "section", "fields": [
                {"type": "mrkdwn", "text": _cut(f"*{_slack_escape(k)}*\n{_slack_escape(v)}", 2000)}
                for k, v in fields[:10]]})
        if out.image_url:
            name = e.target.name if e.target else "the target"
            blocks.append({"type": "image", "image_url": out.image_url, "alt_text": f"light curve of {name}",
                           "title": {"type": "plain_text", "text": f"Light curve of {name}"}})
        if e.all_links():
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                            "text": _cut(link_line(e.all_links()), 3000)}]})
    else:
        shown = out.entries[:22]  # two blocks each, within the 50-block limit
        for e in shown:
            lines = [f"*{_slack_escape(_LEVEL_EMOJI[e.message.level] + e.subject)}*"]
            if e.text:
                lines.append(_slack_escape(e.text))
            lines += [f"{_slack_escape(k)}: {_slack_escape(v)}" for k, v in e.all_fields()[:6]]
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _cut("\n".join(lines), 3000)}})
            if e.all_links():
                blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                                "text": _cut(link_line(e.all_links()), 3000)}]})
        if len(out.entries) > len(shown):
            more = f"…and {len(out.entries) - len(shown)} more (tomd notify list)"
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    stamp = _now().strftime("%Y-%m-%d %H:%M UTC")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"tomd · {out.kind} · {stamp}"}]})
    fallback = out.subject if not out.digest else f"{out.subject}"
    return {"text": _cut(fallback, 3000), "blocks": blocks[:50]}


def plain_text(out: Outgoing) -> str:
    """The e-mail body (and what the log channel writes)."""
    parts = []
    for i, e in enumerate(out.entries, 1):
        lines = [f"{i}. {e.subject}" if out.digest else e.subject, ""]
        if e.text:
            lines += [e.text, ""]
        width = max((len(k) for k, _ in e.all_fields()), default=0)
        lines += [f"{k + ':':<{width + 1}} {v}" for k, v in e.all_fields()]
        if e.all_links():
            lines += ["", *[f"{lbl}: {u}" for lbl, u in e.all_links()]]
        if e.created_at is not None and out.digest:
            lines.append(f"(queued {e.created_at.strftime('%Y-%m-%d %H:%M:%S UTC')})")
        parts.append("\n".join(lines).rstrip())
    sep = "\n\n" + "-" * 60 + "\n\n"
    return sep.join(parts) + f"\n\n-- \ntomd · {out.kind} · delivery {out.delivery_id}\n"


def webhook_body(out: Outgoing, *, sent_at: datetime) -> dict[str, Any]:
    """The JSON a generic webhook receives (always a list, one item unless a digest)."""
    items = []
    for e in out.entries:
        items.append({
            "id": e.id, "dedupe_key": e.dedupe_key, "event_id": e.event_id, "kind": e.message.kind,
            "level": e.message.level, "subject": e.subject, "text": e.text,
            "fields": dict(e.all_fields()), "links": [{"label": lbl, "url": u} for lbl, u in e.all_links()],
            "target": e.target.as_json() if e.target else None,
            "created_at": e.created_at.isoformat() if e.created_at else None,
        })
    body: dict[str, Any] = {"delivery": out.delivery_id, "channel": out.channel, "sent_at": sent_at.isoformat(),
                            "digest": out.digest, "notifications": items}
    if out.image_url:
        body["light_curve_url"] = out.image_url
    return body


# -------------------------------------------------------------- signatures --


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Tomd-Signature`` header value: ``t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Check a ``Tomd-Signature`` header the way a receiver should (constant-time compare;
    reject timestamps older than ``tolerance_s``, which stops replays)."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        k, _, v = item.strip().partition("=")
        parts.setdefault(k, []).append(v)
    try:
        ts = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, body, ts).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, v) for v in parts.get("v1", []))


# ----------------------------------------------------------------- senders --


class Sender(Protocol):
    """Delivers one Outgoing; raises RetryableError (try later) or PermanentError (give up)."""

    name: str
    kind: str

    def send(self, out: Outgoing) -> None: ...

    def close(self) -> None: ...


class _Scrubber:
    """Removes a channel's secrets (and its URL's path and query) from text from anywhere."""

    def __init__(self, secrets: Iterable[str | None]):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        from tomd.errors import redact

        for s in self.secrets:
            text = text.replace(s, "***")
        return redact(text)


def _secrets_of(ch: Any) -> list[str | None]:
    out = [ch.url, ch.secret.reveal() if ch.secret else None, ch.password.reveal() if ch.password else None]
    if ch.url:
        parts = urlsplit(ch.url)
        out += [parts.path if len(parts.path) > 1 else None, parts.query or None, quote(ch.url, safe="")]
    return out


def _host(url: str) -> str:
    p = urlsplit(url)
    return p.hostname + (f":{p.port}" if p.port else "") if p.hostname else "?"


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (a number, or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - _now()).total_seconds())


class _LogScrubber(logging.Filter):
    """httpx logs every request's full URL at INFO, and a Slack webhook URL is a credential:
    this filter on the ``httpx`` logger takes the channels' secrets out of those lines,
    whatever level the application gives that logger."""

    def __init__(self):
        super().__init__()
        self.scrubbers: list[_Scrubber] = []

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad record is not ours to break
            return True
        clean = text
        for scrub in self.scrubbers:
            clean = scrub(clean)
        if clean != text:
            record.msg, record.args = clean, ()
        return True


_LOG_SCRUBBER = _LogScrubber()


def _guard_library_logs(scrub: _Scrubber) -> None:
    if scrub.secrets and scrub not in _LOG_SCRUBBER.scrubbers:
        _LOG_SCRUBBER.scrubbers.append(scrub)
        del _LOG_SCRUBBER.scrubbers[:-64]  # bounded: tests and reloads build many senders
    httpx_log = logging.getLogger("httpx")
    if _LOG_SCRUBBER not in httpx_log.filters:
        httpx_log.addFilter(_LOG_SCRUBBER)


class _HttpSender:
    """POST JSON to a URL with a timeout; 2xx is success."""

    def __init__(self, name: str, ch: Any, *, transport: Any = None):
        import httpx

        self.name, self.ch = name, ch
        self.kind = ch.kind
        self.scrub = _Scrubber(_secrets_of(ch))
        _guard_library_logs(self.scrub)
        self.host = _host(ch.url)
        verify: Any = ssl.create_default_context(cafile=ch.ca_file) if ch.ca_file else True
        self.client = httpx.Client(timeout=httpx.Timeout(ch.timeout), verify=verify, follow_redirects=False,
                                   headers={"User-Agent": f"tomd/{_version()}"}, transport=transport)

    def close(self) -> None:
        self.client.close()

    def _post(self, body: bytes, headers: Mapping[str, str]) -> None:
        import httpx

        where = f"{self.kind} channel {self.name} ({self.host})"
        try:
            r = self.client.post(self.ch.url, content=body, headers={"Content-Type": "application/json", **headers})
        except httpx.TimeoutException as exc:
            raise RetryableError(f"{where}: no answer within {self.ch.timeout:g}s ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise RetryableError(f"{where}: {type(exc).__name__}: {self.scrub(str(exc))[:200]}") from None
        if 200 <= r.status_code < 300:
            return
        said = self.scrub(r.text.strip())[:300] or r.reason_phrase
        msg = f"{where}: HTTP {r.status_code}: {said}"
        if r.status_code == 429:
            raise RetryableError(msg, retry_after=_retry_after(r.headers.get("Retry-After")))
        if r.status_code >= 500 or r.status_code == 408:
            raise RetryableError(msg, retry_after=_retry_after(r.headers.get("Retry-After")))
        # Slack: 400 invalid_payload / invalid_blocks, 403 action_prohibited,
        # 404 channel_not_found / no_service, 410 channel_is_archived: a person must act.
        raise PermanentError(msg)


class SlackSender(_HttpSender):
    """A Slack incoming webhook: Block Kit JSON (see :func:`slack_payload`)."""

    def send(self, out: Outgoing) -> None:
        self._post(json.dumps(slack_payload(out)).encode(), {})


class WebhookSender(_HttpSender):
    """Signed JSON (see :func:`webhook_body`, :func:`sign`)."""

    def __init__(self, name: str, ch: Any, *, transport: Any = None, clock: Callable[[], datetime] = _now):
        super().__init__(name, ch, transport=transport)
        self.clock = clock

    def send(self, out: Outgoing) -> None:
        now = self.clock()
        body = json.dumps(webhook_body(out, sent_at=now), separators=(",", ":"), default=str).encode()
        headers = {"Tomd-Delivery": out.delivery_id, "Tomd-Event": out.kind}
        if self.ch.secret:
            headers[SIGNATURE_HEADER] = sign(self.ch.secret.reveal(), body, int(time.time()))
        self._post(body, headers)


class EmailSender:
    """SMTP with STARTTLS (or implicit TLS) and login; the light curve attached as a PNG."""

    kind = "email"

    def __init__(self, name: str, ch: Any, *, ssl_context: ssl.SSLContext | None = None):
        self.name, self.ch = name, ch
        self.scrub = _Scrubber(_secrets_of(ch))
        self.ssl_context = ssl_context

    def close(self) -> None:
        pass

    def _context(self) -> ssl.SSLContext:
        if self.ssl_context is not None:
            return self.ssl_context
        return ssl.create_default_context(cafile=self.ch.ca_file) if self.ch.ca_file else ssl.create_default_context()

    def build(self, out: Outgoing) -> EmailMessage:
        ch = self.ch
        m = EmailMessage()
        sender = ch.sender or f"tomd@{socket.getfqdn() or 'localhost'}"
        prefix = {"error": "[tomd ERROR] ", "warning": "[tomd warning] "}.get(out.level, "[tomd] ")
        m["Subject"] = _cut(" ".join((prefix + out.subject).split()), 200)  # one line: no header injection
        m["From"] = sender
        m["To"] = ", ".join(ch.to)
        m["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
        domain = sender.rpartition("@")[2].strip("> ") or "tomd"
        # Stable across retries: a mail system that got the first try can drop the second.
        m["Message-ID"] = f"<tomd.{self.name}.{out.delivery_id}@{domain}>"
        m["X-Tomd-Delivery"] = out.delivery_id
        m.set_content(plain_text(out))
        if out.image_png:
            m.add_attachment(out.image_png, maintype="image", subtype="png", filename=out.image_name)
        return m

    def send(self, out: Outgoing) -> None:
        ch = self.ch
        where = f"email channel {self.name} ({ch.smtp_host}:{ch.smtp_port})"
        msg = self.build(out)
        try:
            if ch.smtp_ssl:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(ch.smtp_host, ch.smtp_port, timeout=ch.timeout,
                                                      context=self._context())
            else:
                smtp = smtplib.SMTP(ch.smtp_host, ch.smtp_port, timeout=ch.timeout)
            with smtp:
                smtp.ehlo()
                if ch.starttls and not ch.smtp_ssl:
                    if not smtp.has_extn("starttls"):
                        raise PermanentError(f"{where}: the server does not offer STARTTLS (set starttls = false "
                                             "only for a trusted local relay)")
                    smtp.starttls(context=self._context())
                    smtp.ehlo()
                if ch.username:
                    smtp.login(ch.username, ch.password.reveal() if ch.password else "")
                refused = smtp.send_message(msg)
            if refused:
                log.warning("%s: some recipients were refused: %s", where,
                            ", ".join(f"{a} ({c})" for a, (c, _) in refused.items()))
        except PermanentError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise PermanentError(f"{where}: authentication failed for user {ch.username!r} "
                                 f"({exc.smtp_code}): check username and password") from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [c for c, _ in exc.recipients.values()]
            text = ", ".join(f"{a} ({c} {self._said(m)})" for a, (c, m) in exc.recipients.items())
            if codes and all(400 <= c < 500 for c in codes):
                raise RetryableError(f"{where}: recipients refused for now: {text}") from None
            raise PermanentError(f"{where}: recipients refused: {text}") from None
        except smtplib.SMTPResponseException as exc:  # sender refused, data refused, connect refused
            text = f"{where}: {exc.smtp_code} {self._said(exc.smtp_error)}"
            if 400 <= exc.smtp_code < 500 or exc.smtp_code < 200:
                raise RetryableError(text) from None
            raise PermanentError(text) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise PermanentError(f"{where}: {self.scrub(str(exc))}") from None
        except ssl.SSLCertVerificationError as exc:
            raise PermanentError(f"{where}: the server's TLS certificate is not trusted ({exc.verify_message}); "
                                 "set ca_file for a private CA") from None
        except (TimeoutError, socket.timeout):
            raise RetryableError(f"{where}: no answer within {ch.timeout:g}s") from None
        except (smtplib.SMTPException, OSError) as exc:  # disconnects, refused connections, TLS errors
            raise RetryableError(f"{where}: {type(exc).__name__}: {self.scrub(str(exc))[:200]}") from None

    def _said(self, raw: Any) -> str:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return self.scrub(" ".join(text.split()))[:300]


class LogSender:
    """Writes the message to the log (logger ``tomd.notify.log``)."""

    kind = "log"
    logger = logging.getLogger("tomd.notify.log")

    def __init__(self, name: str, ch: Any = None):
        self.name = name

    def close(self) -> None:
        pass

    def send(self, out: Outgoing) -> None:
        level = {"error": logging.ERROR, "warning": logging.WARNING}.get(out.level, logging.INFO)
        body = plain_text(out).rsplit("\n-- \n", 1)[0].strip()
        self.logger.log(level, "[%s] %s", self.name, body.replace("\n", "\n    "),
                        extra={"channel": self.name, "delivery": out.delivery_id})


def make_sender(name: str, ch: Any, **kw: Any) -> Sender:
    if ch.kind == "slack":
        return SlackSender(name, ch, transport=kw.get("transport"))
    if ch.kind == "webhook":
        return WebhookSender(name, ch, transport=kw.get("transport"))
    if ch.kind == "email":
        return EmailSender(name, ch, ssl_context=kw.get("ssl_context"))
    if ch.kind == "log":
        return LogSender(name, ch)
    raise ValueError(f"unknown channel kind {ch.kind!r}")


def _version() -> str:
    from tomd import __version__

    return __version__


# ---------------------------------------------------------------- notifier --


@dataclass(frozen=True)
class NotifySettings:
    batch: int = 50  # rows claimed per channel per sweep (a digest takes up to digest_max)
    digest_max: int = 200
    lease_s: float = 300.0  # a claim's life; must outlast one send (the timeout is far shorter)
    backoff_base_s: float = 10.0
    backoff_cap_s: float = 3600.0
    interval_s: float = 5.0  # sweep period when nothing wakes the notifier


@dataclass(frozen=True)
class SendResult:
    """What one send did: ``state`` sent | retry | failed (for every row it carried)."""

    channel: str
    ids: tuple[int, ...]
    state: str
    error: str = ""
    next_attempt_at: datetime | None = None


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Notifier:
    """Sends queued notifications. Several notifiers (daemons) may share one database.

    A daemon component: ``name``, ``run(stop)``, ``wake()``.

    Build it with :meth:`from_config`; drive it with :meth:`run` in a thread
    (:meth:`wake` after committing new notifications) or :meth:`run_once`.
    ``observer`` gets ``observe_notification(channel, ok)`` per notification
    delivered (ok) or finally failed (not ok): :class:`tomd.metrics.Metrics` fits.
    """

    def __init__(self, sessions: sessionmaker[Session], channels: Mapping[str, Any],
                 senders: Mapping[str, Sender], *, storage: Any = None, settings: NotifySettings = NotifySettings(),
                 observer: Any = None, worker_id: str | None = None, clock: Callable[[], datetime] = _now,
                 rng: random.Random | None = None):
        self.sessions = sessions
        self.channels = dict(channels)
        self.senders = dict(senders)
        self.storage = storage
        self.settings = settings
        self.observer = observer
        self.worker = worker_id or default_worker_id()
        self.clock = clock
        self.rng = rng or random.Random()
        self.wake_event = threading.Event()
        # ``on_error(exc)``: told of every failed sweep (the daemon counts database errors in
        # tomd_database_errors_total{component="notifier"}); the log gets the first failure with
        # its traceback and repeats in one line now and then, not one traceback a second.
        self.on_error: Any = None
        self._failures = FailureLog(log, "notification sweep",
                                    on_error=lambda exc: self.on_error(exc) if self.on_error else None)

    name = "notifier"

    @classmethod
    def from_config(cls, config: Any, sessions: sessionmaker[Session], storage: Any = None, **kw: Any) -> Notifier:
        """Every ``[notify.channels.*]`` of ``config``; ``sender_options`` (transport, ssl_context) for tests."""
        opts = kw.pop("sender_options", {})
        channels = dict(config.notify.channels)
        senders = {name: make_sender(name, ch, **opts) for name, ch in channels.items()}
        for name, ch in channels.items():
            if ch.kind == "webhook" and not ch.secret:
                log.warning("notify channel %s: no secret, webhook bodies go unsigned", name)
        settings = kw.pop("settings", None) or NotifySettings(interval_s=config.notify.interval)
        return cls(sessions, channels, senders, storage=storage, settings=settings, **kw)

    def close(self) -> None:
        for s in self.senders.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass

    # -- driving ---------------------------------------------------------------

    def wake(self) -> None:
        """Sweep now (thread-safe; call after committing notifications)."""
        self.wake_event.set()

    def run(self, stop: threading.Event) -> None:
        """Sweep until ``stop`` is set: when woken, when a backed-off row is due, else every interval.
        Closes the senders' connections on the way out."""
        try:
            self._run(stop)
        finally:
            self.close()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake_event.clear()
            results: list[SendResult] = []
            try:
                results = self.run_once()
                self._failures.ok()
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the thread
                self._failures.failed(exc)
            if stop.is_set():
                break
            if any(r.state == "sent" for r in results) and len(results) >= self.settings.batch:
                continue  # more may be due
            wait = self.settings.interval_s
            try:
                now = self.clock()
                with self.sessions() as s:
                    nxt = repo.next_notification_attempt(s, now)
                if nxt is not None:
                    wait = min(wait, max(0.05, (nxt - now).total_seconds()))
            except Exception:  # noqa: BLE001
                pass
            if self.wake_event.wait(wait):
                continue
            if stop.wait(0):
                break
        log.info("notifier %s stopped", self.worker)

    def run_once(self) -> list[SendResult]:
        """One sweep: every channel with due notifications, within its limits."""
        now = self.clock()
        with self.sessions() as s:
            due = repo.due_notification_channels(s, now)
        out: list[SendResult] = []
        for channel in due:
            out.extend(self.run_channel(channel))
        return out

    def run_until_idle(self, timeout_s: float = 30.0) -> list[SendResult]:
        """Sweep until nothing is due now (tests, ``tomd notify flush``). Backed-off rows are left."""
        deadline = time.monotonic() + timeout_s
        out: list[SendResult] = []
        while time.monotonic() < deadline:
            got = self.run_once()
            out += got
            if not got:
                break
        return out

    # -- one channel -------------------------------------------------------------

    def run_channel(self, channel: str) -> list[SendResult]:
        ch = self.channels.get(channel)
        entries = self._claim(channel, ch)
        if not entries:
            return []
        if ch is None:
            why = f"no channel {channel!r} is configured (known: {', '.join(sorted(self.channels)) or 'none'})"
            return [self._finish(channel, entries, PermanentError(why))]
        if ch.digest:
            return [self._deliver(channel, ch, entries)]
        return [self._deliver(channel, ch, [e]) for e in entries]

    def _claim(self, channel: str, ch: Any) -> list[Entry]:
        """Claim what the channel may send now, under the channel's lock (limits hold across notifiers)."""
        now = self.clock()
        st = self.settings
        lease_until = now + timedelta(seconds=max(st.lease_s, 6 * (ch.timeout if ch else 10.0)))
        with self.sessions.begin() as s:
            limit = st.batch
            if ch is not None and (ch.rate_limit_per_hour or ch.digest):
                repo.lock_notification_channel(s, channel)
                stats = repo.notification_channel_stats(s, channel, since=now - timedelta(hours=1), now=now)
                if ch.digest:
                    last = stats["last_sent_at"]
                    if stats["in_flight"] or (last is not None and (now - last).total_seconds() < ch.digest):
                        return []
                    if ch.rate_limit_per_hour and stats["sent_batches"] >= ch.rate_limit_per_hour:
                        return []
                    limit = st.digest_max
                else:
                    room = ch.rate_limit_per_hour - stats["sent_rows"] - stats["in_flight"]
                    limit = min(limit, room)
            rows = repo.claim_notifications(s, self.worker, channel=channel, now=now, lease_until=lease_until,
                                            limit=limit)
            if not rows:
                return []
            return [self._entry(s, r) for r in rows]

    def _entry(self, s: Session, r: Any) -> Entry:
        try:
            msg = Message.from_json(r.message or {})
        except (TypeError, ValueError) as exc:  # a row written by hand or by an older tomd
            msg = Message(f"(unreadable notification #{r.id})", f"{exc}")
        tid = r.target_id if r.target_id is not None else msg.target_id
        target = load_target(s, tid) if tid is not None else None
        return Entry(r.id, msg, target, r.created_at, r.dedupe_key, r.event_id)

    def _deliver(self, channel: str, ch: Any, entries: list[Entry]) -> SendResult:
        out = Outgoing(channel, tuple(entries))
        try:
            out = self._with_image(ch, out)
            self.senders[channel].send(out)
        except (RetryableError, PermanentError) as exc:
            return self._finish(channel, entries, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not keep the claim until the lease ends
            scrub = getattr(self.senders.get(channel), "scrub", None) or (lambda t: t)
            log.error("notify channel %s: unexpected %s while sending", channel, type(exc).__name__)
            return self._finish(channel, entries, RetryableError(f"internal error: {type(exc).__name__}: "
                                                                 f"{scrub(str(exc))[:300]}"))
        return self._finish(channel, entries, None)

    def _finish(self, channel: str, entries: list[Entry], exc: Exception | None) -> SendResult:
        ids = [e.id for e in entries if e.id is not None]
        ch = self.channels.get(channel)
        now = self.clock()
        if exc is None:
            with self.sessions.begin() as s:
                held = repo.mark_notifications_sent(s, ids, worker=self.worker, sent_at=now)
            if held < len(ids):
                log.warning("notify channel %s: %d of %d notifications were sent after their claim ran out",
                            channel, len(ids) - held, len(ids))
            for _ in ids:
                self._observe(channel, True)
            log.info("notify channel %s: sent %s", channel,
                     f"a digest of {len(ids)}" if len(ids) > 1 else f"#{ids[0]}" if ids else "a message")
            return SendResult(channel, tuple(ids), "sent")
        final = isinstance(exc, PermanentError)
        attempts_now = self._attempts(ids)
        max_attempts = ch.max_attempts if ch is not None else 1
        if not final and attempts_now + 1 >= max_attempts:
            final = True
        delay = None
        if not final:
            delay = self._backoff(attempts_now + 1)
            retry_after = getattr(exc, "retry_after", None)
            if retry_after:
                delay = max(delay, min(float(retry_after), self.settings.backoff_cap_s))
        error = str(exc)
        if final and not isinstance(exc, PermanentError):
            error = f"gave up after {attempts_now + 1} attempts: {error}"
        nxt = now + timedelta(seconds=delay) if delay is not None else None
        with self.sessions.begin() as s:
            repo.release_notifications(s, ids, worker=self.worker, error=error, next_attempt_at=nxt,
                                       max_attempts=max_attempts, final=final)
        if final:
            for _ in ids:
                self._observe(channel, False)
            log.error("notify channel %s: %s failed: %s", channel, _ids_text(ids), error)
            return SendResult(channel, tuple(ids), "failed", error)
        log.warning("notify channel %s: %s not sent, retry in %.0fs: %s", channel, _ids_text(ids), delay, error)
        return SendResult(channel, tuple(ids), "retry", error, nxt)

    def _attempts(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        from tomd.db.models import Notification

        with self.sessions() as s:
            return max(s.get(Notification, i).attempts or 0 for i in ids)

    def _backoff(self, attempt: int) -> float:
        """Exponential with jitter: half fixed, half random (never a burst of synchronised retries)."""
        full = min(self.settings.backoff_cap_s, self.settings.backoff_base_s * 2 ** max(0, attempt - 1))
        return full / 2 + self.rng.uniform(0, full / 2)

    def _observe(self, channel: str, ok: bool) -> None:
        if self.observer is not None:
            try:
                self.observer.observe_notification(channel, ok)
            except Exception:  # noqa: BLE001 - metrics never break delivery
                log.debug("notification observer failed", exc_info=True)

    # -- light curves ----------------------------------------------------------------

    def _with_image(self, ch: Any, out: Outgoing) -> Outgoing:
        """Add the light curve where the channel can show it and the message asks for one."""
        if not ch.image or ch.kind not in ("email", "slack", "webhook") or out.digest:
            return out
        e = out.entries[0]
        if not e.message.image or e.target is None:
            return out
        if ch.kind in ("slack", "webhook") and not _can_presign(self.storage):
            # Incoming webhooks show images by public URL only; a local store has none.
            return out
        png = self._plot(e.target)
        if png is None:
            return out
        name = f"{_safe(e.target.name)}-light-curve.png"
        if ch.kind == "email":
            return replace(out, image_png=png, image_name=name)
        url = self._publish(e.target, png, name)
        return replace(out, image_url=url) if url else out

    def _plot(self, target: TargetInfo) -> bytes | None:
        from tomd.errors import InputError
        from tomd.products import plot_light_curve

        with self.sessions() as s:
            if not repo.has_photometry(s, target.id):
                return None
        with tempfile.TemporaryDirectory(prefix="tomd-notify-") as d:
            path = Path(d) / "lc.png"
            try:
                plot_light_curve(self.sessions, target.id, path)
            except (InputError, NotFoundError):
                return None
            except Exception:  # noqa: BLE001 - a plot problem must not stop the message
                log.warning("light curve of %s could not be drawn; sending without it", target.name, exc_info=True)
                return None
            return path.read_bytes()

    def _publish(self, target: TargetInfo, png: bytes, name: str) -> str | None:
        from tomd.storage import put_bytes

        key = f"notifications/light-curves/{target.id}/{hashlib.sha256(png).hexdigest()[:16]}/{name}"
        try:
            put_bytes(self.storage, key, png)
            return presigned_url(self.storage, key)
        except Exception as exc:  # noqa: BLE001
            log.warning("light curve of %s not published (%s); sending without it", target.name,
                        type(exc).__name__)
            return None

    # -- direct sending -------------------------------------------------------------

    def send_now(self, channel: str, message: Message) -> None:
        """Send one message now, outside the queue and its limits (``tomd notify test``).
        Raises RetryableError / PermanentError with the channel's words (secrets scrubbed)."""
        ch = self.channels.get(channel)
        if ch is None:
            raise NotFoundError(f"no notification channel {channel!r} (known: "
                                f"{', '.join(sorted(self.channels)) or 'none configured'})")
        target = None
        if message.target_id is not None:
            with self.sessions() as s:
                target = load_target(s, message.target_id)
        out = self._with_image(ch, Outgoing(channel, (Entry(None, message, target, self.clock()),)))
        self.senders[channel].send(out)


PRESIGN_EXPIRES_S = 7 * 24 * 3600  # the SigV4 maximum: a week after the message, the image link ends


def _can_presign(store: Any) -> bool:
    return store is not None and (hasattr(store, "presigned_url") or
                                  (hasattr(store, "client") and hasattr(store, "bucket")))


def presigned_url(store: Any, key: str, expires_s: int = PRESIGN_EXPIRES_S) -> str:
    """A time-limited public GET URL for a stored object (S3 stores only)."""
    if hasattr(store, "presigned_url"):
        return store.presigned_url(key, expires_s)
    full = f"{store.prefix}/{key}" if getattr(store, "prefix", "") else key
    return _presigner(store).generate_presigned_url("get_object", Params={"Bucket": store.bucket, "Key": full},
                                                    ExpiresIn=int(expires_s))


_PRESIGNERS: dict[tuple, Any] = {}


def _presigner(store: Any) -> Any:
    """A client like the store's that signs with SigV4 (botocore may pick the retired SigV2 for
    presigning, which AWS regions and S3-compatible stores increasingly refuse)."""
    import boto3
    from botocore.config import Config as BotoConfig

    region = store.client.meta.region_name
    key = (region, getattr(store, "endpoint_url", None))
    if key not in _PRESIGNERS:
        _PRESIGNERS[key] = boto3.session.Session().client(
            "s3", region_name=region, endpoint_url=key[1], config=BotoConfig(signature_version="s3v4"))
    return _PRESIGNERS[key]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "target"


def _ids_text(ids: Sequence[int]) -> str:
    return f"#{ids[0]}" if len(ids) == 1 else f"{len(ids)} notifications (#{ids[0]}…#{ids[-1]})" if ids else "message"
