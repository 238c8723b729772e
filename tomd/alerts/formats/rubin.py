"""Rubin (LSST) alert packets, lsst.v3 – v11 → Alert.

The packet centres on one ``diaSource`` (the trigger) with the object's
history ``prvDiaSources`` (detections), ``prvDiaForcedSources`` (forced
photometry) and, up to v7, ``prvDiaNondetectionLimits``. Names changed
across versions: v3–v4 have ``midPointTai``/``filterName``/``decl``/
``psFlux``; v5+ ``midpointMjdTai``/``band``/``dec``/``psfFlux``; v7.0 calls
the top-level id ``alertId``, later versions ``diaSourceId``; v8+ carry
``ssSource`` for known solar-system objects (v8–v9 with ``MPCORB``, v10+
with ``mpc_orbits``), v7 and v10.1+ an ``ssObject``. Times are MJD in TAI (converted
to UTC here); fluxes are nJy.
"""

from __future__ import annotations

import math
from typing import Any

from tomd.alerts.model import Alert, PhotPoint
from tomd.errors import ParseError

from ._common import (
    check_radec,
    finite,
    flux_err_to_mag_err,
    flux_to_mag,
    mjd_tai_to_datetime,
    mjd_tai_to_mjd_utc,
    require,
)
from .ztf import packet_json

CUTOUTS = {"cutoutScience": "science", "cutoutTemplate": "template", "cutoutDifference": "difference"}
PACKET_KEYS = frozenset(
    {
        "alertId", "diaSourceId", "observation_reason", "target_name", "diaSource", "prvDiaSources",
        "prvDiaForcedSources", "prvDiaNondetectionLimits", "diaObject", "ssObject", "ssSource",
        "MPCORB", "mpc_orbits", *CUTOUTS,
    }
)
SOURCE_FIELDS = (
    "reliability", "snr", "extendedness", "isDipole", "isNegative", "scienceFlux", "scienceFluxErr",
    "templateFlux", "templateFluxErr", "apFlux", "apFluxErr", "trailLength", "visit", "detector",
    "pixelFlags", "pixelFlags_saturatedCenter", "pixelFlags_crCenter", "spuriousness", "totFlux",
)
OBJECT_FIELDS = ("nDiaSources", "firstDiaSourceMjdTai", "lastDiaSourceMjdTai", "validityStartMjdTai")
# A 5-sigma limit is the usual reading of a non-detection noise level.
LIMIT_SIGMA = 5.0


def _get(row: dict, *names: str) -> Any:
    for n in names:
        v = row.get(n)
        if v is not None:
            return v
    return None


def band_name(value: Any) -> str | None:
    """'g' → 'lsstg' (the sncosmo/ZTF-style bandpass name, prefixed like 'ztfg')."""
    if value is None:
        return None
    b = str(value).strip()
    if not b:
        return None
    return b if b.startswith("lsst") else "lsst" + b


def _mjd_tai(row: dict) -> float | None:
    return finite(_get(row, "midpointMjdTai", "midPointTai"))


def source_point(row: dict, kind: str, source: str, id_field: str) -> PhotPoint | None:
    """A diaSource / diaForcedSource row → PhotPoint (negative fluxes kept)."""
    mjd = _mjd_tai(row)
    band = band_name(_get(row, "band", "filterName"))
    if mjd is None or band is None:
        return None
    flux = finite(_get(row, "psfFlux", "psFlux"))
    flux_err = finite(_get(row, "psfFluxErr", "psFluxErr"))
    if flux is None:
        return None
    mid = row.get(id_field)
    return PhotPoint(
        mjd=mjd_tai_to_mjd_utc(mjd),
        band=band,
        kind=kind,  # type: ignore[arg-type]
        flux=flux,
        flux_err=flux_err,
        mag=flux_to_mag(flux),
        mag_err=flux_err_to_mag_err(flux, flux_err),
        source=source,
        measurement_id=str(mid) if mid is not None else None,
    )


def limit_point(row: dict, source: str) -> PhotPoint | None:
    mjd = _mjd_tai(row)
    band = band_name(_get(row, "band", "filterName"))
    noise = finite(row.get("diaNoise"))
    if mjd is None or band is None or noise is None or noise <= 0:
        return None
    return PhotPoint(
        mjd=mjd_tai_to_mjd_utc(mjd), band=band, kind="upper_limit",
        limit=flux_to_mag(LIMIT_SIGMA * noise), source=source,
    )


def _solar_system_link(record: dict, dia: dict) -> tuple[Any, str | None]:
    """(ssObjectId, designation) of a known solar-system object, wherever the version puts them.

    ssObjectId: ``ssSource`` (v8+), ``ssObject`` (v7, v10.1+), ``MPCORB``
    (v8–v9) or the source's own ``ssObjectId``. Designation: ``ssSource`` /
    ``ssObject`` / ``mpc_orbits`` ``designation`` (v10+), ``MPCORB.mpcDesignation``
    (v8–v9, packed form).
    """
    parts = [record.get(k) for k in ("ssSource", "ssObject", "mpc_orbits", "MPCORB")]
    parts = [p for p in parts if isinstance(p, dict)]
    ss_id = next((p["ssObjectId"] for p in parts if p.get("ssObjectId")), None) or dia.get("ssObjectId")
    designation = next(
        (str(p[k]).strip() for p in parts for k in ("designation", "mpcDesignation")
         if p.get(k) is not None and str(p[k]).strip()),
        None,
    )
    return ss_id, designation


