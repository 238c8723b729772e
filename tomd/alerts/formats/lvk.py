"""LVK ``igwn.gwalert`` notices (Avro container or JSON) → Alert.

One schema (igwn.alerts.v1_0.Alert) for both framings: ``superevent_id``,
``alert_type`` (EARLYWARNING, PRELIMINARY, INITIAL, UPDATE, RETRACTION),
``time_created`` (ISO UTC), ``event`` (null for a retraction) with the
skymap (multi-order FITS; raw bytes in Avro, base64 in JSON), and
``external_coinc``. The skymap's 90% credible area and most probable
direction are computed here (:func:`skymap_summary`). Superevent ids starting "MS" (mock, the MDC replay) or
"TS" (test), or an event from the "MDC" search, are tests.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# The credible level whose area rules see (and that decides whether a skymap
# is small enough to become a target).
CREDIBLE = 0.9
_JRLL = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)  # HEALPix face → ring offset
_JPLL = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)  # HEALPix face → longitude offset


@dataclass(frozen=True)
class SkymapSummary:
    area_90_deg2: float  # the smallest region holding 90% of the probability
    ra: float  # the most probable pixel's centre, ICRS degrees
    dec: float


def skymap_summary(data: bytes) -> SkymapSummary:
    """The 90% credible area and most probable direction of a multi-order (NUNIQ) skymap.

    Each row is a HEALPix pixel of its own order: ``UNIQ = 4·4^order + ipix``
    (nested), with ``PROBDENSITY`` per steradian. The 90% region is the
    densest pixels until they hold 90% of the probability; its area is the
    sum of theirs. Raises ParseError for a file that is not such a skymap.
    """
    import io

    import numpy as np
    from astropy.io import fits

    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            table = next((h for h in hdul[1:] if getattr(h, "columns", None) is not None
                          and "UNIQ" in h.columns.names), None)
            if table is None:
                raise ParseError("skymap: no multi-order (UNIQ) table")
            uniq = np.asarray(table.data["UNIQ"], dtype=np.int64)
            rho = np.asarray(table.data["PROBDENSITY"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ParseError(f"skymap: not a readable multi-order FITS file ({exc.__class__.__name__}: {exc})") from None
    if uniq.size == 0 or np.any(uniq < 4) or not np.all(np.isfinite(rho)):
        raise ParseError("skymap: empty, or a UNIQ below 4, or a density that is not finite")
    # floor(log2(uniq)) is exact here: orders stay far below 2^52 pixels.
    order = (np.floor(np.log2(uniq)).astype(np.int64) - 2) // 2
    area = 4.0 * np.pi / (12.0 * 4.0 ** order)  # steradians
    prob = rho * area
    densest = np.argsort(-rho, kind="stable")
    cum = np.cumsum(prob[densest])
    n = int(np.searchsorted(cum, CREDIBLE * cum[-1])) + 1
    area90 = float(area[densest[:n]].sum()) * (180.0 / np.pi) ** 2
    top = int(densest[0])
    o = int(order[top])
    ra, dec = _nest_center(o, int(uniq[top]) - 4 * 4 ** o)
    return SkymapSummary(area90, ra, dec)


def _nest_center(order: int, ipix: int) -> tuple[float, float]:
    """(ra, dec) in degrees of a nested HEALPix pixel's centre (Górski et al. 2005; HEALPix pix2loc)."""
    import math

    nside = 1 << order
    npface = nside * nside
    face, ipf = divmod(ipix, npface)
    ix = iy = 0
    for bit in range(order):  # de-interleave: x takes the even bits, y the odd ones
        ix |= ((ipf >> (2 * bit)) & 1) << bit
        iy |= ((ipf >> (2 * bit + 1)) & 1) << bit
    jr = _JRLL[face] * nside - ix - iy - 1
    if jr < nside:  # north polar cap
        nr = jr
        z = 1.0 - nr * nr / (3.0 * npface)
    elif jr > 3 * nside:  # south polar cap
        nr = 4 * nside - jr
        z = nr * nr / (3.0 * npface) - 1.0
    else:  # equatorial belt
        nr = nside
        z = (2 * nside - jr) * 2.0 / (3.0 * nside)
    tmp = _JPLL[face] * nr + ix - iy
    if tmp < 0:
        tmp += 8 * nr
    phi = math.pi * tmp / (4.0 * nr)
    ra = math.degrees(phi) % 360.0
    dec = math.degrees(math.asin(max(-1.0, min(1.0, z))))
    return ra, dec


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
    loc = None
    if skymap is not None:
        # The 90% area lets rules judge the localisation, and a small enough
        # one become a target at its most probable direction. A skymap that
        # cannot be read costs only that (noted), not the notice.
        try:
            summary = skymap_summary(skymap)
        except ParseError as exc:
            fields["skymap_error"] = str(exc)
            summary = None
        loc = Localization(skymap=skymap, skymap_format="multiorder-fits",
                           ra=summary.ra if summary else None, dec=summary.dec if summary else None,
                           area_90_deg2=summary.area_90_deg2 if summary else None)
        if summary is not None:
            fields["area_90_deg2"] = round(summary.area_90_deg2, 3)
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
