"""The Minor Planet Center's Orbits API (``data.minorplanetcenter.net/api/get-orb``).

A GET with a JSON body ``{"desig": NAME}`` answers with the object's best-fit
orbit in the MPC's ``mpc_orb`` JSON format (documented at
docs.minorplanetcenter.net, "Orbits API"). astroquery's ``MPC`` module
still uses the older ``web_service`` search, so this client speaks the
current documented API itself.

From ``mpc_orb``: the cometary set ``COM`` (q, e, i, node, argperi,
peri_time) is always there; the Keplerian set ``KEP`` (a, e, i, node,
argperi, mean_anomaly) only for bound orbits. A bound minor planet becomes
``MPC_MINOR_PLANET`` at ``epoch_data.epoch``; a comet or an unbound orbit
``MPC_COMET``. Angles refer to the ecliptic of J2000; times are TT MJDs.
"""

from __future__ import annotations

from typing import Any

import httpx

from tomd.catalogs.base import CatalogEntry, CatalogError, CatalogNotFound, CatalogUnavailable, number, text
from tomd.catalogs.designations import pack_provisional, rubin_alias
from tomd.catalogs.http import retry_after

DEFAULT_URL = "https://data.minorplanetcenter.net/api/get-orb"


class Mpc:
    name = "mpc"

    def __init__(self, url: str | None = None, timeout: float = 20.0):
        self.url = url or DEFAULT_URL
        self.timeout = timeout

    def lookup(self, name: str) -> CatalogEntry:
        try:
            with httpx.Client(timeout=self.timeout) as client:
                r = client.request("GET", self.url, json={"desig": name.strip()})
        except httpx.TimeoutException:
            raise CatalogUnavailable(self.name, "timed out") from None
        except httpx.TransportError as exc:
            raise CatalogUnavailable(self.name, f"connection failed ({type(exc).__name__})") from None
        if r.status_code == 404:
            raise CatalogNotFound(self.name, name)
        if r.status_code >= 500 or r.status_code == 429:
            raise CatalogUnavailable(self.name, f"HTTP {r.status_code}", retry_after(r.headers, "Retry-After"))
        if r.status_code >= 400:
            detail = _message(r)
            if "not found" in detail.lower() or "no orbit" in detail.lower():
                raise CatalogNotFound(self.name, name, detail)
            raise CatalogError(self.name, f"HTTP {r.status_code}: {detail}")
        try:
            body = r.json()
        except ValueError:
            raise CatalogError(self.name, "the answer is not JSON") from None
        orb = _mpc_orb(body)
        if orb is None:
            raise CatalogNotFound(self.name, name)
        return entry_from_mpc_orb(orb, query=name)


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:200]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body.get("detail") or body)[:200]
    return str(body)[:200]


def _mpc_orb(body: Any) -> dict | None:
    """The mpc_orb dictionary of a get-orb answer: ``[{"mpc_orb": [ {...} ] or {...}}, 200]``."""
    first = body[0] if isinstance(body, list) and body else body
    if not isinstance(first, dict):
        return None
    orb = first.get("mpc_orb", first if "COM" in first else None)
    if isinstance(orb, list):
        orb = orb[0] if orb else None
    return orb if isinstance(orb, dict) and ("COM" in orb or "KEP" in orb) else None


def _elements(block: dict | None) -> dict[str, float]:
    if not isinstance(block, dict):
        return {}
    return {k: v for k, v in zip(block.get("coefficient_names", []), block.get("coefficient_values", []))
            if number(v) is not None}


def entry_from_mpc_orb(orb: dict, *, query: str | None = None) -> CatalogEntry:
    com, kep = _elements(orb.get("COM")), _elements(orb.get("KEP"))
    epoch = number((orb.get("epoch_data") or {}).get("epoch"))
    desig = orb.get("designation_data") or {}
    cat = orb.get("categorization") or {}
    kind = text(cat.get("object_type_str")) or ""
    e = number(com.get("e", kep.get("e")))
    if e is None:
        raise CatalogError("mpc", "the orbit has no eccentricity")
    comet = "comet" in kind.lower() or e >= 1.0 or not kep
    common = {"orbinc": com.get("i", kep.get("i")), "longascnode": com.get("node", kep.get("node")),
              "argofperih": com.get("argperi", kep.get("argperi")), "eccentricity": e, "epochofel": epoch}
    if comet:
        scheme = "MPC_COMET"
        elements = {**common, "perihdist": com.get("q"), "epochofperih": com.get("peri_time")}
    else:
        scheme = "MPC_MINOR_PLANET"
        elements = {**common, "meandist": kep.get("a"), "meananom": kep.get("mean_anomaly")}
    missing = [k for k, v in elements.items() if v is None]
    if missing:
        raise CatalogError("mpc", f"the orbit lacks {', '.join(missing)}")
    elements = {k: float(v) for k, v in elements.items()}
    for k in ("longascnode", "argofperih", "meananom"):
        if k in elements:
            elements[k] %= 360.0
    name_ = text(desig.get("name"))
    permid = text(desig.get("permid"))
    prov = text(desig.get("unpacked_primary_provisional_designation"))
    if name_ and permid:
        primary = f"({permid}) {name_}"
    else:
        primary = text(desig.get("iau_designation")) or name_ or prov or permid or (query or "").strip()
    # A bare number is never a name (it would shadow target ids in `tomd target show`).
    aliases = [a for a in (name_, permid, prov, *(desig.get("unpacked_secondary_provisional_designations") or []))
               if a and a != primary and not str(a).isdigit()]
    # Rubin alerts name the object by its packed designation (ssObjectId): let them find this target.
    rubin = rubin_alias(text(desig.get("packed_primary_provisional_designation")) or (pack_provisional(prov) if prov
                                                                                       else None))
    if rubin:
        aliases.append(rubin)
    mag = orb.get("magnitude_data") or {}
    extras = {f"mpc_{k}": number(mag[k]) for k in ("H", "G") if number(mag.get(k)) is not None}
    if text(cat.get("orbit_type_str")):
        extras["mpc_orbit_type"] = text(cat.get("orbit_type_str"))
    return CatalogEntry(service="mpc", name=primary, aliases=tuple(dict.fromkeys(map(str, aliases))),
                        object_type=kind or None, scheme=scheme, elements=elements, extras=extras)