def parse(record: dict, *, source: str = "rubin") -> list[Alert]:
    """One Rubin alert record → one Alert."""
    dia = require(record, "diaSource")
    if not isinstance(dia, dict):
        raise ParseError("field diaSource is not a record")
    key = _get(dia, "diaSourceId") or _get(record, "diaSourceId", "alertId")
    if key is None:
        raise ParseError("missing field diaSource.diaSourceId")
    mjd_tai = _mjd_tai(dia)
    if mjd_tai is None:
        raise ParseError("missing field diaSource.midpointMjdTai")
    if not 50000 < mjd_tai < 80000:
        raise ParseError(f"field diaSource.midpointMjdTai is not a plausible MJD: {mjd_tai}")
    ra = finite(dia.get("ra"))
    dec = finite(_get(dia, "dec", "decl"))
    if ra is None:
        raise ParseError("missing field diaSource.ra")
    if dec is None:
        raise ParseError("missing field diaSource.dec")
    ra, dec = check_radec(ra, dec, "diaSource.")
    band = band_name(_get(dia, "band", "filterName"))
    flux = finite(_get(dia, "psfFlux", "psFlux"))
    flux_err = finite(_get(dia, "psfFluxErr", "psFluxErr"))

    trigger = PhotPoint(
        mjd=mjd_tai_to_mjd_utc(mjd_tai), band=band or "", kind="detection", flux=flux,
        flux_err=flux_err, mag=flux_to_mag(flux), mag_err=flux_err_to_mag_err(flux, flux_err),
        source=source, measurement_id=str(key),
    )
    phot = [trigger] if flux is not None and band else []
    seen = {str(key)}
    for row in record.get("prvDiaSources") or ():
        p = source_point(row, "detection", source, "diaSourceId")
        if p is not None and p.measurement_id not in seen:
            seen.add(p.measurement_id or "")
            phot.append(p)
    for row in record.get("prvDiaForcedSources") or ():
        p = source_point(row, "forced", source, "diaForcedSourceId")
        if p is not None:
            phot.append(p)
    for row in record.get("prvDiaNondetectionLimits") or ():
        p = limit_point(row, source)
        if p is not None:
            phot.append(p)

    fields: dict[str, Any] = {}
    for name in SOURCE_FIELDS:
        if name in dia:
            v = dia[name]
            fields[name] = (v if math.isfinite(v) else None) if isinstance(v, float) else v
    fields["real_bogus"] = finite(dia.get("reliability"))
    obj = record.get("diaObject")
    if isinstance(obj, dict):
        for name in OBJECT_FIELDS:
            if name in obj:
                fields[name] = obj[name]
    for name in ("observation_reason", "target_name"):
        if record.get(name) is not None:
            fields[name] = record[name]

    object_id = dia.get("diaObjectId")
    if not object_id and isinstance(obj, dict):
        object_id = obj.get("diaObjectId")

    kind = "transient"
    ss_id, designation = _solar_system_link(record, dia)
    if ss_id:  # 0 / null mean "not associated"
        fields["ssObjectId"] = ss_id
    if designation:
        fields["ss_designation"] = designation
    # v8+ send ssSource with every source of a known moving object. Up to v7
    # there is no ssSource: the source's ssObjectId (and the ssObject record)
    # say it, and such a source has no diaObject; the v7 sample packets fill
    # both, so an ssObject beside a diaObject stays a transient.
    if isinstance(record.get("ssSource"), dict) or (ss_id and not object_id):
        kind = "solar_system"

    ra_err = finite(dia.get("raErr"))
    dec_err = finite(_get(dia, "decErr", "declErr"))

    payload = packet_json(record, CUTOUTS)
    cutouts = {
        name: bytes(record[k]) for k, name in CUTOUTS.items() if isinstance(record.get(k), (bytes, bytearray))
    }
    return [
        Alert(
            source=source,
            key=str(key),
            time=mjd_tai_to_datetime(mjd_tai),
            kind=kind,  # type: ignore[arg-type]
            object_id=str(object_id) if object_id else None,
            ra=ra,
            dec=dec,
            ra_err_arcsec=ra_err * 3600.0 if ra_err is not None else None,
            dec_err_arcsec=dec_err * 3600.0 if dec_err is not None else None,
            band=band,
            mag=flux_to_mag(flux),
            mag_err=flux_err_to_mag_err(flux, flux_err),
            flux=flux,
            flux_err=flux_err,
            photometry=tuple(phot),
            fields=fields,
            payload=payload,
            cutouts=cutouts,
        )
    ]
