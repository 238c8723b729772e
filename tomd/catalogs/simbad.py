"""SIMBAD through astroquery: one ADQL query on its TAP service (``sim-tap/sync``).

astroquery 0.4.11's ``SimbadClass`` talks TAP through pyvo; we subclass it
only to point it at the configured URL (its own ``server`` setter accepts
the two public mirrors only) and to skip the capabilities round trip that
finds the row hard limit. One query returns the object's basic row once per
identifier, so coordinates, type, redshift, parallax and every alias come
back together.
"""

from __future__ import annotations

from typing import Any

from tomd.catalogs.base import CatalogEntry, CatalogError, CatalogNotFound, CatalogUnavailable, number, text
from tomd.catalogs.http import TimeoutSession, requests_failure

DEFAULT_URL = "https://simbad.cds.unistra.fr/simbad/sim-tap"

_QUERY = (
    "SELECT basic.main_id, basic.ra, basic.dec, basic.otype, basic.rvz_redshift, basic.plx_value, "
    "basic.pmra, basic.pmdec, alias.id AS alias "
    "FROM ident AS typed JOIN basic ON basic.oid = typed.oidref "
    "JOIN ident AS alias ON alias.oidref = basic.oid "
    "WHERE typed.id = '{name}'"
)
_MAXREC = 2000


def _client(url: str, timeout: float):
    from astroquery.simbad import SimbadClass
    from pyvo.dal import TAPService

    class _Simbad(SimbadClass):
        def __init__(self):
            super().__init__()
            self._session = TimeoutSession(timeout, self._session.headers)
            self._hardlimit = _MAXREC  # no /capabilities request per look-up

        @property
        def tap(self):
            if self._tap is None:
                self._tap = TAPService(baseurl=url.rstrip("/"), session=self._session)
            return self._tap

    return _Simbad()


class Simbad:
    name = "simbad"

    def __init__(self, url: str | None = None, timeout: float = 20.0):
        self.url = url or DEFAULT_URL
        self.timeout = timeout

    def query(self, name: str) -> str:
        """The ADQL sent for ``name`` (quotes doubled, as ADQL escapes them)."""
        return _QUERY.format(name=name.strip().replace("'", "''"))

    def lookup(self, name: str) -> CatalogEntry:
        import requests
        from pyvo.dal import DALFormatError, DALQueryError, DALServiceError

        # A fresh client per look-up: astroquery memoises TAP answers per
        # client in-process, and tomd caches in the database instead.
        client = _client(self.url, self.timeout)
        try:
            table = client.query_tap(self.query(name), maxrec=_MAXREC)
        except requests.RequestException as exc:
            raise requests_failure(self.name, exc) from None
        except DALQueryError as exc:
            raise CatalogError(self.name, f"query refused: {exc}") from None
        except (DALServiceError, DALFormatError) as exc:
            # pyvo wraps transport failures (refused, timed out) in either.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, requests.RequestException):
                raise requests_failure(self.name, cause) from None
            code = getattr(exc, "code", None)
            if isinstance(exc, DALFormatError):
                raise CatalogError(self.name, f"unreadable answer: {str(exc).splitlines()[0][:200]}") from None
            if code is None or code >= 500 or code == 429:
                raise CatalogUnavailable(self.name, f"HTTP {code}" if code else str(exc)[:200]) from None
            raise CatalogError(self.name, f"HTTP {code}: {str(exc).splitlines()[0][:200]}") from None
        if len(table) == 0:
            raise CatalogNotFound(self.name, name)
        return entry_from_rows([dict(zip(table.colnames, row)) for row in table])


def entry_from_rows(rows: list[dict[str, Any]]) -> CatalogEntry:
    first = rows[0]
    main = text(first["main_id"])
    aliases = [a for a in (text(r.get("alias")) for r in rows if text(r["main_id"]) == main) if a and a != main]
    plx = number(first.get("plx_value"))
    return CatalogEntry(
        service="simbad", name=main, ra=number(first["ra"]), dec=number(first["dec"]),
        aliases=tuple(dict.fromkeys(aliases)), object_type=text(first.get("otype")),
        redshift=number(first.get("rvz_redshift")),
        # Parallax (mas) gives a distance only when it is significant enough to mean one.
        distance=1000.0 / plx if plx and plx > 0.5 else None,
        pm_ra=number(first.get("pmra")), pm_dec=number(first.get("pmdec")), parallax=plx if plx and plx > 0 else None,
    )

