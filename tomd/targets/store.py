"""Match and upsert: one object is one target, however many names it has.

A spec is the existing target its primary name names (case- and
punctuation-insensitively); else the nearest target within the match
radius; else the target one of its aliases names; otherwise it is a new
target (see ``upsert_many``). The position
lookup is a HEALPix range query (``tomd.sky.cone_ranges``) followed by an
exact Vincenty filter, so it costs the same at 10^6 targets as at 10^3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy.orm import Session

from tomd import sky
from tomd.db import repository as repo
from tomd.db.models import Target, utcnow
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


def upsert(
    s: Session,
    spec: TargetSpec,
    *,
    radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
    origin: str = "",
) -> UpsertResult:
    """Create the target or merge ``spec`` into the one it matches. The caller commits."""
    return upsert_many(s, [spec], radius_arcsec=radius_arcsec, origin=origin)[0]


def upsert_many(
    s: Session,
    specs: Sequence[TargetSpec],
    *,
    radius_arcsec: float = DEFAULT_RADIUS_ARCSEC,
    origin: str = "",
) -> list[UpsertResult]:
    """Upsert many specs in a few statements; results in the order of ``specs``.

    Each spec is the existing target named by its primary name; else the
    nearest target within the radius; else the target one of its aliases
    names; else a new target. A position beats an alias because an alias that
    points far away is more likely a mistake than the position; the alias is
    then reported as a conflict and stays where it is. Specs in one call see
    each other: two alerts of one new object make one target.

    Merging adds names, tags, lists and extras, and fills fields the stored
    target lacks; it never moves a stored position. target.created and
    target.updated events go to the outbox. Raises SpecError for a bad spec.
    """
    specs = [validate(x) for x in specs]
    if not specs:
        return []
    plan = _Plan(s, specs, radius_arcsec)
    return plan.execute(origin)


@dataclass
class _Step:
    spec: TargetSpec
    norms: list[str]
    target: int | None = None  # existing id (> 0) or provisional id (< 0) of a new target
    by: str | None = None  # "name" | "position" | None (created)
    separation_arcsec: float | None = None
    new_names: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


class _Plan:
    """Decides every spec's target with three queries, then writes in bulk.

    On PostgreSQL each query is one fixed statement with array parameters
    (names, sky ranges), whatever the batch size, and new targets, names and
    events go by COPY (tomd.db.repository, "targets: batch match and create").
    """

    def __init__(self, s: Session, specs: list[TargetSpec], radius_arcsec: float):
        self.s = s
        self.radius_deg = radius_arcsec / 3600.0
        self.steps = [_Step(x, list(dict.fromkeys(normalize(n) for n in x.names()))) for x in specs]
        ranges = {}
        for k, st in enumerate(self.steps):
            if st.spec.ra is not None and st.spec.dec is not None:
                ranges[k] = sky.cone_ranges(st.spec.ra, st.spec.dec, max(self.radius_deg, 1e-7))
        # Two daemons must not both create the same new object (PostgreSQL).
        repo.lock_sky_cells(s, sky.cells_of_ranges([r for rs in ranges.values() for r in rs], _LOCK_DEPTH))
        self.known = repo.match_target_names(s, sorted({n for st in self.steps for n in st.norms}))
        need = [r for k, rs in ranges.items() if self.steps[k].norms[0] not in self.known for r in rs]
        nearby = repo.targets_near(s, need) if need and self.radius_deg > 0 else {}
        # Candidates bucketed by coarse sky cell, so each spec compares with
        # its neighbours only, not with the whole batch.
        self.ranges = ranges
        self.buckets: dict[int, list[tuple[int, float, float]]] = {}
        for tid, (ra, dec) in nearby.items():
            self._bucket(tid, ra, dec)
        self.created: list[tuple[int, _Step]] = []  # (provisional id, step)
        for k, st in enumerate(self.steps):
            self._decide(k, st)

    def _bucket(self, tid: int, ra: float, dec: float) -> None:
        cell = sky.sky_index(ra, dec) >> (2 * (sky.INDEX_DEPTH - _LOCK_DEPTH))
        self.buckets.setdefault(cell, []).append((tid, ra, dec))

    def _candidates(self, k: int):
        for cell in sky.cells_of_ranges(self.ranges[k], _LOCK_DEPTH):
            yield from self.buckets.get(cell, ())

    def _decide(self, k: int, st: _Step) -> None:
        spec = st.spec
        primary = self.known.get(st.norms[0])
        if primary is not None:
            st.target, st.by = primary, "name"
        elif spec.ra is not None and spec.dec is not None and self.radius_deg > 0:
            best = None
            for tid, tra, tdec in self._candidates(k):
                sep = sky.separation_deg(spec.ra, spec.dec, tra, tdec)
                if sep <= self.radius_deg and (best is None or (sep, tid) < best[:2]):
                    best = (sep, tid)
            if best is not None:
                st.target, st.by, st.separation_arcsec = best[1], "position", best[0] * 3600.0
        if st.target is None:
            alias = next((self.known[n] for n in st.norms[1:] if n in self.known), None)
            if alias is not None:
                st.target, st.by = alias, "name"
        if st.target is None:
            st.target = -(len(self.created) + 1)
            self.created.append((st.target, st))
            if spec.ra is not None and spec.dec is not None:
                self._bucket(st.target, spec.ra, spec.dec)
        names = dict(zip((normalize(n) for n in spec.names()), spec.names()))
        for norm in st.norms:
            owner = self.known.get(norm)
            if owner is None:
                self.known[norm] = st.target
                st.new_names.append(names[norm])
            elif owner != st.target:
                st.conflicts.append(names[norm])

    def match_of(self, st: _Step, rows: dict[int, Any] | None = None) -> Match:
        sep = st.separation_arcsec
        if st.by == "name" and st.spec.ra is not None and st.spec.dec is not None:
            row = (rows or repo.target_rows_any(self.s, [st.target])).get(st.target)
            if row is not None and row["ra"] is not None and row["dec"] is not None:
                sep = sky.separation_deg(row["ra"], row["dec"], st.spec.ra, st.spec.dec) * 3600.0
        return Match(st.target, st.by, sep)

    def execute(self, origin: str) -> list[UpsertResult]:
        s = self.s
        # When the extras set here were set (targets.extras_set_at: backtests replay extras as they stood).
        now = utcnow().isoformat()
        # New targets: one multi-row INSERT … RETURNING; later specs in the
        # batch may have merged into them (fields filled into ``columns``).
        new_columns: dict[int, dict[str, Any]] = {}
        for prov, st in self.created:
            cols = {f: getattr(st.spec, f) for f in (*SIDEREAL_FIELDS, *ELEMENT_FIELDS, "scheme")}
            cols.update(derived_columns(st.spec))
            new_columns[prov] = {"name": st.spec.name, "extras": dict(st.spec.extras), **cols}
            if st.spec.extras:
                new_columns[prov]["extras_set_at"] = dict.fromkeys(st.spec.extras, now)
        existing = sorted({st.target for st in self.steps if st.target > 0})
        rows = repo.target_rows_any(s, existing)
        changes_of: list[dict[str, Any]] = []
        updates: dict[int, dict[str, Any]] = {}
        for st in self.steps:
            if st.by is None:
                changes_of.append({})
                continue
            base = new_columns.get(st.target) if st.target < 0 else updates.setdefault(st.target, {})
            current = dict(rows[st.target]) if st.target > 0 else {}
            if st.target > 0:
                current.update(base)
            else:
                current = base
            changes_of.append(_fill(current, st.spec, base, now))
        if any("extras_set_at" in c for c in new_columns.values()):
            # One key set for the whole insert; a batch whose new targets have no extras (ingest's)
            # does not write the column at all.
            for c in new_columns.values():
                c.setdefault("extras_set_at", None)
        real = repo.create_targets(s, [new_columns[prov] for prov, _ in self.created])
        ids = {prov: rid for (prov, _), rid in zip(self.created, real)}

        def tid(t: int) -> int:
            return ids.get(t, t)

        for t, values in updates.items():
            if values:
                repo.update_target(s, t, values)
        name_rows = []
        events: list[tuple[Any, int]] = []
        results = []
        for st, changes in zip(self.steps, changes_of):
            t = tid(st.target)
            for n in st.new_names:
                name_rows.append({"target_id": t, "name": n, "norm": normalize(n),
                                  "primary": st.by is None and n == st.spec.name, "source": st.spec.name_source})
            tags = repo.add_tags(s, t, st.spec.tags) if st.spec.tags else []
            lists = repo.add_to_lists(s, t, st.spec.lists) if st.spec.lists else []
            if st.by is None:
                events.append((TargetCreated(t, st.spec.name, st.spec.ra, st.spec.dec, origin), t))
                results.append(UpsertResult(t, True, None, tuple(st.new_names), {}, tuple(st.conflicts)))
                continue
            if tags:
                changes["tags"] = tags
            if lists:
                changes["lists"] = lists
            if changes or st.new_names:
                name = rows[st.target]["name"] if st.target > 0 else new_columns[st.target]["name"]
                events.append((TargetUpdated(t, name, changes, tuple(st.new_names), origin), t))
            m = self.match_of(st, rows) if st.target > 0 else Match(t, st.by, st.separation_arcsec)
            results.append(UpsertResult(t, False, Match(t, m.by, m.separation_arcsec), tuple(st.new_names),
                                        changes, tuple(st.conflicts)))
        repo.create_target_names(s, name_rows)
        repo.ingest_events(s, events)
        return results


def _fill(current: dict[str, Any], spec: TargetSpec, out: dict[str, Any], now: str) -> dict[str, Any]:
    """Put into ``out`` what ``spec`` adds to a target whose columns are ``current``.

    Fills missing fields of the same kind of target (never moves a position),
    and sets extras, each key set or changed stamped ``now`` (ISO time) in
    ``extras_set_at``; a key given again with its stored value keeps its
    time. Returns the changes as reported to the user.
    """
    changes: dict[str, Any] = {}
    same_kind = current.get("type", spec.type) == spec.type
    if same_kind:
        for f in (*SIDEREAL_FIELDS, *ELEMENT_FIELDS, "scheme"):
            new = getattr(spec, f)
            if new is not None and current.get(f) is None:
                out[f] = current[f] = changes[f] = new
        if "ra" in changes or "dec" in changes:
            out.update(derived_columns(spec))
    extras = dict(current.get("extras") or {})
    set_at = None
    for k, v in spec.extras.items():
        if extras.get(k) != v:
            extras[k] = v
            changes[f"extras.{k}"] = v
            if set_at is None:
                set_at = dict(current.get("extras_set_at") or {})
            set_at[k] = now
    if set_at is not None:
        out["extras"] = current["extras"] = extras
        out["extras_set_at"] = current["extras_set_at"] = set_at
    return changes


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
