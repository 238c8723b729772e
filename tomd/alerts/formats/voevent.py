"""VOEvent 2.0 packets (GCN, LVK, Gaia, …) → Alert.

The IVORN is the key (unique by the VOEvent standard). ``role="test"`` (or
"utility") marks a test. The position is WhereWhen's Position2D with its
Error2Radius; the time is its ISOTime, in the time system named by the
coordinate system id (``UTC-FK5-GEO``, ``TDB-ICRS-BARY``, …). Non-UTC times
and FK5 positions are converted with astropy (VOEvents are rare, so the
cost does not matter).
"""

from __future__ import annotations

from typing import Any

from tomd.alerts.model import Alert, Localization
from tomd.errors import ParseError

from ._common import check_radec, finite, parse_iso_utc
from .gcn_binary import TYPES as GCN_TYPES
from .gcn_binary import qualified_id

TEST_ROLES = frozenset({"test", "utility"})
TIME_SCALES = {"UTC": "utc", "TT": "tt", "TDB": "tdb", "TAI": "tai", "TCB": "tcb", "TCG": "tcg", "GPS": "tai"}


def _time_system(coord_system: str | None) -> tuple[str, str]:
    """'UTC-FK5-GEO' → ('UTC', 'FK5'); unknown parts default to UTC / ICRS."""
    parts = (coord_system or "").upper().split("-")
    scale = parts[0] if parts and parts[0] in TIME_SCALES else "UTC"
    frame = parts[1] if len(parts) > 1 else "ICRS"
    return scale, frame


def _to_utc(iso: str, scale: str):
    dt = parse_iso_utc(iso, "WhereWhen.ISOTime")
    if scale == "UTC":
        return dt
    from datetime import timezone

    from astropy.time import Time

    t = Time(dt.replace(tzinfo=None).isoformat(), format="isot", scale=TIME_SCALES[scale])
    if scale == "GPS":  # GPS = TAI - 19 s; astropy knows it as a format, not a scale
        t = Time(t.tai.gps, format="gps")
    return t.utc.to_datetime(timezone.utc)


def _to_icrs(ra: float, dec: float, frame: str) -> tuple[float, float]:
    if frame in ("ICRS", ""):
        return ra, dec
    from astropy import units as u
    from astropy.coordinates import FK4, FK5, SkyCoord

    frames = {"FK5": FK5(equinox="J2000"), "FK4": FK4(equinox="B1950")}
    if frame not in frames:
        return ra, dec
    c = SkyCoord(ra * u.deg, dec * u.deg, frame=frames[frame]).icrs
    return float(c.ra.deg), float(c.dec.deg)


def _mission(ivorn: str, packet_type: Any) -> str | None:
    """The mission of a packet: its GCN packet type's, else the IVORN's stream.

    'ivo://nasa.gsfc.gcn/SWIFT#BAT_GRB_Pos_1125809-092' → 'SWIFT'; the AMON
    stream carries IceCube tracks, and packet type 174 says so.
    """
    try:
        info = GCN_TYPES.get(int(packet_type)) if packet_type is not None else None
    except (TypeError, ValueError):
        info = None
    if info is not None and info.mission != "GCN":
        return info.mission
    stream = ivorn.split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return stream or None


def parse(record: dict, *, source: str = "gcn") -> list[Alert]:
    ivorn = record.get("ivorn")
    if not ivorn:
        raise ParseError("missing field VOEvent@ivorn")
    params: dict[str, Any] = record.get("params") or {}
    scale, frame = _time_system(record.get("coord_system"))
    if record.get("time"):
        time = _to_utc(record["time"], scale)
    elif record.get("date"):
        time = parse_iso_utc(record["date"], "Who.Date")
    else:
        raise ParseError("missing field WhereWhen ISOTime (nor Who/Date)")

    ra = finite(record.get("ra"))
    dec = finite(record.get("dec"))
    err = finite(record.get("error_radius"))
    unit = (record.get("position_unit") or "deg").lower()
    if err is not None and err <= 0:
        err = None
    # GCN writes RA=Dec=0 with no error for notices that carry no position.
    if ra == 0.0 and dec == 0.0 and err is None:
        ra = dec = None
    if ra is not None and dec is not None:
        if unit not in ("deg", "degree", "degrees"):
            raise ParseError(f"field Position2D@unit {unit!r} is not degrees")
        ra, dec = check_radec(ra, dec, "Position2D.")
        ra, dec = check_radec(*_to_icrs(ra, dec, frame))
    else:
        ra = dec = None

    ptype = params.get("Packet_Type")
    notice_type = params.get("AlertType")
    if notice_type is None and ptype is not None:
        try:
            info = GCN_TYPES.get(int(ptype))
            notice_type = info.name if info else f"packet_type_{ptype}"
        except ValueError:
            notice_type = str(ptype)
    # LVK GraceIDs are unique; GCN trigger numbers are per mission, so they are
    # qualified by it ("swift:1125809"), as the JSON and binary notices are.
    event_id = params.get("GraceID")
    trig = params.get("TrigID") or params.get("EventID")
    if trig is None and params.get("run_id") and params.get("event_id"):
        trig = f"{params['run_id']}_{params['event_id']}"  # IceCube (AMON): as its JSON notices name it
    if event_id is None and trig is not None:
        event_id = qualified_id(_mission(str(ivorn), ptype), str(trig))
    role = str(record.get("role", "observation")).lower()
    retraction = str(params.get("AlertType", "")).lower() == "retraction" or str(ptype) == "164"
    fields: dict[str, Any] = {
        k: v for k, v in params.items() if isinstance(v, str) and len(v) < 512
    }
    fields["role"] = role
    if record.get("date"):
        try:  # Who/Date: when the packet was issued; orders the refinements of one event
            fields["issued"] = parse_iso_utc(record["date"], "Who.Date").isoformat()
        except ParseError:
            pass
    if record.get("author"):
        fields["author"] = record["author"]
    if record.get("citations"):
        fields["citations"] = list(record["citations"])
    skymap_url = params.get("skymap_fits")
    loc = None
    if ra is not None or skymap_url:
        loc = Localization(ra=ra, dec=dec, error_deg=err if ra is not None else None)
    return [
        Alert(
            source=source,
            key=str(ivorn),
            time=time,
            kind="localization",
            ra=ra,
            dec=dec,
            event_id=str(event_id) if event_id is not None else None,
            notice_type=notice_type,
            localization=loc,
            retraction=retraction,
            test=role in TEST_ROLES,
            fields=fields,
            payload={k: v for k, v in record.items() if k != "params"} | {"params": params},
        )
    ]
