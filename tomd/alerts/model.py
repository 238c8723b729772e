"""The normalised alert: what every survey parser produces.

One shape for every source, so the later stages (targets, rules) never look
at survey formats. Times are UTC (astropy does the scale conversions in the
parsers); positions are ICRS degrees; magnitudes are AB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

PhotKind = Literal["detection", "upper_limit", "forced"]


class PayloadJson(bytes):
    """A payload already serialised as JSON: by the ZTF and Rubin parsers
    (``formats.ztf.packet_json``), and by a parse worker (tomd/alerts/parallel.py).

    Written in one C pass instead of a walk over thousands of values, sent
    between processes as one string, stored as it is, and made a dict only
    where something reads inside it (``payload_dict``).
    """

    __slots__ = ()


def payload_dict(payload: Any) -> dict[str, Any]:
    """An alert's payload as a dict, whichever form it travels in."""
    if type(payload) is dict:
        return payload
    if isinstance(payload, PayloadJson):
        import orjson

        value = orjson.loads(memoryview(payload))  # orjson takes no bytes subclass
        return value if isinstance(value, dict) else {}
    return payload if isinstance(payload, dict) else {}
AlertKind = Literal["transient", "localization", "solar_system"]


@dataclass(frozen=True, slots=True)
class PhotPoint:
    """One photometric measurement or upper limit.

    ``mjd`` is MJD in UTC. For a detection ``mag``/``mag_err`` (AB) and/or
    ``flux``/``flux_err`` (nJy; may be negative for a difference flux) are set.
    For an upper limit only ``limit`` (the AB limiting magnitude) is set.
    """

    mjd: float
    band: str
    kind: PhotKind = "detection"
    mag: float | None = None
    mag_err: float | None = None
    flux: float | None = None
    flux_err: float | None = None
    limit: float | None = None
    source: str = ""
    # Survey id of this measurement when it has one (ZTF candid, Rubin diaSourceId).
    measurement_id: str | None = None


@dataclass(frozen=True, slots=True)
class Localization:
    """A sky region without a point source: GRB error circle, GW skymap."""

    ra: float | None = None
    dec: float | None = None
    error_deg: float | None = None  # radius (90% where the source says so)
    skymap: bytes | None = None  # multi-order FITS bytes, kept as a data product
    skymap_format: str | None = None
    area_90_deg2: float | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    """A normalised alert.

    ``key`` is unique per ``source`` and is what makes a replay a no-op:
    ZTF ``candid``, Rubin ``diaSourceId``, GCN/LVK notice id, hop ``_id``,
    else a content hash.
    """

    source: str  # "ztf", "rubin", "gcn", "lvk", "fink", "lasair", "antares", ...
    key: str
    time: datetime  # UTC, timezone-aware
    kind: AlertKind = "transient"
    object_id: str | None = None  # survey object name (ZTF objectId, Rubin diaObjectId)
    ra: float | None = None
    dec: float | None = None
    ra_err_arcsec: float | None = None
    dec_err_arcsec: float | None = None
    band: str | None = None
    mag: float | None = None
    mag_err: float | None = None
    flux: float | None = None  # nJy
    flux_err: float | None = None
    # The triggering measurement plus the history carried by the packet.
    photometry: tuple[PhotPoint, ...] = ()
    # Other names for the object (TNS name, broker ids), recorded as aliases.
    aliases: tuple[str, ...] = ()
    # Event alerts (GCN, LVK): event id, notice type, localisation.
    event_id: str | None = None
    notice_type: str | None = None
    localization: Localization | None = None
    retraction: bool = False
    test: bool = False  # a mock/test event: ignored unless the config asks
    # Survey-specific scalar fields worth keeping at top level (real_bogus, ...).
    fields: dict[str, Any] = field(default_factory=dict)
    # The survey payload, kept (cutouts removed; see ``cutouts``): a dict, or PayloadJson from a parse worker.
    payload: dict[str, Any] | PayloadJson = field(default_factory=dict)
    cutouts: dict[str, bytes] = field(default_factory=dict)
