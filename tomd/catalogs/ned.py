"""NED through astroquery: the object search (``cgi-bin/objsearch``, VOTable main table).

``astroquery.ipac.ned`` reads its URL from a module-level instance, so the
subclass below builds the same request (astroquery's own payload) and sends
it to the configured URL, uncached on disk (tomd caches in the database).
NED gives position, its preferred type and the heliocentric redshift; it has
no alias list in this table.
"""

from __future__ import annotations

from tomd.catalogs.base import CatalogEntry, CatalogError, CatalogNotFound, number, text
from tomd.catalogs.http import TimeoutSession, requests_failure

DEFAULT_URL = "https://ned.ipac.caltech.edu/cgi-bin/objsearch"

# NED's words when it does not know a name (its error VOTable's "Error" PARAM).
_UNKNOWN = ("not currently recognized", "not recognized", "no object", "not found", "unknown object")


def _client(url: str, timeout: float):
    from astroquery.ipac.ned.core import NedClass

    class _Ned(NedClass):
        def __init__(self):
            super().__init__()
            self._session = TimeoutSession(timeout, self._session.headers)

        def query_object_async(self, object_name, *, get_query_payload=False):
            payload = super().query_object_async(object_name, get_query_payload=True)
            if get_query_payload:
                return payload
            response = self._request("GET", url=url, params=payload, timeout=timeout, cache=False)
            response.raise_for_status()
            return response

    return _Ned()


class Ned:
    name = "ned"

    def __init__(self, url: str | None = None, timeout: float = 20.0):
        self.url = url or DEFAULT_URL
        self.timeout = timeout

    def lookup(self, name: str) -> CatalogEntry:
        import requests
        from astroquery.exceptions import RemoteServiceError, TableParseError

        try:
            table = _client(self.url, self.timeout).query_object(name.strip())
        except requests.RequestException as exc:
            raise requests_failure(self.name, exc) from None
        except RemoteServiceError as exc:
            msg = str(exc).split("ERROR:", 1)[-1].strip()
            if any(w in msg.lower() for w in _UNKNOWN):
                raise CatalogNotFound(self.name, name, msg) from None
            raise CatalogError(self.name, msg or "error without a message") from None
        except TableParseError:
            raise CatalogError(self.name, "unreadable answer (not a VOTable)") from None
        if len(table) == 0:
            raise CatalogNotFound(self.name, name)
        row = dict(zip(table.colnames, table[0]))
        ra = _column(row, "RA")
        dec = _column(row, "DEC")
        return CatalogEntry(service="ned", name=text(row.get("Object Name")) or name, ra=number(ra),
                            dec=number(dec), object_type=text(row.get("Type")),
                            redshift=number(row.get("Redshift")))


def _column(row: dict, prefix: str):
    """NED's position columns are "RA"/"DEC" (older tables: "RA(deg)"/"DEC(deg)")."""
    for k, v in row.items():
        if k == prefix or k.startswith(prefix + "("):
            return v
    return None
