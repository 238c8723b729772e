"""TNS API object (``/api/get/object`` reply) → Alert.

One TNS object as the poller received it: ``objname`` (2024abc),
``name_prefix`` (AT/SN/...), ``radeg``/``decdeg``, ``discoverydate`` (UTC),
``discoverymag`` with ``discmagfilter``, ``internal_names`` (the surveys'
names, comma-separated: ZTF objectId, ATLAS, ...), ``object_type``,
``redshift`` and, when asked, ``photometry`` rows (``jd``, ``flux`` in the
row's ``flux_unit`` — only ABMag is used —, ``fluxerr``, ``limflux``,
``filters``). The alert key is the name plus a hash of the reply (plus TNS's
modification time, should a reply carry one): an object seen again unchanged
is a replay; a change (classification, new photometry) is a new alert on the
same target, found by its TNS name.
"""

from __future__ import annotations

from typing import Any

from tomd.alerts.model import Alert, PhotPoint
from tomd.errors import ParseError

from ._common import MJD0, check_radec, content_key, finite, parse_iso_utc, require, scalar_items

_MODIFIED = ("lastmodified", "last_modified", "modified", "public_timestamp")


def parse(record: dict) -> list[Alert]:
    if record.get("_error"):
        raise ParseError(f"TNS object {record.get('objname')}: {record['_error']}")
    objname = str(require(record, "objname")).strip()
    if not objname or not isinstance(record.get("objname"), str):
        raise ParseError(f"field objname is not a TNS name: {record.get('objname')!r}")
    prefix = str(record.get("name_prefix") or record.get("prefix") or "AT").strip()
    ra, dec = check_radec(_deg(record, "radeg"), _deg(record, "decdeg"))
    when = parse_iso_utc(require(record, "discoverydate"), "discoverydate")
    modified = next((str(record[k]) for k in _MODIFIED if record.get(k)), None)
    digest = content_key(record)[7:27]
    key = f"{objname}@{modified}#{digest}" if modified else f"{objname}@{digest}"

    aliases = [objname, f"{prefix} {objname}"]
    for name in str(record.get("internal_names") or "").split(","):
        if name.strip():
            aliases.append(name.strip())
    fields = scalar_items(record, skip={"internal_names"})
    for k in ("object_type", "discmagfilter", "reporting_group", "discovery_data_source"):
        v = record.get(k)
        if isinstance(v, dict) and v.get("name"):
            fields[k] = v["name"]
    band = _filter(record.get("discmagfilter"))
    phot = tuple(p for i, row in enumerate(record.get("photometry") or ()) if (p := _point(row, i)) is not None)
    return [Alert(
        source="tns", key=key, time=when, kind="transient", object_id=f"{prefix} {objname}",
        ra=ra, dec=dec, band=band, mag=finite(record.get("discoverymag")), photometry=phot,
        aliases=tuple(dict.fromkeys(aliases)), fields=fields, payload=record,
    )]


def _deg(record: dict, name: str) -> float:
    v = finite(require(record, name))
    if v is None:
        raise ParseError(f"field {name} is not a number: {record[name]!r}")
    return v


def _filter(v: Any) -> str | None:
    if isinstance(v, dict):
        return str(v.get("name") or v.get("id") or "") or None
    return str(v) if v else None


def _point(row: Any, i: int) -> PhotPoint | None:
    """One TNS photometry row; None for units other than AB magnitudes (kept in the payload)."""
    if not isinstance(row, dict):
        raise ParseError(f"photometry[{i}] is not an object")
    unit = row.get("flux_unit")
    unit_name = unit.get("name") if isinstance(unit, dict) else unit
    if unit_name not in (None, "ABMag"):
        return None
    jd = finite(row.get("jd"))
    if jd is None:
        raise ParseError(f"field photometry[{i}].jd is not a number: {row.get('jd')!r}")
    band = _filter(row.get("filters")) or "unknown"
    mag, limit = finite(row.get("flux")), finite(row.get("limflux"))
    if mag is not None:
        return PhotPoint(mjd=jd - MJD0, band=band, kind="detection", mag=mag, mag_err=finite(row.get("fluxerr")),
                         limit=limit, source="tns")
    if limit is not None:
        return PhotPoint(mjd=jd - MJD0, band=band, kind="upper_limit", limit=limit, source="tns")
    return None
