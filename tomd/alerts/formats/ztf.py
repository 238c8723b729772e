"""ZTF alert packets (public schemas 1.8 – 4.02) → Alert.

A packet holds the triggering ``candidate``, the 30-day history
``prv_candidates`` (detections, and non-detections whose ``candid``/``magpsf``
are null and only ``diffmaglim`` is set; in the 3.5 "forced photometry"
branch the history entries are forced-photometry rows) and, from 4.01
(ZTF went from 3.3 to 4.01), ``fp_hists`` (forced photometry on the
difference images). Times are ``jd`` (UTC); magnitudes are AB.

A detection with ``isdiffpos`` 'f' (older packets '0') is a negative
subtraction: the source is fainter than in the reference image and
``magpsf`` is the magnitude of |difference flux|. Such a point keeps its
flux, negative, and has no magnitude (``mag``/``mag_err`` None), as a
negative forced-photometry flux has none: read as a magnitude it would make
a fading variable look like a bright transient to ``alert.mag < 18`` and to
the light-curve features. ``fields["magpsf"]`` and the payload keep ZTF's
numbers.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson

from tomd.alerts.model import Alert, PayloadJson, PhotPoint
from tomd.errors import ParseError

from ._common import (
    MJD0,
    AB_ZP_NJY,
    check_radec,
    finite,
    flux_err_to_mag_err,
    flux_to_mag,
    jd_utc_to_datetime,
    require,
    require_float,
)

BANDS = {1: "ztfg", 2: "ztfr", 3: "ztfi"}
CUTOUTS = {"cutoutScience": "science", "cutoutTemplate": "template", "cutoutDifference": "difference"}
# Keys of the ZTF packet itself; anything else at top level was added by a broker.
PACKET_KEYS = frozenset(
    {"schemavsn", "publisher", "objectId", "candid", "candidate", "prv_candidates", "fp_hists", *CUTOUTS}
)
# Candidate fields worth having at top level for rules (when present in the schema version).
FIELDS = (
    "rb", "drb", "rbversion", "drbversion", "ndethist", "ncovhist", "jdstarthist", "jdendhist",
    "ssdistnr", "ssmagnr", "ssnamenr", "sgscore1", "sgscore2", "sgscore3", "distpsnr1", "distpsnr2",
    "distpsnr3", "objectidps1", "sgmag1", "srmag1", "simag1", "szmag1", "distnr", "magnr", "sigmagnr",
    "nbad", "fwhm", "elong", "magdiff", "classtar", "diffmaglim", "programid", "field", "rcid",
    "neargaia", "neargaiabright", "maggaia", "maggaiabright", "tooflag", "nmtchps", "nneg", "scorr",
    "magap", "sigmagap", "isdiffpos", "magpsf", "sigmapsf",
)
FORCED_SENTINEL = -99999.0  # fp_hists: "no measurement"
# Cross-match fields that ZTF fills with -999 (a few older packets: -99) when
# there is no counterpart: no PS1 source within 30", no Gaia source within 90",
# no reference-image source, no known solar-system object. ZTF's schema docs
# say only "if exists within N arcsec"; the real packets carry the -999 (in
# ../shared/data/ztf: sgscore2/3, distpsnr2/3, neargaia(bright), maggaia(bright),
# sgmag1, ssdistnr, ...). Every one of these is a distance, a score in [0, 1],
# a catalogue magnitude or a catalogue id, so a value <= -99 is never real; in
# ``fields`` it becomes None (unknown), else a rule `sgscore1 < 0.5` would pass
# for "no PS1 match". The payload keeps the survey's value.
NO_MATCH_FIELDS = frozenset({
    "sgscore1", "sgscore2", "sgscore3", "distpsnr1", "distpsnr2", "distpsnr3", "objectidps1",
    "sgmag1", "srmag1", "simag1", "szmag1", "distnr", "magnr", "sigmagnr", "neargaia",
    "neargaiabright", "maggaia", "maggaiabright", "ssdistnr", "ssmagnr",
})
NO_MATCH_MAX = -99.0


def _band(fid: Any, where: str) -> str:
    try:
        return BANDS[int(fid)]
    except (KeyError, TypeError, ValueError):
        raise ParseError(f"field {where}fid has an unknown filter id: {fid!r}") from None


def _positive(isdiffpos: Any) -> bool:
    """ZTF writes 't'/'f' (older packets '1'/'0'), ALeRCE 1/-1. Only an explicit
    negative sign counts: a missing one (None) is read as ZTF's usual positive
    subtraction rather than throwing away the magnitude."""
    return str(isdiffpos).strip().lower() not in ("f", "0", "false", "-1", "-1.0")


def _mag_to_flux(mag: float | None, positive: bool) -> float | None:
    if mag is None:
        return None
    f = 10.0 ** (-0.4 * (mag - AB_ZP_NJY))
    return f if positive else -f


def difference_detection(
    magpsf: float | None, sigmapsf: float | None, positive: bool
) -> tuple[float | None, float | None, float | None, float | None]:
    """(mag, mag_err, flux, flux_err) of a ZTF difference-image detection; flux in nJy (AB).

    ``magpsf`` is the magnitude of |difference flux|. A negative subtraction
    (``positive`` False) keeps its flux with a minus sign and has no magnitude:
    the source faded, and ``magpsf`` is not its brightness. Shared by every
    parser that relays ZTF points (Fink, ALeRCE, ANTARES).
    """
    flux = _mag_to_flux(magpsf, positive)
    flux_err = abs(flux) * sigmapsf * math.log(10) / 2.5 if flux is not None and sigmapsf is not None else None
    if not positive:
        return None, None, flux, flux_err
    return magpsf, sigmapsf, flux, flux_err


def _forced_point(row: dict, source: str, where: str) -> PhotPoint | None:
    """A forced-photometry row (fp_hists, or 3.5 prv_candidates) in nJy."""
    flux = finite(row.get("forcediffimflux"))
    flux_err = finite(row.get("forcediffimfluxunc"))
    zp = finite(row.get("magzpsci"))
    jd = finite(row.get("jd"))
    if flux is None or flux == FORCED_SENTINEL or zp is None or jd is None:
        return None
    if flux_err == FORCED_SENTINEL:
        flux_err = None
    # Counts in the science-image zero point → nJy (AB: 31.4 ↔ 1 nJy).
    scale = 10.0 ** (-0.4 * (zp - AB_ZP_NJY))
    f = flux * scale
    fe = flux_err * scale if flux_err is not None else None
    return PhotPoint(
        mjd=jd - MJD0,
        band=_band(row.get("fid"), where),
        kind="forced",
        flux=f,
        flux_err=fe,
        mag=flux_to_mag(f),
        mag_err=flux_err_to_mag_err(f, fe),
        limit=finite(row.get("diffmaglim")),
        source=source,
        measurement_id=str(row["pid"]) if row.get("pid") is not None else None,
    )


def _history_point(row: dict, source: str, where: str) -> PhotPoint | None:
    if "forcediffimflux" in row and row.get("magpsf") is None:
        return _forced_point(row, source, where)
    jd = finite(row.get("jd"))
    if jd is None:
        return None
    mag = finite(row.get("magpsf"))
    band = _band(row.get("fid"), where)
    if row.get("candid") is None or mag is None:
        limit = finite(row.get("diffmaglim"))
        if limit is None:
            return None
        return PhotPoint(mjd=jd - MJD0, band=band, kind="upper_limit", limit=limit, source=source)
    mag, err, flux, flux_err = difference_detection(
        mag, finite(row.get("sigmapsf")), _positive(row.get("isdiffpos")))
    return PhotPoint(
        mjd=jd - MJD0,
        band=band,
        kind="detection",
        mag=mag,
        mag_err=err,
        flux=flux,
        flux_err=flux_err,
        limit=finite(row.get("diffmaglim")),
        source=source,
        measurement_id=str(row["candid"]),
    )


def clean(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf → None, bytes dropped (cutouts live elsewhere),
    Avro logical types (timestamps, dates, decimals, UUIDs) as strings/floats.

    Dispatches on the exact type first: this runs over every field of every
    packet, and a chain of isinstance checks cost more than the parse itself.
    """
    t = type(value)
    if t is dict:
        out = {}
        for k, v in value.items():
            vt = type(v)
            if vt is float:
                out[k] = v if v - v == 0.0 else None  # NaN and ±inf fail v - v == 0
            elif vt is str or vt is int or v is None or vt is bool:
                out[k] = v
            elif vt is bytes or vt is bytearray:
                continue
            else:
                out[k] = clean(v)
        return out
    if t is list or t is tuple:
        return [clean(v) for v in value]
    if t is float:
        return value if value - value == 0.0 else None
    if value is None or t is str or t is int or t is bool:
        return value
    if isinstance(value, dict):
        return clean(dict(value))
    if isinstance(value, float):
        return clean(float(value))
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return None
    return str(value)


