"""LVK ``igwn.gwalert`` notices (Avro container or JSON) → Alert.

One schema (igwn.alerts.v1_0.Alert) for both framings: ``superevent_id``,
``alert_type`` (EARLYWARNING, PRELIMINARY, INITIAL, UPDATE, RETRACTION),
``time_created`` (ISO UTC), ``event`` (null for a retraction) with the
skymap (multi-order FITS; raw bytes in Avro, base64 in JSON), and
``external_coinc``. Superevent ids starting "MS" (mock, the MDC replay) or
"TS" (test), or an event from the "MDC" search, are tests.
"""

from __future__ import annotations

from typing import Any

from tomd.alerts.model import Alert, Localization
from tomd.errors import ParseError

from ._common import finite, parse_iso_utc, scalar_items
from .gcn_json import decode_skymap
from .ztf import clean

# "T…" covers TS and TGW (test), "M…" MS and MGW (mock); real ones are S… and GW….
TEST_PREFIXES = ("M", "T")


def _skymap(value: Any, field: str, fields: dict[str, Any]) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return decode_skymap(value, field, fields)


def parse(record: dict, *, source: str = "lvk") -> list[Alert]:
    if not isinstance(record, dict):
        raise ParseError("LVK notice is not an object")
    sid = record.get("superevent_id")
    if not sid:
        raise ParseError("missing field superevent_id")
    alert_type = record.get("alert_type")
    if not alert_type:
        raise ParseError("missing field alert_type")
    if not record.get("time_created"):
        raise ParseError("missing field time_created")
    created = parse_iso_utc(record["time_created"], "time_created")
    event = record.get("event") if isinstance(record.get("event"), dict) else None
    fields: dict[str, Any] = scalar_items(record)
    fields["issued"] = created.isoformat()  # orders the refinements of one superevent
    time = created
    skymap = None
    if event is not None:
        if event.get("time"):
            time = parse_iso_utc(event["time"], "event.time")
        fields.update(scalar_items(event, skip={"skymap"}))
        for group in ("classification", "properties"):
            if isinstance(event.get(group), dict):
                fields[group] = {k: finite(v) for k, v in event[group].items()}
                fields.update({k: finite(v) for k, v in event[group].items()})
        if event.get("instruments"):
            fields["instruments"] = list(event["instruments"])
        skymap = _skymap(event.get("skymap"), "event.skymap", fields)
    ext = record.get("external_coinc") if isinstance(record.get("external_coinc"), dict) else None
    if ext is not None:
        fields.update({f"external_{k}": v for k, v in scalar_items(ext).items()})
    sid = str(sid)
    search = str((event or {}).get("search", "")).upper()
    test = sid.upper().startswith(TEST_PREFIXES) or search == "MDC"
    payload = clean(
        {
            **{k: v for k, v in record.items() if k not in ("event", "external_coinc")},
            "event": {k: v for k, v in event.items() if k != "skymap"} if event else None,
            "external_coinc": {k: v for k, v in ext.items() if k != "combined_skymap"} if ext else None,
        }
    )
    loc = (
        Localization(skymap=skymap, skymap_format="multiorder-fits") if skymap is not None else None
    )
    return [
        Alert(
            source=source,
            # An external-coincidence UPDATE can share time_created with the
            # plain UPDATE (the LVK user-guide examples do): keep both.
            key=f"{sid}:{alert_type}:{record['time_created']}"
            + (f":ext:{ext.get('gcn_notice_id') or ext.get('ivorn') or 'coinc'}" if ext else ""),
            time=time,
            kind="localization",
            event_id=sid,
            notice_type=str(alert_type),
            localization=loc,
            retraction=str(alert_type).upper() == "RETRACTION",
            test=test,
            fields=fields,
            payload=payload,
        )
    ]
