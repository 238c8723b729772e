"""Fink API row (``/api/v1/latests``, ``/api/v1/objects``) → Alert.

Rows are flat, columns prefixed by family: ``i:`` the ZTF candidate
(``i:candid``, ``i:objectId``, ``i:ra``, ``i:dec``, ``i:jd``, ``i:magpsf``,
``i:sigmapsf``, ``i:fid``, ``i:isdiffpos``, ``i:drb``, ...), ``d:`` Fink's
added values (``d:cdsxmatch``, ``d:rf_snia_vs_nonia``, ``d:tns``, ...) and
``v:`` values computed at query time (``v:classification``). The alert has
source ``fink`` and key ``candid``, as the alerts of Fink's Kafka stream
(``fink-avro``) do, so one alert seen both ways is stored once. Fink's
columns go into ``fields`` under their names without the family prefix.
``d:tns`` is the TNS classification ("SN Ia"), kept as ``tns_class``; it is
an alias only when shaped like a designation. The point is ZTF's own
measurement, so its source is ``ztf`` (one point however it arrived).
"""

from __future__ import annotations

import math

from tomd.alerts.model import Alert, PhotPoint
from tomd.errors import ParseError

from ._common import MJD0, check_radec, finite, jd_utc_to_datetime, require, require_float
from ._tns import tns_designation
from .ztf import BANDS, FIELDS, _positive, difference_detection


def parse(record: dict) -> list[Alert]:
    candid = require(record, "i:candid")
    if isinstance(candid, bool) or not isinstance(candid, (int, str)) or not str(candid).strip().isdigit():
        raise ParseError(f"field i:candid is not a candidate id: {candid!r}")
    object_id = require(record, "i:objectId")
    jd = require_float(record, "i:jd")
    if not 2.4e6 < jd < 2.6e6:
        raise ParseError(f"field i:jd is not a plausible Julian date: {jd}")
    ra, dec = check_radec(require_float(record, "i:ra"), require_float(record, "i:dec"))
    try:
        band = BANDS[int(require(record, "i:fid"))]
    except (KeyError, TypeError, ValueError):
        raise ParseError(f"field i:fid has an unknown filter id: {record.get('i:fid')!r}") from None
    # A negative subtraction (i:isdiffpos 'f'): negative flux, no magnitude (see ztf.difference_detection).
    mag, err, flux, flux_err = difference_detection(
        finite(record.get("i:magpsf")), finite(record.get("i:sigmapsf")), _positive(record.get("i:isdiffpos", "t")))
    point = PhotPoint(mjd=jd - MJD0, band=band, kind="detection", mag=mag, mag_err=err, flux=flux,
                      flux_err=flux_err, limit=finite(record.get("i:diffmaglim")), source="ztf",
                      measurement_id=str(candid))
    fields: dict = {}
    for k, v in record.items():
        family, _, name = k.partition(":")
        if not name or not (v is None or isinstance(v, (str, int, float, bool))):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if family in ("d", "v") or (family == "i" and name in FIELDS):
            fields[name] = v
    rb = finite(record.get("i:drb"))
    fields["real_bogus"] = rb if rb is not None else finite(record.get("i:rb"))
    fields["survey"] = "ztf"
    fields["broker"] = "fink"
    aliases = []
    tns = record.get("d:tns")
    name = tns_designation(tns)
    if name:
        aliases.append(name)
        fields["tns_name"] = name
    elif isinstance(tns, str) and tns.strip():
        fields["tns_class"] = tns.strip()
    return [Alert(
        source="fink", key=str(candid).strip(), time=jd_utc_to_datetime(jd), kind="transient",
        object_id=str(object_id), ra=ra, dec=dec, band=band, mag=mag, mag_err=err, flux=flux, flux_err=flux_err,
        photometry=(point,), aliases=tuple(aliases), fields=fields, payload=record,
    )]
