"""The Transient Name Server's bot API (``/api/get/object``, ``/api/get/search``).

Every call is a form-encoded POST of ``api_key`` and ``data`` (a JSON
object), with the bot's marker as User-Agent:
``tns_marker{"tns_id":ID,"type":"bot","name":"NAME"}``. Answers are JSON
``{"id_code": 200, "id_message": "OK", "data": {"reply": …}}``. TNS limits
the request rate per bot and says so in headers (``x-rate-limit-*``, and
``x-cone-rate-limit-*`` for position searches); a 429 becomes
CatalogUnavailable carrying the reset delay, and the caller retries later
(a CLI user sees "try again in N s"). A 401/403 means the bot credentials
are wrong: that is reported, not retried.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from tomd.catalogs.base import CatalogEntry, CatalogError, CatalogNotFound, CatalogUnavailable, number, text
from tomd.catalogs.http import retry_after

DEFAULT_URL = "https://www.wis-tns.org/api"
_PREFIX = re.compile(r"^\s*(?:AT|SN|TDE|KN|FRB|LRN|LBV|ILRT|NOVA)?\s*((?:19|20)\d\d[a-zA-Z]{1,4})\s*$", re.I)


def designation(name: str) -> str:
    """TNS's objname for a name: "SN 2023ixf" → "2023ixf" (prefixes change with classification)."""
    m = _PREFIX.match(name)
    return m.group(1).lower() if m else name.strip()


@dataclass(frozen=True)
class Credentials:
    bot_id: int
    bot_name: str
    api_key: str = field(repr=False)  # the revealed secret: never in repr(), logs or errors

    @property
    def marker(self) -> str:
        return "tns_marker" + json.dumps({"tns_id": self.bot_id, "type": "bot", "name": self.bot_name},
                                          separators=(",", ":"))


class Tns:
    name = "tns"

    def __init__(self, url: str | None = None, timeout: float = 20.0, credentials: Credentials | None = None):
        self.url = (url or DEFAULT_URL).rstrip("/")
        self.timeout = timeout
        self.credentials = credentials

    def _post(self, endpoint: str, data: dict[str, Any], *, cone: bool = False) -> Any:
        if self.credentials is None:
            raise CatalogError(self.name, "needs a bot: set catalogs.tns_bot_id, tns_bot_name and tns_api_key")
        try:
            with httpx.Client(timeout=self.timeout) as client:
                r = client.post(f"{self.url}/get/{endpoint}",
                                headers={"User-Agent": self.credentials.marker},
                                data={"api_key": self.credentials.api_key, "data": json.dumps(data)})
        except httpx.TimeoutException:
            raise CatalogUnavailable(self.name, "timed out") from None
        except httpx.TransportError as exc:
            raise CatalogUnavailable(self.name, f"connection failed ({type(exc).__name__})") from None
        if r.status_code == 429:
            names = ("x-cone-rate-limit-reset", "x-rate-limit-reset") if cone else ("x-rate-limit-reset",)
            wait = retry_after(r.headers, *names, "Retry-After")
            raise CatalogUnavailable(self.name, "rate limit reached" + (f"; try again in {wait:.0f} s" if wait else ""),
                                     wait)
        if r.status_code in (401, 403):
            raise CatalogError(self.name, f"HTTP {r.status_code} {_id_message(r)}: check the bot id, "
                                          "bot name and API key (catalogs.tns_*)")
        if r.status_code >= 500:
            raise CatalogUnavailable(self.name, f"HTTP {r.status_code}")
        if r.status_code >= 400:
            raise CatalogError(self.name, f"HTTP {r.status_code} {_id_message(r)}")
        try:
            body = r.json()
        except ValueError:
            raise CatalogError(self.name, "the answer is not JSON") from None
        data_ = body.get("data") if isinstance(body, dict) else None
        if isinstance(data_, dict) and "reply" in data_:
            return data_["reply"]
        return data_

    def lookup(self, name: str) -> CatalogEntry:
        objname = designation(name)
        reply = self._post("object", {"objname": objname, "objid": "", "photometry": "0", "spectra": "0"})
        if not isinstance(reply, dict) or number(reply.get("radeg")) is None:
            raise CatalogNotFound(self.name, name, _reply_message(reply))
        return entry_from_object(reply)

    def near(self, ra: float, dec: float, radius_arcsec: float = 5.0) -> tuple[str, ...]:
        """Names ("SN 2023ixf") of objects reported within the radius, as TNS orders them."""
        reply = self._post("search", {"ra": f"{ra:.6f}", "dec": f"{dec:.6f}", "radius": f"{radius_arcsec:g}",
                                      "units": "arcsec", "objname": "", "internal_name": ""}, cone=True)
        if not isinstance(reply, list):
            return ()
        out = []
        for item in reply:
            if isinstance(item, dict) and item.get("objname"):
                prefix = text(item.get("prefix"))
                out.append(f"{prefix} {item['objname']}" if prefix else str(item["objname"]))
        return tuple(out)


def _id_message(r: httpx.Response) -> str:
    try:
        return str(r.json().get("id_message", ""))[:100]
    except (ValueError, AttributeError):
        return ""


def _reply_message(reply: Any) -> str:
    """TNS's words in a not-found reply, e.g. {"objname": {"110": {"message": "No results found."}}}."""
    if isinstance(reply, dict):
        for v in reply.values():
            if isinstance(v, dict):
                for inner in v.values():
                    if isinstance(inner, dict) and inner.get("message"):
                        return str(inner["message"])
    return ""


def entry_from_object(reply: dict[str, Any]) -> CatalogEntry:
    objname = str(reply["objname"])
    prefix = text(reply.get("name_prefix"))
    name = f"{prefix} {objname}" if prefix else objname
    internal = text(reply.get("internal_names")) or ""
    aliases = [a.strip() for a in internal.split(",") if a.strip()]
    otype = reply.get("object_type")
    otype_name = text(otype.get("name")) if isinstance(otype, dict) else text(otype)
    extras = {k2: reply[k] for k, k2 in (("discoverydate", "tns_discovery_date"), ("objid", "tns_objid"),
                                         ("discoverymag", "tns_discovery_mag"), ("hostname", "tns_host"))
              if reply.get(k) not in (None, "")}
    return CatalogEntry(service="tns", name=name, ra=number(reply["radeg"]), dec=number(reply.get("decdeg")),
                        aliases=tuple(aliases), object_type=otype_name, redshift=number(reply.get("redshift")),
                        extras=extras)
