"""Catalog look-ups: SIMBAD, NED, JPL Horizons, MPC and TNS, cached in the database.

One module per service, each a small client with ``lookup(name) ->
CatalogEntry`` (see :class:`~tomd.catalogs.base.Catalog`). :class:`Catalogs`
puts them behind the config (URLs, timeout, TNS bot) and the shared cache;
:func:`lookup` is the one-call form hooks and rule features use::

    from tomd.catalogs import lookup
    entry = lookup("simbad", "M31", config=config)   # CatalogEntry
    spec = entry.to_spec(query="M31")                 # TargetSpec, ready for targets.store.upsert

Look-ups happen only when asked (Invariant 8: no hidden network). Every
call is bounded by ``catalogs.timeout``; failures are CatalogNotFound,
CatalogAmbiguous (user errors), CatalogUnavailable (retryable: timeout,
connection, 5xx, 429 with the reset delay) or CatalogError (permanent).

``cached_only=True`` answers from the cache or raises CatalogNotCached,
never touching the network: the form for rule features, which run inside
the ingest transaction (an uncached call would hold it for up to the
timeout). Warm the cache from a hook or ``tomd target add --from``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from tomd.catalogs.base import (TITLES, Catalog, CatalogAmbiguous, CatalogEntry, CatalogError, CatalogNotCached,
                                CatalogNotFound, CatalogUnavailable)
from tomd.targets.names import normalize

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from tomd.config import Catalogs as CatalogsConfig, Config

__all__ = ["SERVICES", "Catalog", "CatalogAmbiguous", "CatalogEntry", "CatalogError", "CatalogNotCached", "CatalogNotFound",
           "CatalogUnavailable", "Catalogs", "ephemeris", "lookup", "tns_near"]

log = logging.getLogger("tomd.catalogs")

SERVICES = ("simbad", "ned", "horizons", "mpc", "tns")


class Catalogs:
    """The configured services and the shared cache (``sessions`` None: no cache)."""

    def __init__(self, config: "CatalogsConfig", sessions: "sessionmaker[Session] | None" = None):
        from tomd.catalogs.cache import Cache

        self.config = config
        self.cache = Cache(sessions, config.cache_ttl) if sessions is not None else None
        self._clients: dict[str, Any] = {}

    def client(self, service: str) -> Any:
        if service not in SERVICES:
            raise CatalogError(service, f"unknown catalog; expected one of {', '.join(SERVICES)}")
        c = self._clients.get(service)
        if c is None:
            c = self._clients[service] = _build(service, self.config)
        return c

    def _cached(self, service: str, key: str, fetch, cached_only: bool = False):
        from tomd.catalogs.cache import cache_key

        k = cache_key(key)
        if self.cache is not None:
            hit = self.cache.get(service, k)
            if hit is not None:
                log.debug("catalog cache hit %s %s", service, k)
                return hit
        if cached_only:
            raise CatalogNotCached(service, key)
        payload = fetch()
        if self.cache is not None:
            self.cache.put(service, k, payload)
        return payload

    def lookup(self, service: str, name: str, *, cached_only: bool = False) -> CatalogEntry:
        """The object ``name`` as ``service`` describes it (from the cache when fresh).

        ``cached_only``: the cache or CatalogNotCached, no network.
        """
        service = service.lower()
        client = self.client(service)
        payload = self._cached(service, f"object:{normalize(name)}", lambda: client.lookup(name).to_json(),
                               cached_only)
        return CatalogEntry.from_json(payload)

    def ephemeris(self, name: str, start_mjd: float, stop_mjd: float, step: str = "10m",
                  location: str = "500", *, cached_only: bool = False) -> list[tuple[float, float, float]]:
        """Horizons (MJD UTC, RA, Dec) rows; cached per object, time range, step and place."""
        client = self.client("horizons")
        key = f"ephemeris:{normalize(name)}:{start_mjd:.5f}:{stop_mjd:.5f}:{step}:{location}"
        payload = self._cached("horizons", key, lambda: {
            "rows": [list(r) for r in client.ephemeris(name, start_mjd, stop_mjd, step, location)]}, cached_only)
        return [tuple(r) for r in payload["rows"]]

    def tns_near(self, ra: float, dec: float, radius_arcsec: float = 5.0, *,
                 cached_only: bool = False) -> tuple[str, ...]:
        """Names of TNS objects reported within ``radius_arcsec`` of (ra, dec)."""
        client = self.client("tns")
        key = f"near:{ra:.6f}:{dec:.6f}:{radius_arcsec:g}"
        return tuple(self._cached("tns", key, lambda: {"names": list(client.near(ra, dec, radius_arcsec))},
                                  cached_only)["names"])


def _build(service: str, c: "CatalogsConfig") -> Any:
    if service == "simbad":
        from tomd.catalogs.simbad import Simbad

        return Simbad(c.simbad_url, c.timeout)
    if service == "ned":
        from tomd.catalogs.ned import Ned

        return Ned(c.ned_url, c.timeout)
    if service == "horizons":
        from tomd.catalogs.horizons import Horizons

        return Horizons(c.horizons_url, c.timeout)
    if service == "mpc":
        from tomd.catalogs.mpc import Mpc

        return Mpc(c.mpc_url, c.timeout)
    from tomd.catalogs.tns import Credentials, Tns

    creds = None
    if c.tns_bot_id is not None and c.tns_bot_name and c.tns_api_key is not None:
        creds = Credentials(c.tns_bot_id, c.tns_bot_name, c.tns_api_key.reveal())
    return Tns(c.tns_url, c.timeout, creds)


# One Catalogs per (config, database) for the plain functions, built on first use.
_SHARED: dict[tuple, Catalogs] = {}
_SHARED_LOCK = threading.Lock()


def _shared(config: "Config | None", sessions: "sessionmaker[Session] | None") -> Catalogs:
    if config is None:
        config = _default_config()
    key = (id(config), id(sessions))
    with _SHARED_LOCK:
        c = _SHARED.get(key)
        if c is None:
            if sessions is None:
                sessions = _database(config)
            c = _SHARED[key] = Catalogs(config.catalogs, sessions)
            c._config_ref = config  # keep id(config) from being reused while cached
        return c


_DEFAULT_CONFIG: list = []


def _default_config() -> "Config":
    """The config the daemon would read ($TOMD_CONFIG or ./tomd.toml; embedded defaults without one)."""
    with _SHARED_LOCK:
        if not _DEFAULT_CONFIG:
            from tomd.config import load_config

            _DEFAULT_CONFIG.append(load_config())
        return _DEFAULT_CONFIG[0]


def _database(config: "Config") -> "sessionmaker[Session] | None":
    """The configured database for the cache, or None (look-ups still work, uncached)."""
    from tomd.db.migrate import connect, ensure_current, sessions
    from tomd.errors import DatabaseNotReady

    try:
        engine = connect(config.database.url, pool_size=2)
        ensure_current(engine)
    except DatabaseNotReady as exc:
        log.warning("catalog answers will not be cached: %s", exc)
        return None
    return sessions(engine)


def lookup(service: str, name: str, *, config: "Config | None" = None,
           sessions: "sessionmaker[Session] | None" = None, cached_only: bool = False) -> CatalogEntry:
    """Look ``name`` up in ``service`` ("simbad", "ned", "horizons", "mpc", "tns").

    ``config`` gives URLs, timeout, cache TTL and the TNS bot (default: the
    config file the daemon reads, $TOMD_CONFIG or ./tomd.toml); ``sessions``
    the database for the cache (default: the config's database).
    ``cached_only=True``: answer from the cache or raise CatalogNotCached,
    without any network (use it in rule features). Without a database
    there is no cache, so it always raises.
    """
    return _shared(config, sessions).lookup(service, name, cached_only=cached_only)


def ephemeris(name: str, start_mjd: float, stop_mjd: float, step: str = "10m", *, location: str = "500",
              config: "Config | None" = None, sessions: "sessionmaker[Session] | None" = None,
              cached_only: bool = False):
    """JPL Horizons (MJD UTC, RA, Dec) rows for ``name``, geocentric by default."""
    return _shared(config, sessions).ephemeris(name, start_mjd, stop_mjd, step, location, cached_only=cached_only)


def tns_near(ra: float, dec: float, radius_arcsec: float = 5.0, *, config: "Config | None" = None,
             sessions: "sessionmaker[Session] | None" = None, cached_only: bool = False) -> tuple[str, ...]:
    """Names of TNS objects reported near (ra, dec)."""
    return _shared(config, sessions).tns_near(ra, dec, radius_arcsec, cached_only=cached_only)


def title(service: str) -> str:
    return TITLES.get(service, service)
