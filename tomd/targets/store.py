"""Match and upsert: one object is one target, however many names it has.

A spec is the existing target when any of its names matches (case- and
punctuation-insensitively), or else when an existing target lies within the
match radius (nearest wins). Otherwise it is a new target. The position
lookup is a HEALPix range query (``tomd.sky.cone_ranges``) followed by an
exact Vincenty filter, so it costs the same at 10^6 targets as at 10^3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy.orm import Session

from tomd import sky
from tomd.db import repository as repo
from tomd.db.models import Target
from tomd.events import TargetCreated, TargetUpdated
from tomd.targets.model import ELEMENT_FIELDS, SIDEREAL_FIELDS, TargetSpec, derived_columns, validate
from tomd.targets.names import normalize

DEFAULT_RADIUS_ARCSEC = 1.5
# Depth of the cells locked while creating a target (about 3.4'): coarse
# enough that a match cone touches one to four of them.
_LOCK_DEPTH = 10


@dataclass(frozen=True)
class Match:
    target_id: int
    by: Literal["name", "position"]
    separation_arcsec: float | None = None


@dataclass(frozen=True)
class UpsertResult:
    target_id: int
    created: bool
    match: Match | None = None
    new_names: tuple[str, ...] = ()
    changes: dict[str, Any] = field(default_factory=dict)
    # Names that already belong to another target: kept there, reported here.
    conflicts: tuple[str, ...] = ()


def cone(s: Session, ra: float, dec: float, radius_arcsec: float) -> list[tuple[int, float]]:
    """(target id, separation ″) of targets within the cone, nearest first."""
    radius_deg = radius_arcsec / 3600.0
    hits = []
    for tid, tra, tdec in repo.targets_in_ranges(s, sky.cone_ranges(ra, dec, radius_deg)):
        sep = sky.separation_deg(ra, dec, tra, tdec)
        if sep <= radius_deg:
            hits.append((tid, sep * 3600.0))
    hits.sort(key=lambda h: (h[1], h[0]))
    return hits


def match(s: Session, spec: TargetSpec, radius_arcsec: float = DEFAULT_RADIUS_ARCSEC) -> Match | None:
    """The existing target ``spec`` denotes.

    In order: its primary name; else the nearest target within the radius;
    else one of its aliases. A position beats an alias because an alias that
    points far away is more likely a mistake than the position is; the alias
    is then reported as a conflict and stays where it is.
    """
    return _match(s, spec, radius_arcsec, _known_names(s, spec))


def _known_names(s: Session, spec: TargetSpec) -> dict[str, int]:
    return repo.target_id_by_norm(s, list({normalize(n) for n in spec.names()}))


def _match(s: Session, spec: TargetSpec, radius_arcsec: float, known: dict[str, int]) -> Match | None:
    primary = known.get(normalize(spec.name))
    if primary is not None:
        return Match(primary, "name", _separation(s, primary, spec))
    if spec.ra is not None and spec.dec is not None and radius_arcsec > 0:
        hits = cone(s, spec.ra, spec.dec, radius_arcsec)
        if hits:
            return Match(hits[0][0], "position", hits[0][1])
    if known:
        tid = next(iter(known.values()))
        return Match(tid, "name", _separation(s, tid, spec))
    return None


def _separation(s: Session, target_id: int, spec: TargetSpec) -> float | None:
    """Arcseconds between a stored target and the spec's position, when both have one."""
    if spec.ra is None or spec.dec is None:
        return None
    t = repo.target_row(s, target_id)
    if t is None or t["ra"] is None or t["dec"] is None:
        return None
    return sky.separation_deg(t["ra"], t["dec"], spec.ra, spec.dec) * 3600.0


def upsert(
    s: Session,
    spec: TargetSpec,
    *,
    radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
    origin: str = "",
) -> UpsertResult:
    """Create the target or merge ``spec`` into the one it matches.

    Merging adds new aliases, tags and lists, sets extras, and fills fields
    the stored target lacks; it never moves a stored position. Writes a
    target.created / target.updated event to the outbox when anything changed.
    The caller commits.
    """
    spec = validate(spec)
    if spec.ra is not None and spec.dec is not None:
        ranges = sky.cone_ranges(spec.ra, spec.dec, max(radius_arcsec, 1e-3) / 3600.0)
        repo.lock_sky_cells(s, sky.cells_of_ranges(ranges, _LOCK_DEPTH))
    known = _known_names(s, spec)
    found = _match(s, spec, radius_arcsec, known)
    if found is None:
        return _create(s, spec, origin, known)
    return _merge(s, found, spec, origin, known)


