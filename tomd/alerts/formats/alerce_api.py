"""ALeRCE ZTF API object (+ light curve) → Alert.

The poller hands over ``{"object": <row of /objects>, "detections": [...],
"non_detections": [...]}`` (the light curve of ``/objects/{oid}/lightcurve``);
a bare object row is read too. Object rows carry ``oid`` (the ZTF objectId),
``meanra``/``meandec``, ``firstmjd``/``lastmjd`` (MJD, UTC), ``ndet``, and the
classification the query selected (``class``, ``classifier``,
``probability``). Detections are ZTF measurements (``candid``, ``mjd``,
``fid``, ``magpsf``, ``sigmapsf``, ``isdiffpos`` ±1); non-detections give
``diffmaglim`` upper limits. The alert key is ``oid@lastmjd``. The points
are ZTF's measurements, so their source is ``ztf``: relayed by ALeRCE or read
from ZTF, a point is stored once; ``fields["broker"]`` says who relayed it.
"""

from __future__ import annotations

from typing import Any

from tomd.alerts.model import Alert, PhotPoint
from tomd.errors import ParseError

from ._common import check_radec, finite, mjd_utc_to_datetime, require, require_float, scalar_items
from .ztf import BANDS, _positive, difference_detection

SURVEY = "ztf"  # the photometry source of the relayed points, as ztf.parse gives it


def alert_key(row: dict) -> str | None:
    """``oid@lastmjd`` of an /objects row; None when the row lacks them (the parser says why)."""
    oid, last = row.get("oid"), finite(row.get("lastmjd"))
    return f"{oid}@{last:.6f}" if isinstance(oid, str) and oid and last is not None else None


def parse(record: dict) -> list[Alert]:
    obj = record.get("object", record) if "object" in record else record
    if not isinstance(obj, dict):
        raise ParseError("field object is not an object row")
    if record.get("_error"):
        raise ParseError(f"ALeRCE object {obj.get('oid')}: {record['_error']}")
    oid = require(obj, "oid")
    if not isinstance(oid, str) or not oid.strip():
        raise ParseError(f"field oid is not an object id: {oid!r}")
    lastmjd = require_float(obj, "lastmjd")
    ra, dec = check_radec(require_float(obj, "meanra"), require_float(obj, "meandec"))
    phot: list[PhotPoint] = []
    for i, d in enumerate(record.get("detections") or ()):
        phot.append(_detection(d, i))
    for i, n in enumerate(record.get("non_detections") or ()):
        p = _limit(n, i)
        if p is not None:
            phot.append(p)
    latest = max((p for p in phot if p.kind == "detection"), key=lambda p: p.mjd, default=None)
    fields = scalar_items(obj)
    for name in ("class", "classifier", "probability"):
        if name in obj:
            fields[f"alerce_{name}"] = obj[name]
    fields["broker"] = "alerce"
    return [Alert(
        source="alerce", key=alert_key(obj) or f"{oid}@{lastmjd:.6f}", time=mjd_utc_to_datetime(lastmjd),
        kind="transient", object_id=oid, ra=ra, dec=dec,
        band=latest.band if latest else None, mag=latest.mag if latest else None,
        mag_err=latest.mag_err if latest else None, flux=latest.flux if latest else None,
        photometry=tuple(phot), fields=fields, payload=record,
    )]


def _band(fid: Any, where: str) -> str:
    try:
        return BANDS[int(fid)]
    except (KeyError, TypeError, ValueError):
        raise ParseError(f"field {where}fid has an unknown filter id: {fid!r}") from None


def _detection(d: Any, i: int) -> PhotPoint:
    where = f"detections[{i}]."
    if not isinstance(d, dict):
        raise ParseError(f"{where[:-1]} is not an object")
    mjd = require_float(d, "mjd", where)
    # ALeRCE writes isdiffpos 1 / -1; -1 (a negative subtraction): negative flux, no magnitude.
    mag, err, flux, flux_err = difference_detection(
        finite(d.get("magpsf")), finite(d.get("sigmapsf")), _positive(d.get("isdiffpos")))
    return PhotPoint(
        mjd=mjd, band=_band(d.get("fid"), where), kind="detection", mag=mag, mag_err=err, flux=flux,
        flux_err=flux_err,
        limit=finite(d.get("diffmaglim")), source=SURVEY,
        measurement_id=str(d["candid"]) if d.get("candid") is not None else None,
    )


def _limit(n: Any, i: int) -> PhotPoint | None:
    where = f"non_detections[{i}]."
    if not isinstance(n, dict):
        raise ParseError(f"{where[:-1]} is not an object")
    limit = finite(n.get("diffmaglim"))
    if limit is None:
        return None
    return PhotPoint(mjd=require_float(n, "mjd", where), band=_band(n.get("fid"), where), kind="upper_limit",
                     limit=limit, source=SURVEY)
