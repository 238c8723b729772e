"""Helpers shared by the survey parsers: time scales, numbers, keys.

Time conversions go through ERFA (``erfa.taiutc``, ``erfa.d2dtf``), the
library astropy's ``Time`` itself calls, with its leap-second table. A scalar
``astropy.time.Time`` costs about 0.5 ms, which alone would cap ingest near
2000 alerts/s; the ERFA calls cost ~10 µs and give the same answer (the tests
check them against astropy).
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import erfa

from tomd.errors import ParseError

MJD0 = 2400000.5  # JD of MJD 0
# Flux zero point of the AB system in nJy: m_AB = 31.4 - 2.5 log10(f / nJy).
AB_ZP_NJY = 31.4


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when missing, NaN, infinite or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def require(record: dict, name: str, where: str = "") -> Any:
    """``record[name]``, or ParseError naming the field when absent or null."""
    try:
        value = record[name]
    except (KeyError, TypeError):
        raise ParseError(f"missing field {where}{name}") from None
    if value is None:
        raise ParseError(f"field {where}{name} is null")
    return value


def require_float(record: dict, name: str, where: str = "") -> float:
    value = finite(require(record, name, where))
    if value is None:
        raise ParseError(f"field {where}{name} is not a finite number: {record[name]!r}")
    return value


def check_radec(ra: float | None, dec: float | None, where: str = "") -> tuple[float | None, float | None]:
    """Validate an ICRS position in degrees; RA is wrapped into [0, 360)."""
    if ra is None or dec is None:
        return None, None
    if not -90.0 <= dec <= 90.0:
        raise ParseError(f"field {where}dec out of range [-90, 90]: {dec}")
    if not -360.0 <= ra <= 720.0:
        raise ParseError(f"field {where}ra out of range: {ra}")
    ra = ra % 360.0
    return ra, dec


def flux_to_mag(flux_njy: float | None) -> float | None:
    """AB magnitude of a flux in nJy; None unless the flux is positive."""
    if flux_njy is None or flux_njy <= 0:
        return None
    return AB_ZP_NJY - 2.5 * math.log10(flux_njy)


def flux_err_to_mag_err(flux: float | None, flux_err: float | None) -> float | None:
    if flux is None or flux_err is None or flux <= 0:
        return None
    return 2.5 / math.log(10.0) * flux_err / flux


# --- time scales ---------------------------------------------------------

def _leap_second_days() -> frozenset[int]:
    """MJDs of the UTC days that end in a leap second (ERFA's table, from 1972)."""
    days = set()
    for year, month, _ in erfa.leap_seconds.get():
        if year >= 1972 and (year, month) != (1972, 1):
            days.add(int(erfa.cal2jd(int(year), int(month), 1)[1]) - 1)  # the day before the step
    return frozenset(days)


_LEAP_DAYS = _leap_second_days()
_FIRST_UTC_DAY = 41317  # 1972-01-01: before it UTC had fractional steps and drifting seconds
_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=timezone.utc)


def _utc_mjd_to_datetime(mjd: float) -> datetime:
    """UTC MJD → aware datetime. Plain arithmetic on days of 86,400 s; ERFA on days that hold a
    leap second (or before 1972), where the day's length differs. ERFA costs ~15 µs a call, a
    large share of parsing a ZTF alert and its history; this gives the same microsecond."""
    day = math.floor(mjd)
    if day < _FIRST_UTC_DAY or day in _LEAP_DAYS:
        return _utc_jd_to_datetime(MJD0, mjd)
    return _MJD_EPOCH + timedelta(days=day, microseconds=round((mjd - day) * 86_400_000_000))


def _utc_jd_to_datetime(jd1: float, jd2: float) -> datetime:
    """Two-part UTC JD → aware datetime, leap-second aware (via ERFA)."""
    iy, im, iday, hmsf = erfa.d2dtf("UTC", 6, jd1, jd2)
    h, m, s, f = (int(x) for x in hmsf)
    # A time inside a leap second (23:59:60) has no datetime; clamp to :59.999999.
    if s >= 60:
        s, f = 59, 999999
    return datetime(int(iy), int(im), int(iday), h, m, s, f, tzinfo=timezone.utc)


def jd_utc_to_datetime(jd: float) -> datetime:
    """A UTC Julian date (ZTF ``jd``) as an aware UTC datetime."""
    return _utc_mjd_to_datetime(jd - MJD0)


def mjd_utc_to_datetime(mjd: float) -> datetime:
    return _utc_mjd_to_datetime(mjd)


def mjd_tai_to_mjd_utc(mjd_tai: float) -> float:
    """MJD in TAI (Rubin ``midpointMjdTai``) → MJD in UTC (ERFA leap-second table)."""
    u1, u2 = erfa.taiutc(MJD0, mjd_tai)
    return float((u1 - MJD0) + u2)


def mjd_tai_to_datetime(mjd_tai: float) -> datetime:
    u1, u2 = erfa.taiutc(MJD0, mjd_tai)
    return _utc_jd_to_datetime(float(u1), float(u2))


def parse_iso_utc(value: Any, field: str) -> datetime:
    """An ISO 8601 UTC time string ('Z', offset or naive = UTC) → aware datetime."""
    if not isinstance(value, str) or not value.strip():
        raise ParseError(f"field {field} is not an ISO time: {value!r}")
    text = value.strip().replace(" ", "T", 1)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python < 3.11 style limits: fromisoformat needs 0, 3 or 6 fraction digits on 3.10;
    # 3.11 accepts any. Normalise anyway so '.0' and '.123456789' work.
    main, sep, rest = text.partition(".")
    if sep:
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        tz = rest[i:]
        digits = (digits + "000000")[:6]
        text = f"{main}.{digits}{tz}"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ParseError(f"field {field} is not an ISO time: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def unix_ms_to_datetime(ms: float) -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ms)


def content_key(obj: Any) -> str:
    """A stable content hash, the key of last resort (see Alert.key)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
    else:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray)):
        return hashlib.sha256(o).hexdigest()
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def scalar_items(record: dict, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """The scalar (str/number/bool/None) entries of ``record``, NaN → None."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if k in skip:
            continue
        if isinstance(v, float):
            out[k] = v if math.isfinite(v) else None
        elif v is None or isinstance(v, (str, int, bool)):
            out[k] = v
    return out
