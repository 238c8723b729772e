"""What every catalog client shares: the entry it returns, its Protocol, its errors.

A look-up answers with a frozen :class:`CatalogEntry` (plain JSON-able
values, so it can be cached in the ``catalog_cache`` table and read back by
another process) that turns into a :class:`~tomd.targets.model.TargetSpec`.

Errors name the service and what was asked, never a credential:

- :class:`CatalogNotFound` (a :class:`~tomd.errors.NotFoundError`): the
  service answered and has no such object;
- :class:`CatalogAmbiguous` (a :class:`~tomd.errors.UserError`): the name
  matches several objects (Horizons lists them);
- :class:`CatalogUnavailable` (a :class:`~tomd.errors.RetryableError`): no
  answer (timeout, refused connection, 5xx, 429) — try later;
- :class:`CatalogError` (a :class:`~tomd.errors.PermanentError`): the service
  refused the question (bad credentials, a malformed answer);
- :class:`CatalogNotCached` (a :class:`~tomd.errors.TomdError`): a
  ``cached_only`` look-up whose answer is not in the cache (nothing was sent).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tomd.errors import NotFoundError, PermanentError, RetryableError, TomdError, UserError, redact
from tomd.targets.model import ELEMENT_FIELDS, TargetSpec
from tomd.targets.names import check_name

# How each service is shown to people.
TITLES = {"simbad": "SIMBAD", "ned": "NED", "horizons": "JPL Horizons", "mpc": "MPC", "tns": "TNS"}


class CatalogNotFound(NotFoundError):
    def __init__(self, service: str, name: str, detail: str = ""):
        self.service, self.name = service, name
        msg = f"{TITLES.get(service, service)}: no object named {name!r}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class CatalogAmbiguous(UserError):
    """The name matches several objects; the message lists them."""


class CatalogUnavailable(RetryableError):
    def __init__(self, service: str, detail: str, retry_after: float | None = None):
        self.service = service
        super().__init__(f"{TITLES.get(service, service)} is unavailable: {redact(detail)}", retry_after)


class CatalogError(PermanentError):
    def __init__(self, service: str, detail: str):
        self.service = service
        super().__init__(f"{TITLES.get(service, service)}: {redact(detail)}")


class CatalogNotCached(TomdError):
    """``cached_only=True`` and no fresh answer in the cache: nothing was asked of the service."""

    def __init__(self, service: str, key: str):
        self.service, self.key = service, key
        super().__init__(f"{TITLES.get(service, service)}: {key!r} is not in the catalog cache")


@dataclass(frozen=True)
class CatalogEntry:
    """One object as a catalog describes it.

    ``ra``/``dec`` are ICRS degrees (sidereal objects); ``scheme`` and
    ``elements`` (LCO field names: epochofel, orbinc, … in degrees, au and
    MJD) describe a solar-system object. ``distance`` is in parsecs.
    """

    service: str
    name: str
    ra: float | None = None
    dec: float | None = None
    aliases: tuple[str, ...] = ()
    object_type: str | None = None
    redshift: float | None = None
    distance: float | None = None
    pm_ra: float | None = None
    pm_dec: float | None = None
    parallax: float | None = None
    scheme: str | None = None
    elements: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aliases"] = list(self.aliases)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CatalogEntry":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["aliases"] = tuple(values.get("aliases") or ())
        return cls(**values)

    def to_spec(self, *, query: str | None = None, tags: tuple[str, ...] = (), lists: tuple[str, ...] = (),
                extras: dict[str, Any] | None = None) -> TargetSpec:
        """The target this entry describes; ``query`` (the name asked for) becomes an alias.

        Names a target cannot carry (empty, too long) are dropped rather than
        failing the whole look-up.
        """
        aliases = []
        for n in (query, *self.aliases):
            try:
                aliases.append(check_name(n))
            except ValueError:
                continue
        more = {k: v for k, v in (("object_type", self.object_type), ("redshift", self.redshift)) if v is not None}
        more.update(self.extras)
        more.update(extras or {})
        common = dict(name=self.name, aliases=tuple(dict.fromkeys(aliases)), tags=tags, lists=lists,
                      extras=more, name_source=self.service)
        if self.scheme:
            return TargetSpec(scheme=self.scheme, **{k: v for k, v in self.elements.items() if k in ELEMENT_FIELDS},
                              **common)
        return TargetSpec(ra=self.ra, dec=self.dec, pm_ra=self.pm_ra, pm_dec=self.pm_dec, parallax=self.parallax,
                          distance=self.distance, **common)


class Catalog(Protocol):
    """One service. ``lookup`` raises CatalogNotFound / CatalogUnavailable / CatalogError."""

    name: str

    def lookup(self, name: str) -> CatalogEntry: ...


def number(v: Any) -> float | None:
    """A finite float, or None for masked, empty, NaN and non-numeric values."""
    if v is None or np.ma.is_masked(v):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def text(v: Any) -> str | None:
    if v is None or np.ma.is_masked(v):
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    s = " ".join(str(v).split())
    return s or None