def _create(s: Session, spec: TargetSpec, origin: str, known: dict[str, int]) -> UpsertResult:
    columns = {f: getattr(spec, f) for f in (*SIDEREAL_FIELDS, *ELEMENT_FIELDS, "scheme")}
    columns.update(derived_columns(spec))
    tid = repo.insert_target(s, {"name": spec.name, "extras": dict(spec.extras), **columns})
    names, conflicts = _add_names(s, tid, spec, known, primary_first=True)
    repo.add_tags(s, tid, spec.tags)
    repo.add_to_lists(s, tid, spec.lists)
    repo.add_event(s, TargetCreated(tid, spec.name, spec.ra, spec.dec, origin), target_id=tid)
    return UpsertResult(tid, True, None, tuple(names), {}, tuple(conflicts))


def _merge(s: Session, found: Match, spec: TargetSpec, origin: str, known: dict[str, int]) -> UpsertResult:
    row = repo.target_row(s, found.target_id)
    assert row is not None
    changes: dict[str, Any] = {}
    # Fill what is missing; never move a stored position or change its kind.
    if row["type"] == spec.type:
        for f in (*SIDEREAL_FIELDS, *ELEMENT_FIELDS, "scheme"):
            new = getattr(spec, f)
            if new is not None and row[f] is None:
                changes[f] = new
    update = dict(changes)
    if "ra" in changes or "dec" in changes:
        update.update(derived_columns(spec))
    extras = dict(row["extras"] or {})
    for k, v in spec.extras.items():
        if extras.get(k) != v:
            extras[k] = v
            changes[f"extras.{k}"] = v
    if extras != (row["extras"] or {}):
        update["extras"] = extras
    if update:
        repo.update_target(s, row["id"], update)
    names, conflicts = _add_names(s, row["id"], spec, known, primary_first=False)
    tags = repo.add_tags(s, row["id"], spec.tags)
    lists = repo.add_to_lists(s, row["id"], spec.lists)
    if tags:
        changes["tags"] = tags
    if lists:
        changes["lists"] = lists
    if changes or names:
        repo.add_event(s, TargetUpdated(row["id"], row["name"], changes, tuple(names), origin), target_id=row["id"])
    return UpsertResult(row["id"], False, found, tuple(names), changes, tuple(conflicts))


def _add_names(s: Session, target_id: int, spec: TargetSpec, known: dict[str, int], *,
               primary_first: bool) -> tuple[list[str], list[str]]:
    wanted: dict[str, str] = {}
    for n in spec.names():
        wanted.setdefault(normalize(n), n)
    rows, added, conflicts = [], [], []
    for i, (norm, n) in enumerate(wanted.items()):
        owner = known.get(norm)
        if owner == target_id:
            continue
        if owner is not None:
            conflicts.append(n)
            continue
        rows.append({"target_id": target_id, "name": n, "norm": norm,
                     "primary": primary_first and i == 0, "source": spec.name_source})
        added.append(n)
    repo.add_names(s, rows)
    return added, conflicts


def resolve(s: Session, name_or_id: str) -> Target | None:
    """A target by any of its names, or by ``#id``/numeric id."""
    key = name_or_id.strip()
    if key.startswith("#") and key[1:].isdigit():
        return repo.get_target(s, int(key[1:]))
    hit = repo.target_id_by_norm(s, [normalize(key)])
    if hit:
        return repo.get_target(s, next(iter(hit.values())))
    if key.isdigit():
        return repo.get_target(s, int(key))
    return None


def describe(s: Session, targets: list[Target]) -> list[dict[str, Any]]:
    """Plain dicts for display and export: fields, aliases, tags, lists, extras."""
    ids = [t.id for t in targets]
    names, tags, lists = repo.names_of(s, ids), repo.tags_of(s, ids), repo.lists_of(s, ids)
    out = []
    for t in targets:
        d: dict[str, Any] = {"id": t.id, "name": t.name, "type": t.type}
        for f in (*SIDEREAL_FIELDS, "gal_l", "gal_b", "scheme", *ELEMENT_FIELDS):
            d[f] = getattr(t, f)
        d["aliases"] = [n.name for n in names[t.id] if n.name != t.name]
        d["tags"] = tags[t.id]
        d["lists"] = lists[t.id]
        d["extras"] = dict(t.extras or {})
        d["created_at"] = t.created_at.isoformat() if t.created_at else None
        out.append(d)
    return out
