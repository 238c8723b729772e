"""SCiMMA Hopskotch messages → Alert.

A hop message's Kafka value, as tomd receives it, is a JSON envelope:
hop-client < 0.5 wrote ``{"format": "voevent"|"circular"|"json"|"blob",
"content": ...}``; newer clients put ``_id`` (a UUID, the dedupe key) and
``_test`` in Kafka headers, which the consumer merges into the envelope.
Test messages (``_test`` true) are flagged as tests. The content is handed
to the GCN/LVK JSON parser, or the VOEvent parser when it is XML.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tomd.alerts import decode
from tomd.alerts.model import Alert
from tomd.errors import ParseError

from . import gcn_json, lvk, voevent
from ._common import content_key


def _content_alerts(content: Any, fmt: str) -> list[Alert]:
    if isinstance(content, (bytes, bytearray)):
        content = content.decode("utf-8", "replace")
    if isinstance(content, str):
        text = content.lstrip()
        if text.startswith("<"):
            return [a for r in decode.decode_voevent(text.encode()) for a in voevent.parse(r)]
        if text.startswith("{"):
            content = json.loads(text)
        else:
            raise ParseError(f"hop content of format {fmt!r} is neither JSON nor XML")
    if not isinstance(content, dict):
        raise ParseError("hop content is not an object")
    if "superevent_id" in content:
        return lvk.parse(content)
    return gcn_json.parse(content)


def parse(record: dict, *, source: str = "hop") -> list[Alert]:
    if not isinstance(record, dict):
        raise ParseError("hop message is not a JSON object")
    if "content" in record:
        content, fmt = record["content"], str(record.get("format", "json"))
    else:
        content, fmt = {k: v for k, v in record.items() if not k.startswith("_")}, "json"
    test = bool(record.get("_test"))
    msg_id = record.get("_id")
    alerts = _content_alerts(content, fmt)
    out = []
    for a in alerts:
        key = str(msg_id) if msg_id else a.key
        if not msg_id and a.key.startswith("sha256:"):
            key = content_key(record)
        out.append(
            dataclasses.replace(
                a, source=source, key=key, test=a.test or test,
                fields={**a.fields, "hop_format": fmt, "inner_key": a.key, "inner_source": a.source},
            )
        )
    return out


def with_headers(value: bytes, headers) -> bytes:
    """The JSON envelope ``parse`` reads, from a Kafka value and its headers.

    hop-client ≥ 0.8 sends the content itself as the value and puts ``_id``
    (16 UUID bytes), ``_test`` and ``_format`` in Kafka headers; older clients
    sent a ``{"format", "content"}`` envelope. Either way the result carries
    ``_id`` (hex) and ``_test`` for dedupe and test filtering.
    """
    h = {k: v for k, v in (headers or ()) if k in ("_id", "_test", "_format")}
    if not h:
        return value
    extra: dict[str, Any] = {}
    if h.get("_id"):
        raw = h["_id"]
        extra["_id"] = raw.hex() if len(raw) == 16 else raw.decode("utf-8", "replace")
    if h.get("_test") is not None:
        extra["_test"] = h["_test"].strip().lower() in (b"true", b"1", b"yes")
    fmt = h.get("_format")
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
    if fmt is not None:
        envelope: dict[str, Any] = {"format": fmt.decode("utf-8", "replace"), "content": text}
    else:
        try:
            envelope = json.loads(text)
        except ValueError:
            envelope = {"format": "blob", "content": text}
        if not isinstance(envelope, dict):
            envelope = {"format": "json", "content": envelope}
    envelope.update(extra)
    return json.dumps(envelope).encode()