def packet_json(record: dict, drop: Any = ()) -> PayloadJson:
    """The packet without the keys in ``drop`` (its cutouts), as the JSON ``clean`` would give.

    One pass in orjson's C code instead of ``clean``'s walk over every value in
    Python and a serialisation after it: NaN and ±inf become null (orjson
    writes them so), datetimes, dates and UUIDs ISO strings; the rest goes
    through ``_json_default``. The alert keeps the JSON (``PayloadJson``): it
    is stored as it is, and made a dict only where something reads inside it
    (``tomd.alerts.model.payload_dict``), which for most alerts is nowhere.
    """
    return PayloadJson(orjson.dumps({k: v for k, v in record.items() if k not in drop}, default=_json_default))


def _json_default(value: Any) -> Any:
    """What ``clean`` makes of the values orjson does not write itself."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, float):  # a float subclass (numpy's): orjson writes only float itself
        return float(value)
    return str(value)


def parse(record: dict, *, source: str = "ztf") -> list[Alert]:
    """One ZTF packet (decoded Avro record) → one Alert."""
    cand = require(record, "candidate")
    if not isinstance(cand, dict):
        raise ParseError("field candidate is not a record")
    candid = record.get("candid", cand.get("candid"))
    if candid is None:
        raise ParseError("missing field candid")
    object_id = require(record, "objectId")
    jd = require_float(cand, "jd", "candidate.")
    if not 2.4e6 < jd < 2.6e6:
        raise ParseError(f"field candidate.jd is not a plausible Julian date: {jd}")
    ra, dec = check_radec(
        require_float(cand, "ra", "candidate."), require_float(cand, "dec", "candidate."), "candidate."
    )
    band = _band(require(cand, "fid", "candidate."), "candidate.")
    positive = _positive(cand.get("isdiffpos"))
    mag, mag_err, flux, flux_err = difference_detection(
        finite(cand.get("magpsf")), finite(cand.get("sigmapsf")), positive)

    trigger = PhotPoint(
        mjd=jd - MJD0, band=band, kind="detection", mag=mag, mag_err=mag_err, flux=flux,
        flux_err=flux_err, limit=finite(cand.get("diffmaglim")), source=source,
        measurement_id=str(candid),
    )
    phot = [trigger]
    seen = {str(candid)}
    for i, row in enumerate(record.get("prv_candidates") or ()):
        p = _history_point(row, source, f"prv_candidates[{i}].")
        if p is None:
            continue
        if p.measurement_id and p.kind == "detection":
            if p.measurement_id in seen:
                continue
            seen.add(p.measurement_id)
        phot.append(p)
    for i, row in enumerate(record.get("fp_hists") or ()):
        p = _forced_point(row, source, f"fp_hists[{i}].")
        if p is not None:
            phot.append(p)

    fields: dict[str, Any] = {}
    for name in FIELDS:
        if name in cand:
            v = cand[name]
            fields[name] = (v if math.isfinite(v) else None) if isinstance(v, float) else v
    if "isdiffpos" in fields:
        fields["isdiffpos"] = positive
    # No known solar-system object within 30": ZTF writes ssnamenr 'null'
    # (and ssdistnr/ssmagnr -999, below), which must not read as an object
    # named "null" at -999".
    if str(fields.get("ssnamenr") or "").strip().lower() in ("", "null", "none"):
        if "ssnamenr" in fields:
            fields["ssnamenr"] = None
    for name in NO_MATCH_FIELDS:
        v = fields.get(name)
        if v is not None and v <= NO_MATCH_MAX:
            fields[name] = None
    rb = finite(cand.get("drb"))
    fields["real_bogus"] = rb if rb is not None else finite(cand.get("rb"))
    fields["schemavsn"] = record.get("schemavsn")

    payload = packet_json(record, CUTOUTS)
    cutouts = {}
    for key, name in CUTOUTS.items():
        c = record.get(key)
        if isinstance(c, dict):  # {"fileName", "stampData"} in every ZTF schema
            c = c.get("stampData")
        if isinstance(c, (bytes, bytearray)):
            cutouts[name] = bytes(c)

    return [
        Alert(
            source=source,
            key=str(candid),
            time=jd_utc_to_datetime(jd),
            kind="transient",
            object_id=str(object_id),
            ra=ra,
            dec=dec,
            band=band,
            mag=mag,
            mag_err=mag_err,
            flux=flux,
            flux_err=flux_err,
            photometry=tuple(phot),
            fields=fields,
            payload=payload,
            cutouts=cutouts,
        )
    ]


