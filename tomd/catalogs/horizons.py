"""JPL Horizons through astroquery: osculating elements and observer ephemerides.

``astroquery.jplhorizons`` reads its URL from the astropy config at call
time; the subclass sends the same requests (astroquery's own parameters,
parsed by astroquery) to the configured URL with a bounded timeout and no
disk cache. Elements are heliocentric, ecliptic and equinox of J2000
(astroquery's default centre ``500@10``), at the start of the current UTC
day, and map onto the LCO portal's schemes:

- a comet (Horizons' comet parameters, a comet designation, or e ≥ 1):
  ``MPC_COMET`` with perihelion distance and time;
- a major body (Horizons names them "Mars (499)"): ``JPL_MAJOR_PLANET``
  with the daily motion;
- otherwise ``MPC_MINOR_PLANET`` with semi-major axis and mean anomaly.

Epochs are TDB MJDs, as the portal expects.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from tomd.catalogs.base import CatalogAmbiguous, CatalogEntry, CatalogError, CatalogNotFound, number, text
from tomd.catalogs.designations import pack_provisional, rubin_alias
from tomd.catalogs.http import TimeoutSession, requests_failure

DEFAULT_URL = "https://ssd.jpl.nasa.gov/api/horizons.api"
_MJD0 = 2400000.5
_COMET = re.compile(r"^(?:\d+[PDI]\b|[PCDXAI]/)")
_MAJOR = re.compile(r"\((\d{1,6})\)\s*$")


def _client(url: str, timeout: float, **kwargs):
    from astroquery.jplhorizons import HorizonsClass

    class _Horizons(HorizonsClass):
        def __init__(self, **kw):
            super().__init__(**kw)
            self._session = TimeoutSession(timeout, self._session.headers)

        def _request(self, method, url_, **kw):  # noqa: ARG002 - astroquery's URL replaced by ours
            kw["cache"] = False
            kw["timeout"] = timeout
            return super()._request(method, url, **kw)

    return _Horizons(**kwargs)


def today_jd(now: float | None = None) -> float:
    """JD of the start of the current UTC day (elements are requested there)."""
    unix = time.time() if now is None else now
    return math.floor(unix / 86400.0) + 2440587.5


class Horizons:
    name = "horizons"

    def __init__(self, url: str | None = None, timeout: float = 20.0):
        self.url = url or DEFAULT_URL
        self.timeout = timeout

    def _call(self, name: str, what: str, **kwargs) -> Any:
        import requests

        client = _client(self.url, self.timeout, id=name.strip(), **kwargs)
        try:
            return getattr(client, what)()
        except requests.RequestException as exc:
            raise requests_failure(self.name, exc) from None
        except ValueError as exc:
            msg = str(exc)
            if msg.startswith("Ambiguous target name"):
                choices = "\n".join(msg.splitlines()[1:12])
                raise CatalogAmbiguous(f"JPL Horizons: {name!r} matches several objects; "
                                       f"use a unique id (e.g. a number or designation):\n{choices}") from None
            if msg.startswith("Unknown target") or "No matches found" in msg:
                raise CatalogNotFound(self.name, name) from None
            raise CatalogError(self.name, msg.splitlines()[0][:300]) from None

    def lookup(self, name: str, *, epoch_jd: float | None = None) -> CatalogEntry:
        """Osculating elements of ``name`` at ``epoch_jd`` (TDB; default: today 0h)."""
        table = self._call(name, "elements", location="500@10", epochs=epoch_jd or today_jd())
        if len(table) == 0:
            raise CatalogNotFound(self.name, name)
        return entry_from_elements(dict(zip(table.colnames, table[0])), query=name)

    def ephemeris(self, name: str, start_mjd: float, stop_mjd: float, step: str = "10m",
                  location: str = "500") -> list[tuple[float, float, float]]:
        """(MJD UTC, RA, Dec) rows: astrometric ICRS degrees seen from ``location`` (default geocentre)."""
        from astropy.time import Time

        def iso(mjd):
            return Time(mjd, format="mjd", scale="utc").strftime("%Y-%m-%d %H:%M")

        table = self._call(name, "ephemerides", location=location,
                           epochs={"start": iso(start_mjd), "stop": iso(stop_mjd), "step": step})
        return [(float(r["datetime_jd"]) - _MJD0, float(r["RA"]), float(r["DEC"])) for r in table]


def entry_from_elements(row: dict[str, Any], *, query: str | None = None) -> CatalogEntry:
    """An entry from one row of astroquery's Horizons elements table."""
    target = text(row.get("targetname")) or query or "?"
    e = number(row.get("e"))
    if e is None:
        raise CatalogError("horizons", f"no eccentricity in the elements of {target!r}")
    base = {
        "epochofel": number(row["datetime_jd"]) - _MJD0,
        "orbinc": number(row["incl"]), "longascnode": number(row["Omega"]) % 360.0,
        "argofperih": number(row["w"]) % 360.0, "eccentricity": e,
    }
    extras: dict[str, Any] = {}
    for k in ("H", "G", "M1", "k1"):
        if number(row.get(k)) is not None:
            extras[f"horizons_{k}"] = number(row[k])
    if "M1" in row or e >= 1.0 or _COMET.match(target):
        scheme = "MPC_COMET"
        base.update(perihdist=number(row["q"]), epochofperih=number(row["Tp_jd"]) - _MJD0)
    else:
        base.update(meandist=number(row["a"]), meananom=number(row["M"]) % 360.0)
        scheme = "MPC_MINOR_PLANET"
        if _MAJOR.search(target):
            scheme = "JPL_MAJOR_PLANET"
            base["dailymot"] = number(row["n"])
    missing = [k for k, v in base.items() if v is None]
    if missing:
        raise CatalogError("horizons", f"elements of {target!r} lack {', '.join(missing)}")
    return CatalogEntry(service="horizons", name=target, aliases=names_of(target), scheme=scheme, elements=base,
                        object_type="comet" if scheme == "MPC_COMET" else
                        ("major body" if scheme == "JPL_MAJOR_PLANET" else "minor planet"), extras=extras)


_NUMBERED = re.compile(r"^(\d+)\s+(.+?)\s*\(([^)]+)\)$")  # "1 Ceres (A801 AA)"
_PAREN = re.compile(r"^(.*?)\s*\(([^)]+)\)$")  # "C/2020 F3 (NEOWISE)", "(2024 AB)", "Mars (499)"


def names_of(target: str) -> tuple[str, ...]:
    """The other names in a Horizons target name, so alerts naming the object find it.

    "1 Ceres (A801 AA)" → "1 Ceres", "Ceres", "A801 AA"; "C/2020 F3 (NEOWISE)" →
    "C/2020 F3", "NEOWISE"; "(2024 AB)" → "2024 AB"; "Mars (499)" → "Mars". A bare
    number is never a name (it would shadow target ids in ``tomd target show``).
    """
    m = _NUMBERED.match(target)
    if m:
        out = [f"{m.group(1)} {m.group(2)}", m.group(2), m.group(3)]
    else:
        m = _PAREN.match(target)
        out = [m.group(1), m.group(2)] if m else []
    names = [n.strip() for n in out if n.strip() and not n.strip().isdigit()]
    for n in list(names):  # a standard provisional designation: Rubin's ssObjectId name too
        rubin = rubin_alias(pack_provisional(n))
        if rubin:
            names.append(rubin)
    return tuple(dict.fromkeys(names))
