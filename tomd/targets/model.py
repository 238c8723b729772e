"""What a target is, before it is stored: a validated ``TargetSpec``.

Sidereal targets have ra/dec (ICRS degrees) and optionally an epoch, proper
motion, parallax and distance. Non-sidereal targets have orbital elements in
one of three schemes, with the field names of the LCO observation portal
(and the TOM Toolkit), each scheme with its required fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tomd import sky
from tomd.targets.names import check_name

SIDEREAL_FIELDS = ("ra", "dec", "epoch", "pm_ra", "pm_dec", "parallax", "distance")

ELEMENT_FIELDS = (
    "epochofel", "orbinc", "longascnode", "argofperih", "eccentricity",
    "meandist", "meananom", "perihdist", "epochofperih", "dailymot",
)

# Required elements per scheme (LCO portal: ORBITAL_ELEMENTS targets).
SCHEMES: dict[str, tuple[str, ...]] = {
    "MPC_MINOR_PLANET": (
        "epochofel", "orbinc", "longascnode", "argofperih", "meandist", "eccentricity", "meananom",
    ),
    "MPC_COMET": (
        "epochofel", "orbinc", "longascnode", "argofperih", "perihdist", "eccentricity", "epochofperih",
    ),
    "JPL_MAJOR_PLANET": (
        "epochofel", "orbinc", "longascnode", "argofperih", "meandist", "eccentricity", "meananom",
        "dailymot",
    ),
}

# Physical ranges of the elements (degrees, AU, MJD).
_RANGES: dict[str, tuple[float, float]] = {
    "orbinc": (0.0, 180.0),
    "longascnode": (0.0, 360.0),
    "argofperih": (0.0, 360.0),
    "meananom": (0.0, 360.0),
    "eccentricity": (0.0, float("inf")),
    "meandist": (0.0, float("inf")),
    "perihdist": (0.0, float("inf")),
}


@dataclass(frozen=True)
class TargetSpec:
    """A target as given by a person, a file, an alert or a catalog."""

    name: str
    ra: float | None = None
    dec: float | None = None
    epoch: float | None = None
    pm_ra: float | None = None
    pm_dec: float | None = None
    parallax: float | None = None
    distance: float | None = None
    scheme: str | None = None
    epochofel: float | None = None
    orbinc: float | None = None
    longascnode: float | None = None
    argofperih: float | None = None
    eccentricity: float | None = None
    meandist: float | None = None
    meananom: float | None = None
    perihdist: float | None = None
    epochofperih: float | None = None
    dailymot: float | None = None
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)
    name_source: str | None = None  # "ztf", "tns", "user", ...

    @property
    def type(self) -> str:
        return "non_sidereal" if self.scheme else "sidereal"

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


class SpecError(ValueError):
    """A target field is wrong. ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def validate(spec: TargetSpec) -> TargetSpec:
    """Check every field; return the spec normalised (RA wrapped, names tidied).

    Raises SpecError naming the first bad field.
    """
    try:
        name = check_name(spec.name)
    except ValueError as exc:
        raise SpecError("name", str(exc)) from None
    aliases = []
    for alias in spec.aliases:
        try:
            aliases.append(check_name(alias))
        except ValueError as exc:
            raise SpecError("aliases", str(exc)) from None
    for f in (*SIDEREAL_FIELDS, *ELEMENT_FIELDS):
        v = getattr(spec, f)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise SpecError(f, f"expected a finite number, got {v!r}")
    changes: dict[str, Any] = {"name": name, "aliases": tuple(dict.fromkeys(aliases))}
    if spec.scheme:
        scheme = spec.scheme.upper()
        if scheme not in SCHEMES:
            raise SpecError("scheme", f"expected one of {', '.join(SCHEMES)}, got {spec.scheme!r}")
        missing = [f for f in SCHEMES[scheme] if getattr(spec, f) is None]
        if missing:
            raise SpecError(missing[0], f"required for scheme {scheme} (missing: {', '.join(missing)})")
        for f, (lo, hi) in _RANGES.items():
            v = getattr(spec, f)
            if v is not None and not lo <= v <= hi:
                raise SpecError(f, f"expected a value within [{lo:g}, {hi:g}], got {v:g}")
        if scheme != "MPC_COMET" and spec.eccentricity is not None and spec.eccentricity >= 1.0:
            raise SpecError("eccentricity", f"must be < 1 for scheme {scheme} (use MPC_COMET), got {spec.eccentricity:g}")
        changes["scheme"] = scheme
        if spec.ra is not None or spec.dec is not None:
            raise SpecError("ra", "a non-sidereal target has orbital elements, not ra/dec")
    else:
        given = [f for f in ELEMENT_FIELDS if getattr(spec, f) is not None]
        if given:
            raise SpecError(given[0], "orbital elements need a scheme (MPC_MINOR_PLANET, MPC_COMET or JPL_MAJOR_PLANET)")
        if spec.ra is None:
            raise SpecError("ra", "required for a sidereal target")
        if spec.dec is None:
            raise SpecError("dec", "required for a sidereal target")
        if not 0.0 <= spec.ra <= 360.0:
            raise SpecError("ra", f"expected degrees within [0, 360], got {spec.ra:g}")
        if not -90.0 <= spec.dec <= 90.0:
            raise SpecError("dec", f"expected degrees within [-90, 90], got {spec.dec:g}")
        changes["ra"] = spec.ra % 360.0
        if spec.parallax is not None and spec.parallax < 0:
            raise SpecError("parallax", f"expected mas >= 0, got {spec.parallax:g}")
        if spec.distance is not None and spec.distance <= 0:
            raise SpecError("distance", f"expected pc > 0, got {spec.distance:g}")
    for key in spec.extras:
        if not isinstance(key, str) or not key:
            raise SpecError("extras", f"extra names must be non-empty text, got {key!r}")
    return replace(spec, **changes)


def spec_field_names() -> tuple[str, ...]:
    """Column names a file may use for target fields (besides name/aliases/tags/lists)."""
    skip = {"aliases", "tags", "lists", "extras", "name_source"}
    return tuple(f.name for f in fields(TargetSpec) if f.name not in skip)


def derived_columns(spec: TargetSpec) -> dict[str, Any]:
    """Columns computed from a valid spec: type, sky index, galactic coordinates."""
    out: dict[str, Any] = {"type": spec.type}
    if spec.ra is not None and spec.dec is not None:
        out["hpx"] = sky.sky_index(spec.ra, spec.dec)
        out["gal_l"], out["gal_b"] = sky.to_galactic(spec.ra, spec.dec)
    else:
        out["hpx"] = out["gal_l"] = out["gal_b"] = None
    return out
