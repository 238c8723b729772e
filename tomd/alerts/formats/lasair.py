"""Lasair filter output (JSON, one object per Kafka message) → Alert.

A Lasair filter emits the columns the filter's SELECT names. Lasair-LSST
messages carry ``diaObjectId``, ``ra``/``decl``, ``lastDiaSourceMjdTai``
(TAI) and, when the filter asks for it, the whole ``alert`` with
``diaSourcesList``, ``diaForcedSourcesList`` and
``diaNondetectionLimitsList``. Lasair-ZTF messages carry ``objectId``,
``ramean``/``decmean`` and ``jdmax``/``mjdmax`` (UTC). ``UTC`` is when the
filter ran. The key is the object id plus the time of its latest detection,
so a replay of the same message is a no-op and a new detection is new.

The sources are Rubin's own measurements, so their points carry the survey
(``rubin``) as source: relayed by Lasair or read from Rubin, a point is one
point. ``fields["broker"]`` says who relayed the alert. ``tns_name`` becomes
an alias only when it is a TNS designation (see :mod:`._tns`).
"""

from __future__ import annotations

from typing import Any

from tomd.alerts.model import Alert, PhotPoint
from tomd.errors import ParseError

from . import rubin
from ._common import (
    MJD0,
    check_radec,
    finite,
    flux_to_mag,
    jd_utc_to_datetime,
    mjd_tai_to_datetime,
    mjd_utc_to_datetime,
    parse_iso_utc,
    scalar_items,
)
from ._tns import tns_designation
from .ztf import clean


def _first(record: dict, *names: str) -> Any:
    for n in names:
        if record.get(n) is not None:
            return record[n]
    return None


SURVEY_LSST = "rubin"  # the photometry source of Rubin points, as rubin.parse gives it


def _tns_aliases(record: dict) -> tuple[str, ...]:
    name = tns_designation(record.get("tns_name"))
    return (name,) if name else ()


def parse(record: dict, *, source: str = "lasair") -> list[Alert]:
    if not isinstance(record, dict):
        raise ParseError("Lasair message is not a JSON object")
    if record.get("diaObjectId") is not None:
        return [_parse_lsst(record, source)]
    if record.get("objectId") is not None:
        return [_parse_ztf(record, source)]
    raise ParseError("Lasair message has neither diaObjectId nor objectId")


def _position(record: dict, ra_names: tuple[str, ...], dec_names: tuple[str, ...]) -> tuple[float | None, float | None]:
    ra = finite(_first(record, *ra_names))
    dec = finite(_first(record, *dec_names))
    if ra is None:
        raise ParseError(f"missing field {ra_names[0]}")
    if dec is None:
        raise ParseError(f"missing field {dec_names[0]}")
    return check_radec(ra, dec)


def _parse_lsst(record: dict, source: str) -> Alert:
    object_id = str(record["diaObjectId"])
    ra, dec = _position(record, ("ra",), ("decl", "dec"))
    alert = record.get("alert") if isinstance(record.get("alert"), dict) else {}
    sources = alert.get("diaSourcesList") or []
    latest = max(sources, key=lambda s: finite(s.get("midpointMjdTai")) or 0.0) if sources else None
    mjd_tai = finite(record.get("lastDiaSourceMjdTai"))
    if mjd_tai is None and latest is not None:
        mjd_tai = finite(latest.get("midpointMjdTai"))
    if mjd_tai is None:
        raise ParseError("missing field lastDiaSourceMjdTai")
    phot: list[PhotPoint] = []
    seen: set[str] = set()
    for row in sources:
        p = rubin.source_point(row, "detection", SURVEY_LSST, "diaSourceId")
        if p is not None and p.measurement_id not in seen:
            seen.add(p.measurement_id or "")
            phot.append(p)
    for row in alert.get("diaForcedSourcesList") or []:
        p = rubin.source_point(row, "forced", SURVEY_LSST, "diaForcedSourceId")
        if p is not None:
            phot.append(p)
    for row in alert.get("diaNondetectionLimitsList") or []:
        p = rubin.limit_point(row, SURVEY_LSST)
        if p is not None:
            phot.append(p)
    fields = scalar_items(record, skip={"alert"})
    fields["survey"] = "rubin"
    fields["broker"] = source
    band = flux = flux_err = None
    if latest is not None:
        band = rubin.band_name(latest.get("band"))
        flux = finite(latest.get("psfFlux"))
        flux_err = finite(latest.get("psfFluxErr"))
        fields["diaSourceId"] = latest.get("diaSourceId")
        fields["real_bogus"] = finite(latest.get("reliability"))
    elif finite(record.get("latestR")) is not None:
        fields["real_bogus"] = finite(record.get("latestR"))
    mag = flux_to_mag(flux)
    aliases = _tns_aliases(record)
    return Alert(
        source=source,
        key=f"{object_id}@{mjd_tai!r}",
        time=mjd_tai_to_datetime(mjd_tai),
        object_id=object_id,
        ra=ra,
        dec=dec,
        band=band,
        mag=mag,
        flux=flux,
        flux_err=flux_err,
        photometry=tuple(phot),
        aliases=aliases,
        fields=fields,
        payload=clean(record),
    )


def _parse_ztf(record: dict, source: str) -> Alert:
    object_id = str(record["objectId"])
    ra, dec = _position(record, ("ramean", "ra"), ("decmean", "decl", "dec"))
    jd = finite(_first(record, "jdmax", "jd"))
    mjd = finite(_first(record, "mjdmax", "mjd"))
    if jd is not None:
        time, stamp = jd_utc_to_datetime(jd), jd - MJD0
    elif mjd is not None:
        time, stamp = mjd_utc_to_datetime(mjd), mjd
    elif record.get("UTC"):
        time = parse_iso_utc(record["UTC"], "UTC")
        stamp = time.isoformat()
    else:
        raise ParseError("missing field jdmax")
    fields = scalar_items(record)
    fields["survey"] = "ztf"
    fields["broker"] = source
    aliases = _tns_aliases(record)
    return Alert(
        source=source,
        key=f"{object_id}@{stamp!r}",
        time=time,
        object_id=object_id,
        ra=ra,
        dec=dec,
        mag=finite(_first(record, "latestmag", "magr", "rmag", "gmag")),
        aliases=aliases,
        fields=fields,
        payload=clean(record),
    )
