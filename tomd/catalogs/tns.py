"""The Transient Name Server's bot API (``/api/get/object``, ``/api/get/search``).

Every call is a form-encoded POST of ``api_key`` and ``data`` (a JSON
object), with the bot's marker as User-Agent:
``tns_marker{"tns_id":ID,"type":"bot","name":"NAME"}``. Answers are JSON
``{"id_code": 200, "id_message": "OK", "data": {"reply": …}}``. TNS limits
the request rate per bot and says so in headers (``x-rate-limit-*``, and
``x-cone-rate-limit-*`` for position searches). Those headers are obeyed
before asking: once a window's ``remaining`` is 0, the next call in this
process waits for its ``reset`` if that fits in the timeout, and otherwise
fails at once with CatalogUnavailable carrying the delay, without sending
anything (TNS counts refused requests too, and a bot that keeps knocking may
be blocked). A 429 that still happens (another process with the same bot)
becomes the same error; the caller retries later (a CLI user sees "try
again in N s"). A 401/403 means the bot credentials are wrong: that is
reported, not retried.
"""

from __future__ import annotations

import json
import re
import threading
import time
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


class RateLimits:
    """What TNS last said about each rate-limit window, per bot and URL, shared by the process.

    A window is ``"rate"`` (every call) or ``"cone"`` (position searches,
    which count against both). ``reset`` is TNS's seconds-until-reset,
    kept as a monotonic deadline.
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple, tuple[int, float]] = {}  # (key, window) -> (remaining, reset deadline)

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()

    def wait_needed(self, key: tuple, windows: tuple[str, ...]) -> float:
        """Seconds until every window in ``windows`` has a request left (0: go now; counts one off)."""
        now = self._clock()
        with self._lock:
            wait = 0.0
            for w in windows:
                remaining, deadline = self._windows.get((key, w), (1, 0.0))
                if remaining <= 0 and deadline > now:
                    wait = max(wait, deadline - now)
            if wait == 0.0:
                # Reserve the request, so threads sharing a bot do not all spend the last one.
                for w in windows:
                    remaining, deadline = self._windows.get((key, w), (1, 0.0))
                    if (key, w) in self._windows and deadline > now:
                        self._windows[(key, w)] = (remaining - 1, deadline)
            return wait

    def update(self, key: tuple, headers, *, cone: bool, refused: bool = False) -> None:
        now = self._clock()
        with self._lock:
            for w, prefix in (("rate", "x-rate-limit"), ("cone", "x-cone-rate-limit")):
                if w == "cone" and not cone:
                    continue
                remaining = _int(headers.get(f"{prefix}-remaining"))
                reset = _float(headers.get(f"{prefix}-reset"))
                if refused and remaining is None and reset is not None:
                    remaining = 0
                if remaining is None or reset is None:
                    continue
                self._windows[(key, w)] = (remaining, now + max(0.0, reset))


def _int(v) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# One record for the process: every Tns client of the same bot and URL shares its budget.
LIMITS = RateLimits()


class Tns:
    name = "tns"

    def __init__(self, url: str | None = None, timeout: float = 20.0, credentials: Credentials | None = None,
                 limits: RateLimits | None = None):
        self.url = (url or DEFAULT_URL).rstrip("/")
        self.timeout = timeout
        self.credentials = credentials
        self.limits = limits or LIMITS

    def _throttle(self, key: tuple, cone: bool) -> float:
        """Wait out a spent rate-limit window if it resets within the timeout; returns the time waited."""
        windows = ("rate", "cone") if cone else ("rate",)
        waited = 0.0
        while True:
            wait = self.limits.wait_needed(key, windows)
            if wait <= 0.0:
                return waited
            if waited + wait > self.timeout:
                raise CatalogUnavailable(self.name, f"rate limit reached; try again in {wait:.0f} s", wait)
            time.sleep(wait)
            waited += wait

    def _post(self, endpoint: str, data: dict[str, Any], *, cone: bool = False) -> Any:
        if self.credentials is None:
            raise CatalogError(self.name, "needs a bot: set catalogs.tns_bot_id, tns_bot_name and tns_api_key")
        key = (self.url, self.credentials.bot_id)
        waited = self._throttle(key, cone)
        try:
            # What is left of the time budget after waiting for the limit: the whole call stays within it.
            with httpx.Client(timeout=max(0.5, self.timeout - waited)) as client:
                r = client.post(f"{self.url}/get/{endpoint}",
                                headers={"User-Agent": self.credentials.marker},
                                data={"api_key": self.credentials.api_key, "data": json.dumps(data)})
        except httpx.TimeoutException:
            raise CatalogUnavailable(self.name, "timed out") from None
        except httpx.TransportError as exc:
            raise CatalogUnavailable(self.name, f"connection failed ({type(exc).__name__})") from None
        self.limits.update(key, r.headers, cone=cone, refused=r.status_code == 429)
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
