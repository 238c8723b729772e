"""Every SQL statement tomd issues lives here.

Functions take a ``Session`` and never commit: the caller owns the
transaction, so everything one alert (or one CSV row) causes commits
together. They return ORM rows or plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, text
from sqlalchemy.orm import Session

from tomd.db.models import (
    OutboxEvent,
    Target,
    TargetList,
    TargetListMember,
    TargetName,
    TargetTag,
)
from tomd.events import Event

# ----------------------------------------------------------------- targets --


def get_target(s: Session, target_id: int) -> Target | None:
    return s.get(Target, target_id)


def target_id_by_norm(s: Session, norms: Sequence[str]) -> dict[str, int]:
    """Map each known normalised name in ``norms`` to its target id."""
    if not norms:
        return {}
    rows = s.execute(select(TargetName.norm, TargetName.target_id).where(TargetName.norm.in_(list(norms))))
    return {norm: tid for norm, tid in rows}


def targets_in_ranges(s: Session, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, float, float]]:
    """(id, ra, dec) of targets whose sky index falls in any half-open range."""
    if not ranges:
        return []
    cond = or_(*(and_(Target.hpx >= lo, Target.hpx < hi) for lo, hi in ranges))
    return [tuple(r) for r in s.execute(select(Target.id, Target.ra, Target.dec).where(cond))]


def insert_target(s: Session, columns: dict[str, Any]) -> Target:
    row = Target(**columns)
    s.add(row)
    s.flush()
    return row


def bulk_insert_targets(s: Session, rows: list[dict[str, Any]], names: list[dict[str, Any]]) -> None:
    """Fast path for benchmarks and large loads: rows must carry their ids."""
    if rows:
        s.execute(insert(Target), rows)
    if names:
        s.execute(insert(TargetName), names)


def max_target_id(s: Session) -> int:
    return s.scalar(select(func.coalesce(func.max(Target.id), 0))) or 0


def add_name(s: Session, target_id: int, name: str, norm: str, *, primary: bool = False,
             source: str | None = None) -> None:
    s.add(TargetName(target_id=target_id, name=name, norm=norm, primary=primary, source=source))
    s.flush()


def names_of(s: Session, target_ids: Iterable[int]) -> dict[int, list[TargetName]]:
    ids = list(target_ids)
    out: dict[int, list[TargetName]] = {i: [] for i in ids}
    if not ids:
        return out
    q = select(TargetName).where(TargetName.target_id.in_(ids)).order_by(
        TargetName.target_id, TargetName.primary.desc(), TargetName.id
    )
    for row in s.scalars(q):
        out[row.target_id].append(row)
    return out


def tags_of(s: Session, target_ids: Iterable[int]) -> dict[int, list[str]]:
    ids = list(target_ids)
    out: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        q = select(TargetTag.target_id, TargetTag.tag).where(TargetTag.target_id.in_(ids)).order_by(TargetTag.tag)
        for tid, tag in s.execute(q):
            out[tid].append(tag)
    return out


def lists_of(s: Session, target_ids: Iterable[int]) -> dict[int, list[str]]:
    ids = list(target_ids)
    out: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        q = (
            select(TargetListMember.target_id, TargetList.name)
            .join(TargetList, TargetList.id == TargetListMember.list_id)
            .where(TargetListMember.target_id.in_(ids))
            .order_by(TargetList.name)
        )
        for tid, name in s.execute(q):
            out[tid].append(name)
    return out


def add_tags(s: Session, target_id: int, tags: Iterable[str]) -> list[str]:
    """Add tags the target lacks; return the ones added."""
    have = set(s.scalars(select(TargetTag.tag).where(TargetTag.target_id == target_id)))
    new = [t for t in dict.fromkeys(tags) if t not in have]
    for t in new:
        s.add(TargetTag(target_id=target_id, tag=t))
    if new:
        s.flush()
    return new


def add_to_lists(s: Session, target_id: int, list_names: Iterable[str]) -> list[str]:
    """Put the target on the named lists (creating lists as needed); return lists joined."""
    added = []
    for name in dict.fromkeys(list_names):
        lst = s.scalar(select(TargetList).where(TargetList.name == name))
        if lst is None:
            lst = TargetList(name=name, description="")
            s.add(lst)
            s.flush()
        member = s.get(TargetListMember, (lst.id, target_id))
        if member is None:
            s.add(TargetListMember(list_id=lst.id, target_id=target_id))
            added.append(name)
    if added:
        s.flush()
    return added


def query_targets(
    s: Session,
    *,
    ids: Sequence[int] | None = None,
    tag: str | None = None,
    list_name: str | None = None,
    limit: int | None = None,
) -> list[Target]:
    q = select(Target)
    if ids is not None:
        q = q.where(Target.id.in_(list(ids)))
    if tag is not None:
        q = q.where(Target.id.in_(select(TargetTag.target_id).where(TargetTag.tag == tag)))
    if list_name is not None:
        q = q.where(
            Target.id.in_(
                select(TargetListMember.target_id)
                .join(TargetList, TargetList.id == TargetListMember.list_id)
                .where(TargetList.name == list_name)
            )
        )
    q = q.order_by(Target.id)
    if limit is not None:
        q = q.limit(limit)
    return list(s.scalars(q))


def count_targets(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(Target)) or 0


def delete_target(s: Session, target_id: int) -> None:
    s.execute(delete(Target).where(Target.id == target_id))


def lock_sky_cells(s: Session, cells: Sequence[int]) -> None:
    """Serialise target creation in the same small sky region across daemons.

    PostgreSQL: transaction-scoped advisory locks on coarse HEALPix cells, in
    sorted order (no deadlocks). Two daemons matching the same new object
    then cannot both create it. SQLite serialises writers already (tomd opens
    its transactions with BEGIN IMMEDIATE).
    """
    if s.get_bind().dialect.name != "postgresql":
        return
    for cell in sorted(set(cells)):
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(cell)})


# ------------------------------------------------------------------ outbox --


def add_event(s: Session, event: Event, *, target_id: int | None = None) -> OutboxEvent:
    row = OutboxEvent(kind=event.kind, version=event.version, payload=event.payload(), target_id=target_id)
    s.add(row)
    return row


def events_since(s: Session, after_id: int = 0, limit: int = 1000) -> list[OutboxEvent]:
    q = select(OutboxEvent).where(OutboxEvent.id > after_id).order_by(OutboxEvent.id).limit(limit)
    return list(s.scalars(q))
