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
