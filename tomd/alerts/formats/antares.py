"""ANTARES locus messages (zlib-compressed BSON) → Alert.

antares-client reads a stream message as ``bson.loads(zlib.decompress(v))``
and loads it as a JSON:API document: ``data`` is the locus (``id``,
``attributes`` with ``ra``, ``dec``, ``properties``, ``tags``, ``catalogs``)
and ``included`` holds its alerts (``attributes``: ``mjd``, ``properties``
such as ``ant_mag``, ``ant_magerr``, ``ant_passband``, ``ant_maglim``,
``ztf_candid``, ``ztf_isdiffpos``). A flat locus dict is accepted as well.
The key is the locus' newest alert id. ANTARES MJDs come from ZTF ``jd``
and are UTC.

ANTARES relays ZTF measurements (alert ids ``ztf_candidate:<candid>``,
``ztf_upper_limit:…``): their points carry the survey (``ztf``) as source and
the bare candid as measurement id, as the ZTF parser gives them, so a point
relayed by ANTARES and read from ZTF is one point. ``fields["broker"]`` says
who relayed the alert.
"""

from __future__ import annotations

from typing import Any

from tomd.alerts.model import Alert, PhotPoint
from tomd.errors import ParseError

from ._common import check_radec, finite, mjd_utc_to_datetime, scalar_items
from .ztf import _positive, clean, difference_detection

PASSBANDS = {"g": "ztfg", "R": "ztfr", "r": "ztfr", "i": "ztfi"}
ZTF_CANDIDATE = "ztf_candidate:"


def _point_source(alert_id: str, band: str, broker: str) -> str:
    """The survey that measured a point: ZTF for ZTF alerts and ZTF bands, else the broker."""
    return "ztf" if alert_id.startswith("ztf_") or band.startswith("ztf") else broker


def _measurement_id(alert_id: str) -> str | None:
    if not alert_id:
        return None
    return alert_id[len(ZTF_CANDIDATE):] if alert_id.startswith(ZTF_CANDIDATE) else alert_id


def _detection(props: dict) -> tuple[float | None, float | None, float | None, float | None]:
    """(mag, mag_err, flux, flux_err) of an alert's detection. A relayed ZTF
    candidate says its subtraction's sign in ``ztf_isdiffpos``: a negative one
    ('f') has a negative flux and no magnitude, as ztf.parse gives it (ANTARES'
    ``ant_mag`` is ZTF's magpsf, the magnitude of |difference flux|)."""
    mag, err = finite(props.get("ant_mag")), finite(props.get("ant_magerr"))
    if props.get("ztf_isdiffpos") is None:
        return mag, err, None, None
    return difference_detection(mag, err, _positive(props["ztf_isdiffpos"]))


def _alerts(msg: dict) -> list[dict]:
    out = []
    for item in msg.get("included") or msg.get("alerts") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type", "alert") != "alert":
            continue
        attrs = item.get("attributes", item)
        out.append({"id": item.get("id", attrs.get("alert_id")), **attrs})
    return out


def parse(record: dict, *, source: str = "antares") -> list[Alert]:
    if not isinstance(record, dict):
        raise ParseError("ANTARES message is not a document")
    data = record.get("data") if isinstance(record.get("data"), dict) else record
    attrs = data.get("attributes", data)
    locus_id = data.get("id") or attrs.get("locus_id")
    if not locus_id:
        raise ParseError("missing field data.id (locus id)")
    for name in ("ra", "dec", "properties"):
        if name not in attrs:
            raise ParseError(f"missing field data.attributes.{name}")
    ra, dec = check_radec(finite(attrs.get("ra")), finite(attrs.get("dec")))
    if ra is None:
        raise ParseError("field data.attributes.ra/dec is not a number")
    props: dict[str, Any] = attrs.get("properties") or {}
    alerts = _alerts(record)
    newest = max(alerts, key=lambda a: finite(a.get("mjd")) or 0.0) if alerts else None
    mjd = finite(props.get("newest_alert_observation_time"))
    if mjd is None and newest is not None:
        mjd = finite(newest.get("mjd"))
    if mjd is None:
        raise ParseError("missing field properties.newest_alert_observation_time")
    key = props.get("newest_alert_id") or (newest or {}).get("id") or f"{locus_id}@{mjd!r}"

    phot: list[PhotPoint] = []
    for a in alerts:
        p = a.get("properties") or {}
        amjd = finite(a.get("mjd"))
        band = PASSBANDS.get(str(p.get("ant_passband")), str(p.get("ant_passband") or ""))
        if amjd is None or not band:
            continue
        aid = str(a.get("id") or "")
        psource = _point_source(aid, band, source)
        mag = finite(p.get("ant_mag"))
        if mag is not None:
            mag, mag_err, flux, flux_err = _detection(p)
            phot.append(PhotPoint(mjd=amjd, band=band, kind="detection", mag=mag, mag_err=mag_err,
                                  flux=flux, flux_err=flux_err, source=psource,
                                  measurement_id=_measurement_id(aid)))
        elif finite(p.get("ant_maglim")) is not None:
            phot.append(PhotPoint(mjd=amjd, band=band, kind="upper_limit",
                                  limit=finite(p.get("ant_maglim")), source=psource))
    newest_props = (newest or {}).get("properties") or {}
    fields = scalar_items(props)
    fields["tags"] = list(attrs.get("tags") or [])
    fields["catalogs"] = list(attrs.get("catalogs") or [])
    fields["broker"] = source
    aliases = tuple(str(props[k]) for k in ("ztf_object_id", "lsst_diaObject_diaObjectId") if props.get(k))
    band = newest_props.get("ant_passband")
    if finite(newest_props.get("ant_mag")) is not None:
        mag, mag_err, flux, flux_err = _detection(newest_props)
    else:
        mag, mag_err, flux, flux_err = finite(props.get("newest_alert_magnitude")), None, None, None
    return [
        Alert(
            source=source,
            key=str(key),
            time=mjd_utc_to_datetime(mjd),
            object_id=str(locus_id),
            ra=ra,
            dec=dec,
            band=PASSBANDS.get(str(band), str(band)) if band else None,
            mag=mag,
            mag_err=mag_err,
            flux=flux,
            flux_err=flux_err,
            photometry=tuple(sorted(phot, key=lambda p: p.mjd)),
            aliases=aliases,
            fields=fields,
            payload=clean(record),
        )
    ]
