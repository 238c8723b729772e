"""Every SQL statement tomd issues lives here.

Functions take a ``Session`` and never commit: the caller owns the
transaction, so everything one alert (or one CSV row) causes commits
together. They return ORM rows or plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from functools import lru_cache

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, text
from sqlalchemy.orm import Session

from tomd.db.models import (
    AlertRow,
    DeadLetter,
    Notice,
    OutboxEvent,
    Photometry,
    utcnow,
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


# Hot-path statements are built once with bind parameters: building a
# SQLAlchemy expression costs more than running the query on an index.
_NAMES = TargetName.__table__
_BY_NORM = select(_NAMES.c.norm, _NAMES.c.target_id).where(_NAMES.c.norm.in_(bindparam("norms", expanding=True)))


def target_id_by_norm(s: Session, norms: Sequence[str]) -> dict[str, int]:
    """Map each known normalised name in ``norms`` to its target id."""
    if not norms:
        return {}
    rows = s.execute(_BY_NORM, {"norms": list(norms)})
    return {norm: tid for norm, tid in rows}


@lru_cache(maxsize=64)
def _in_ranges(n: int):
    t = Target.__table__
    cond = or_(*(and_(t.c.hpx >= bindparam(f"lo{i}"), t.c.hpx < bindparam(f"hi{i}")) for i in range(n)))
    return select(t.c.id, t.c.ra, t.c.dec).where(cond)


def targets_in_ranges(s: Session, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, float, float]]:
    """(id, ra, dec) of targets whose sky index falls in any half-open range."""
    if not ranges:
        return []
    params = {}
    for i, (lo, hi) in enumerate(ranges):
        params[f"lo{i}"], params[f"hi{i}"] = lo, hi
    return [tuple(r) for r in s.execute(_in_ranges(len(ranges)), params)]


# Core statements on the tables (not the ORM entities): the ORM's bulk
# path costs ~0.5 ms per call, Core ~0.05 ms.
_TARGETS = Target.__table__


def update_target(s: Session, target_id: int, values: dict[str, Any]) -> None:
    s.execute(_TARGETS.update().where(_TARGETS.c.id == target_id).values(modified_at=utcnow(), **values))


_RANGE_CHUNK = 128


def targets_in_range_set(s: Session, ranges: Sequence[tuple[int, int]]) -> dict[int, tuple[float, float]]:
    """Targets in any of many ranges, {id: (ra, dec)}, in few fixed-shape statements.

    Ranges go 128 at a time; a shorter rest is padded with empty ranges to
    the next power of two, so eight prepared statement shapes serve every
    batch size without making a one-object lookup probe 128 ranges.
    """
    out: dict[int, tuple[float, float]] = {}
    merged = sorted(set(ranges))
    for lo in range(0, len(merged), _RANGE_CHUNK):
        chunk = merged[lo:lo + _RANGE_CHUNK]
        size = 1 << (len(chunk) - 1).bit_length()
        chunk += [(0, 0)] * (size - len(chunk))
        params = {}
        for i, (a, b) in enumerate(chunk):
            params[f"lo{i}"], params[f"hi{i}"] = a, b
        for tid, ra, dec in s.execute(_in_ranges(size), params):
            out[tid] = (ra, dec)
    return out


def target_rows(s: Session, ids: Sequence[int]) -> dict[int, Any]:
    """{id: row mapping} for the given targets."""
    if not ids:
        return {}
    q = select(_TARGETS).where(_TARGETS.c.id.in_(bindparam("ids", expanding=True)))
    return {r["id"]: r for r in s.execute(q, {"ids": list(ids)}).mappings()}


_INSERT_TARGETS = _TARGETS.insert().returning(_TARGETS.c.id, sort_by_parameter_order=True)


def insert_targets(s: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Insert target rows (same keys in each); returns their ids in order."""
    if not rows:
        return []
    now = utcnow()
    params = [{"created_at": now, "modified_at": now, **r} for r in rows]
    return _insert_many(s, _TARGETS, _INSERT_TARGETS, params)


def _insert_many(s: Session, table, returning_stmt, rows: list[dict[str, Any]]) -> list[int]:
    """Multi-row insert that returns the new ids in order.

    PostgreSQL: ids are drawn from the sequence first, then the rows go as a
    pipelined executemany of one prepared statement; a multi-row
    INSERT … RETURNING of large rows (alert payloads) costs several times
    more there, mostly in building and parsing one huge statement.
    """
    if s.get_bind().dialect.name != "postgresql":
        return list(s.execute(returning_stmt, rows).scalars())
    ids = list(s.scalars(
        text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"),
        {"t": table.name, "n": len(rows)},
    ))
    s.execute(table.insert(), [{**r, "id": i} for r, i in zip(rows, ids)])
    return ids


def bulk_insert_targets(s: Session, rows: list[dict[str, Any]], names: list[dict[str, Any]]) -> None:
    """Fast path for benchmarks and large loads: rows must carry their ids."""
    if rows:
        s.execute(insert(Target), rows)
    if names:
        s.execute(insert(TargetName), names)


def max_target_id(s: Session) -> int:
    return s.scalar(select(func.coalesce(func.max(Target.id), 0))) or 0


def add_names(s: Session, rows: list[dict[str, Any]]) -> None:
    """Insert name rows (target_id, name, norm, primary, source)."""
    if rows:
        s.execute(TargetName.__table__.insert(), rows)


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
    tags = list(tags)
    if not tags:
        return []
    have = set(s.scalars(select(TargetTag.tag).where(TargetTag.target_id == target_id)))
    new = [t for t in dict.fromkeys(tags) if t not in have]
    for t in new:
        s.add(TargetTag(target_id=target_id, tag=t))
    if new:
        s.flush()
    return new


def add_to_lists(s: Session, target_id: int, list_names: Iterable[str]) -> list[str]:
    """Put the target on the named lists (creating lists as needed); return lists joined."""
    added: list[str] = []
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
    if s.get_bind().dialect.name != "postgresql" or not cells:
        return
    # One statement for the whole batch; unnest keeps the array's (sorted) order.
    s.execute(text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k"),
              {"keys": sorted({int(c) for c in cells})})


# ------------------------------------------------------------------ alerts --


def _insert_ignore(s: Session, table):
    """INSERT … ON CONFLICT DO NOTHING for the session's database."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(table).on_conflict_do_nothing()


_ALERTS = AlertRow.__table__


_KEYS_ANY = text("SELECT key FROM alerts WHERE source = :source AND key = ANY(CAST(:keys AS text[]))")


def existing_alert_keys(s: Session, source: str, keys: Sequence[str]) -> set[str]:
    if not keys:
        return set()
    if _is_postgresql(s):  # one fixed statement, planned for its keys (_planned_for_values)
        return {k for (k,) in _planned_for_values(s, _KEYS_ANY, {"source": source, "keys": list(keys)})}
    q = select(_ALERTS.c.key).where(_ALERTS.c.source == source, _ALERTS.c.key.in_(list(keys)))
    return set(s.scalars(q))


_INSERT_ALERTS = _ALERTS.insert().returning(_ALERTS.c.id, sort_by_parameter_order=True)


def insert_alerts(s: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Insert alert rows (same keys in each); returns their ids in order."""
    if not rows:
        return []
    now = utcnow()
    return _insert_many(s, _ALERTS, _INSERT_ALERTS, [{"ingested_at": now, **r} for r in rows])


def insert_photometry(s: Session, rows: list[dict[str, Any]]) -> None:
    """Insert points; a point already stored for the target (same dedupe key) is skipped."""
    if rows:
        s.execute(_insert_ignore(s, Photometry.__table__), rows)


def photometry_of(s: Session, target_id: int) -> list[Photometry]:
    q = select(Photometry).where(Photometry.target_id == target_id).order_by(Photometry.mjd, Photometry.id)
    return list(s.scalars(q))


def alerts_of(s: Session, target_id: int) -> list[AlertRow]:
    return list(s.scalars(select(AlertRow).where(AlertRow.target_id == target_id).order_by(AlertRow.time)))


def count_rows(s: Session, model) -> int:
    return s.scalar(select(func.count()).select_from(model)) or 0


def get_notice(s: Session, source: str, event_id: str) -> Notice | None:
    return s.scalar(select(Notice).where(Notice.source == source, Notice.event_id == event_id))


def save_notice(s: Session, values: dict[str, Any], *, refine: bool = True) -> Notice:
    """Create or update the notice for (source, event_id); later notices refine earlier ones.

    ``refine=False`` is for a notice issued before the one already applied (it
    arrived late): it must not overwrite the better position, so it only fills
    what the stored notice lacks, and a retraction still marks it retracted.
    """
    row = get_notice(s, values["source"], values["event_id"])
    if row is None:
        row = Notice(**values)
        s.add(row)
    else:
        for k, v in values.items():
            if v is not None and (refine or getattr(row, k) is None or (k == "retracted" and v)):
                setattr(row, k, v)
    s.flush()
    return row


def add_dead_letter(s: Session, values: dict[str, Any]) -> int | None:
    """Insert a letter; None when the stream already holds one with this ``fingerprint``
    (the same message delivered again: a replay, a redelivery after a crash)."""
    return s.execute(
        _insert_ignore(s, DeadLetter.__table__).returning(DeadLetter.__table__.c.id),
        {"created_at": utcnow(), **values},
    ).scalar_one_or_none()


def dead_letters(s: Session, *, unresolved_only: bool = True, limit: int | None = None) -> list[DeadLetter]:
    q = select(DeadLetter).order_by(DeadLetter.id)
    if unresolved_only:
        q = q.where(DeadLetter.resolved_at.is_(None))
    if limit:
        q = q.limit(limit)
    return list(s.scalars(q))


# ------------------------------------------------------------------ outbox --


def add_events(s: Session, events: Sequence[tuple[Event, int | None]]) -> None:
    """Write (event, target_id) pairs to the outbox in one statement."""
    if events:
        now = utcnow()
        s.execute(OutboxEvent.__table__.insert(), [
            {"kind": e.kind, "version": e.version, "payload": e.payload(), "target_id": tid, "created_at": now}
            for e, tid in events
        ])


def add_event(s: Session, event: Event, *, target_id: int | None = None) -> None:
    """Write ``event`` to the outbox in the caller's transaction."""
    s.execute(OutboxEvent.__table__.insert(), [{"kind": event.kind, "version": event.version, "payload": event.payload(),
                                     "target_id": target_id, "created_at": utcnow()}])


# ----------------------------------------------------------- data products --

from tomd.db.models import DataProduct  # noqa: E402  (section appended; keeps the imports above untouched)


def get_data_product(s: Session, facility: str, product_id: str) -> DataProduct | None:
    return s.scalar(select(DataProduct).where(DataProduct.facility == facility,
                                              DataProduct.product_id == product_id))


def add_data_product(s: Session, values: dict[str, Any]) -> tuple[DataProduct, bool]:
    """Insert the product unless (facility, product_id) exists; returns (row, created).

    Two writers storing the same product at once: one insert wins, the other
    gets the winner's row (ON CONFLICT DO NOTHING, then a read).
    """
    now = utcnow()
    res = s.execute(_insert_ignore(s, DataProduct.__table__).returning(DataProduct.__table__.c.id),
                    [{"created_at": now, "meta": {}, **values}])
    new_id = res.scalar_one_or_none()
    if new_id is not None:
        return s.get(DataProduct, new_id), True
    return get_data_product(s, values["facility"], values["product_id"]), False


def data_products(s: Session, *, target_id: int | None = None, notice_id: int | None = None,
                  request_id: int | None = None, facility: str | None = None, kind: str | None = None,
                  state: str | None = None, limit: int | None = None) -> list[DataProduct]:
    """Data products in id order, filtered by whichever of the arguments are given."""
    q = select(DataProduct).order_by(DataProduct.id)
    for column, value in ((DataProduct.target_id, target_id), (DataProduct.notice_id, notice_id),
                          (DataProduct.request_id, request_id), (DataProduct.facility, facility),
                          (DataProduct.kind, kind), (DataProduct.state, state)):
        if value is not None:
            q = q.where(column == value)
    if limit:
        q = q.limit(limit)
    return list(s.scalars(q))


def existing_photometry_keys(s: Session, target_id: int, keys: Sequence[str]) -> set[str]:
    """The dedupe keys among ``keys`` already stored for the target."""
    if not keys:
        return set()
    q = select(Photometry.dedupe).where(Photometry.target_id == target_id,
                                        Photometry.dedupe.in_(bindparam("keys", expanding=True)))
    return set(s.scalars(q, {"keys": list(keys)}))


# ---- observations ----
# Submission intents and requests (tomd.submit, tomd.facilities.cli).

from datetime import datetime  # noqa: E402

from tomd.db.models import ObservationRequest, ObservationStatus  # noqa: E402

_OBS = ObservationRequest.__table__


def add_observation_intent(s: Session, values: dict[str, Any]) -> int:
    """Insert an intent (state "intent" unless given); returns its id."""
    now = utcnow()
    row = {"state": "intent", "request": {}, "attempts": 0, "created_at": now, "updated_at": now, **values}
    return s.execute(_OBS.insert().returning(_OBS.c.id), row).scalar_one()


def get_observation(s: Session, request_id: int) -> ObservationRequest | None:
    return s.get(ObservationRequest, request_id)


def observation_by_name(s: Session, name: str) -> ObservationRequest | None:
    return s.scalar(select(ObservationRequest).where(ObservationRequest.name == name))


def claim_observation_intents(s: Session, worker: str, *, now: datetime, lease_until: datetime, limit: int,
                              ids: Sequence[int] | None = None,
                              facilities: Sequence[str] | None = None) -> list[ObservationRequest]:
    """Claim due intents for ``worker`` until ``lease_until``.

    Due: state "intent" or "submitting" (an earlier attempt's outcome is
    unknown), next attempt time reached, no live claim. PostgreSQL skips
    rows another worker has locked (``FOR UPDATE SKIP LOCKED``); SQLite's
    ``BEGIN IMMEDIATE`` serialises claimers. The caller commits at once and
    does the network calls outside the transaction.
    """
    R = ObservationRequest
    q = select(R).where(
        R.state.in_(("intent", "submitting")),
        or_(R.next_attempt_at.is_(None), R.next_attempt_at <= now),
        or_(R.claimed_until.is_(None), R.claimed_until < now),
    )
    if ids is not None:
        q = q.where(R.id.in_(list(ids)))
    if facilities is not None:
        q = q.where(R.facility.in_(list(facilities)))
    q = q.order_by(R.id).limit(limit).with_for_update(skip_locked=True)
    rows = list(s.scalars(q))
    if rows:
        s.execute(_OBS.update().where(_OBS.c.id.in_([r.id for r in rows]))
                  .values(claimed_by=worker, claimed_until=lease_until, updated_at=now))
        for r in rows:
            r.claimed_by, r.claimed_until = worker, lease_until
    return rows


def update_observation(s: Session, request_id: int, values: dict[str, Any], *, worker: str | None = None) -> bool:
    """Update one request; with ``worker``, only while that worker holds the claim (fencing)."""
    q = _OBS.update().where(_OBS.c.id == request_id)
    if worker is not None:
        q = q.where(_OBS.c.claimed_by == worker)
    return s.execute(q.values(updated_at=utcnow(), **values)).rowcount == 1


def add_observation_status(s: Session, request_id: int, state: str, facility_state: str | None = None,
                           message: str = "") -> None:
    s.execute(ObservationStatus.__table__.insert(), [{"request_id": request_id, "time": utcnow(), "state": state,
                                                      "facility_state": facility_state, "message": message}])


def observation_history(s: Session, request_id: int) -> list[ObservationStatus]:
    q = select(ObservationStatus).where(ObservationStatus.request_id == request_id).order_by(
        ObservationStatus.time, ObservationStatus.id)
    return list(s.scalars(q))


def query_observations(s: Session, *, state: str | None = None, facility: str | None = None,
                       target_id: int | None = None, limit: int | None = None) -> list[ObservationRequest]:
    q = select(ObservationRequest)
    if state is not None:
        q = q.where(ObservationRequest.state == state)
    if facility is not None:
        q = q.where(ObservationRequest.facility == facility)
    if target_id is not None:
        q = q.where(ObservationRequest.target_id == target_id)
    q = q.order_by(ObservationRequest.id.desc())
    if limit is not None:
        q = q.limit(limit)
    return list(s.scalars(q))


def decision_template_fields(s: Session, decision_id: int | None) -> dict[str, Any] | None:
    """The inline template a rule stored with its decision (``details.observe.template_fields``)."""
    if decision_id is None:
        return None
    from tomd.db.models import Decision

    row = s.get(Decision, decision_id)
    observe = (row.details or {}).get("observe") if row is not None else None
    fields = observe.get("template_fields") if isinstance(observe, dict) else None
    return dict(fields) if isinstance(fields, dict) else None


def next_observation_attempt(s: Session, ids: Sequence[int] | None = None) -> datetime | None:
    """When the earliest waiting intent becomes due, claims included (None: none waits)."""
    from sqlalchemy import case

    R = ObservationRequest
    due = func.coalesce(R.next_attempt_at, R.created_at)
    when = case((R.claimed_until > due, R.claimed_until), else_=due)
    q = select(func.min(when)).where(R.state.in_(("intent", "submitting")))
    if ids is not None:
        q = q.where(R.id.in_(list(ids)))
    return s.scalar(q)


# ---- rules ----
# Used by tomd.rules.engine: decisions, limits, duplicate requests, intents.

from tomd.db.models import Decision, ObservationRequest  # noqa: E402

_DECISIONS = Decision.__table__
_REQUESTS = ObservationRequest.__table__
#: Requests still waiting to be observed: a new equivalent one would be a duplicate.
PENDING_STATES = ("intent", "submitting", "pending", "scheduled")
_PHOT = Photometry.__table__
_PHOT_FOR_RULES = select(_PHOT.c.target_id, _PHOT.c.mjd, _PHOT.c.band, _PHOT.c.kind, _PHOT.c.mag,
                         _PHOT.c.limit).where(_PHOT.c.target_id.in_(bindparam("ids", expanding=True)))


def photometry_for_rules(s: Session, target_ids: Sequence[int]) -> dict[int, list[tuple]]:
    """{target id: [(mjd, band, kind, mag, limit), ...]} for many targets in one query."""
    out: dict[int, list[tuple]] = {t: [] for t in target_ids}
    if target_ids:
        for tid, mjd, band, kind, mag, limit in s.execute(_PHOT_FOR_RULES, {"ids": list(target_ids)}):
            out[tid].append((mjd, band, kind, mag, limit))
    return out


def insert_decision(s: Session, row: dict[str, Any]) -> int:
    return s.execute(_DECISIONS.insert().returning(_DECISIONS.c.id), [row]).scalar_one()


_DECISION_COLUMNS = ("alert_id", "target_id", "rule", "rule_version", "outcome", "created_at", "reason", "details")
#: The order of a decision row as :func:`insert_decisions` takes it (a tuple: the rule engine makes
#: one per rule and alert, and a tuple costs a fraction of a dict).
DECISION_COLUMNS = _DECISION_COLUMNS


def insert_decisions(s: Session, rows: Sequence[Sequence[Any] | Mapping[str, Any]]) -> None:
    """Every verdict of a batch (rules × alerts rows): tuples in ``DECISION_COLUMNS`` order (dicts work too).

    An alert's not-fired verdicts go to one ``alert_verdicts`` row (``_keep_not_fired_apart``);
    the others to a ``decisions`` row each.

    ``details`` is a dict; or, in a not-fired verdict's compact row, the tuple of the texts its
    clause read, their values following the row's eight columns after the clause and its line:
    ``(…, reason, texts, clause, line, *values)``, stored as ``{"clause": …, "values": {text:
    value…}, "line": …}`` (:func:`decision_details`). A flat tuple of plain values leaves the
    garbage collector's watch at its first pass, so a batch's rows never reach its oldest
    generation, whose full collections they set off (see tomd.rules.engine.Verdicts).

    PostgreSQL: COPY in the session's transaction, about ten times cheaper
    than an executemany for the tens of thousands of rows a batch can carry.
    An alert's rows share one ``created_at`` object, converted once. (COPY text
    made here instead of psycopg's ``write_row`` measured 1.5× slower, server included;
    binary COPY, as ``_copy`` writes, is cheaper than either.)
    """
    from collections.abc import Mapping

    if not rows:
        return
    if isinstance(rows[0], Mapping):
        rows = [tuple(r.get(c, "" if c in ("rule_version", "reason") else None) for c in _DECISION_COLUMNS)
                for r in rows]
    rows = _keep_not_fired_apart(s, rows)
    if not rows:
        return
    if s.get_bind().dialect.name != "postgresql":
        s.execute(_DECISIONS.insert(), [{**dict(zip(_DECISION_COLUMNS, r)), "details": decision_details(r)}
                                        for r in rows])
        return
    import orjson

    from datetime import timezone

    import psycopg
    from sqlalchemy.exc import DBAPIError

    dumps, opt = orjson.dumps, orjson.OPT_NON_STR_KEYS
    last = stamp = None
    raw = s.connection().connection.driver_connection  # psycopg, inside this transaction
    sql = f"COPY decisions ({', '.join(_DECISION_COLUMNS)}) FROM STDIN (FORMAT BINARY)"  # see _copy
    try:
        with raw.cursor() as cur, cur.copy(sql) as copy:
            copy.set_types(_copy_types("decisions", tuple(_DECISION_COLUMNS)))
            write = copy.write_row
            for r in rows:
                created, details = r[5], decision_details(r)
                if created is not last:
                    stamp = created.astimezone(timezone.utc).replace(tzinfo=None)  # as UTCDateTime stores it
                    last = created
                reason = r[6] or ""
                if "\x00" in reason:  # an error's text can quote an alert's value; text columns refuse NUL
                    reason = reason.replace("\x00", "\\x00")
                write((r[0], r[1], r[2], r[3] or "", r[4], stamp, reason, dumps(details or {}, option=opt)))
    except psycopg.Error as exc:
        # As SQLAlchemy would raise it: the ingest retries an outage (OperationalError) and finds a
        # refused row (DataError) one by one, instead of stopping the stream on a driver error.
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc


def _keep_not_fired_apart(s: Session, rows: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    """Write each alert's not-fired verdicts as one ``alert_verdicts`` row; the other rows, returned, go to
    ``decisions``. An alert's verdicts come in one call (the rule engine's batch), in rule order: kept so.

    Each verdict is ``[rule, rule_version, reason, details]``, or, from the engine's compact row,
    ``[rule, rule_version, reason, clause, line, texts, values]`` (``_verdict_details`` reads both)."""
    from tomd.db.migrate import json_bytes

    kept: list[Sequence[Any]] = []
    by_alert: dict[int, list[Any]] = {}
    head: dict[int, tuple[Any, Any]] = {}
    for r in rows:
        if r[4] != "not_fired" or r[0] is None:
            kept.append(r)
            continue
        entries = by_alert.get(r[0])
        if entries is None:
            entries = by_alert[r[0]] = []
            head[r[0]] = (r[1], r[5])
        d = r[7]
        if type(d) is tuple:  # the engine's compact row: no dict made (a batch holds rules × alerts of them)
            entries.append((r[2], r[3] or "", r[6] or "", r[8], r[9], d, r[10:]))
        else:
            entries.append((r[2], r[3] or "", r[6] or "", d or {}))
    if not by_alert:
        return kept
    if _is_postgresql(s):
        _copy(s, _alert_verdicts(), ("alert_id", "target_id", "created_at", "verdicts"), (
            (alert_id, head[alert_id][0], _copy_time(head[alert_id][1] or utcnow()), json_bytes(entries))
            for alert_id, entries in by_alert.items()))
    else:
        s.execute(_alert_verdicts().insert(), [
            {"alert_id": alert_id, "target_id": head[alert_id][0], "created_at": head[alert_id][1] or utcnow(),
             "verdicts": [list(e) for e in entries]} for alert_id, entries in by_alert.items()])
    return kept


def _alert_verdicts():
    from tomd.db.models import AlertVerdicts

    return AlertVerdicts.__table__


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """One rule verdict for an alert, from whichever table keeps it."""

    id: int | None  # the decisions row's; None for a not-fired verdict (alert_verdicts)
    alert_id: int | None
    target_id: int | None
    rule: str
    rule_version: str
    outcome: str
    reason: str
    details: dict[str, Any]
    created_at: Any


def _verdict_rows(s: Session, alert_id: int | None = None) -> list[VerdictRow]:
    d, v = _DECISIONS, _alert_verdicts()
    qd = select(d.c.id, d.c.alert_id, d.c.target_id, d.c.rule, d.c.rule_version, d.c.outcome, d.c.reason,
                d.c.details, d.c.created_at)
    qv = select(v.c.alert_id, v.c.target_id, v.c.verdicts, v.c.created_at)
    if alert_id is not None:
        qd, qv = qd.where(d.c.alert_id == alert_id), qv.where(v.c.alert_id == alert_id)
    out = [VerdictRow(r.id, r.alert_id, r.target_id, r.rule, r.rule_version or "", r.outcome, r.reason or "",
                      r.details or {}, _aware(r.created_at)) for r in s.execute(qd)]
    for r in s.execute(qv):
        at = _aware(r.created_at)
        out.extend(VerdictRow(None, r.alert_id, r.target_id, e[0], e[1], "not_fired", e[2], _verdict_details(e), at)
                   for e in r.verdicts or ())
    return out


def _verdict_details(entry: Sequence[Any]) -> dict[str, Any]:
    """An alert_verdicts entry's details: its dict, or the compact entry's made one."""
    if len(entry) == 7:
        return _clause_details(entry[3], entry[4], entry[5], entry[6])
    return entry[3] or {}


def _clause_details(clause: Any, line: Any, texts: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    """A not-fired verdict's details from the engine's compact form: the clause, its line, the values it read."""
    return {"clause": clause, "values": dict(zip(texts, values)), "line": line}


def _aware(t):
    from datetime import timezone

    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def all_verdicts(s: Session) -> list[VerdictRow]:
    """Every verdict stored, oldest first (then by alert and rule): backtests read them all."""
    return sorted(_verdict_rows(s), key=lambda r: (r.created_at, r.alert_id or 0, r.rule, r.id or 0))


def verdict_counts(s: Session) -> dict[tuple[str, str], int]:
    """{(rule, outcome): verdicts} over both tables (the not-fired lists read, not made rows)."""
    from collections import Counter

    d = _DECISIONS
    counts = Counter({(rule, outcome): n for rule, outcome, n in s.execute(
        select(d.c.rule, d.c.outcome, func.count()).group_by(d.c.rule, d.c.outcome))})
    counts.update((e[0], "not_fired") for (verdicts,) in s.execute(select(_alert_verdicts().c.verdicts))
                  for e in verdicts or ())
    return dict(counts)


def decision_details(row: Sequence[Any]) -> dict[str, Any]:
    """A decision row's details as stored: its dict, or the compact not-fired row's made one."""
    d = row[7]
    if type(d) is tuple:
        return _clause_details(row[8], row[9], d, row[10:])
    return d or {}


def _decision_filter(q, rule: str, outcome: str, target_id: int | None, reason_prefix: str | None):
    q = q.where(_DECISIONS.c.rule == rule, _DECISIONS.c.outcome == outcome)
    if target_id is not None:
        q = q.where(_DECISIONS.c.target_id == target_id)
    if reason_prefix is not None:
        q = q.where(_DECISIONS.c.reason.like(reason_prefix + "%"))
    return q


def latest_decision_time(s: Session, rule: str, outcome: str, *, target_id: int | None = None,
                         reason_prefix: str | None = None):
    q = _decision_filter(select(func.max(_DECISIONS.c.created_at)), rule, outcome, target_id, reason_prefix)
    v = s.scalar(q)
    if v is not None and v.tzinfo is None:  # Core + max(): no type processing on some dialects
        from datetime import timezone

        v = v.replace(tzinfo=timezone.utc)
    return v


def lock_target_requests(s: Session, target_id: int) -> None:
    """Serialise 'is there already a request for this target?' across daemons (PostgreSQL).

    Two-key advisory locks live in a key space apart from the one-key sky-cell locks.
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(7411, CAST(:k AS integer))"), {"k": int(target_id) % 2**31})


def pending_request_like(s: Session, target_id: int, facility: str, template: str | None):
    """The pending request for the same target, facility and template (highest priority first), or None."""
    q = select(ObservationRequest).where(
        ObservationRequest.target_id == target_id, ObservationRequest.facility == facility,
        ObservationRequest.template == template, ObservationRequest.state.in_(PENDING_STATES),
    ).order_by(ObservationRequest.priority.desc(), ObservationRequest.id).limit(1)
    return s.scalar(q)


def insert_request(s: Session, row: dict[str, Any]) -> int:
    return s.execute(_REQUESTS.insert().returning(_REQUESTS.c.id), [row]).scalar_one()


def set_request_priority(s: Session, request_id: int, priority: float) -> None:
    s.execute(_REQUESTS.update().where(_REQUESTS.c.id == request_id).values(priority=priority, updated_at=utcnow()))


def decisions_of_alert(s: Session, alert_id: int) -> list[VerdictRow]:
    """Every verdict for the alert, by rule: its decision rows and its not-fired verdicts (alert_verdicts)."""
    return sorted(_verdict_rows(s, alert_id), key=lambda r: (r.rule, r.id or 0))


def request_of_decision(s: Session, decision_id: int) -> ObservationRequest | None:
    return s.scalar(select(ObservationRequest).where(ObservationRequest.decision_id == decision_id))


def get_alert(s: Session, alert_id: int) -> AlertRow | None:
    return s.get(AlertRow, alert_id)


def alerts_since(s: Session, since, *, limit: int | None = None) -> list[AlertRow]:
    q = select(AlertRow).where(AlertRow.time >= since).order_by(AlertRow.time, AlertRow.id)
    if limit:
        q = q.limit(limit)
    return list(s.scalars(q))


def photometry_of_alert(s: Session, alert_id: int) -> list[Photometry]:
    return list(s.scalars(select(Photometry).where(Photometry.alert_id == alert_id).order_by(Photometry.mjd)))


_NAMES_FOR_RULES = select(_NAMES.c.target_id, _NAMES.c.name).where(
    _NAMES.c.target_id.in_(bindparam("ids", expanding=True))).order_by(_NAMES.c.target_id, _NAMES.c.primary.desc(),
                                                                     _NAMES.c.id)


def names_for_rules(s: Session, target_ids: Sequence[int]) -> dict[int, list[str]]:
    """{target id: [primary name, aliases...]} in one Core query (the ORM costs more on the ingest path)."""
    out: dict[int, list[str]] = {t: [] for t in target_ids}
    if target_ids:
        for tid, name in s.execute(_NAMES_FOR_RULES, {"ids": list(target_ids)}):
            out[tid].append(name)
    return out


def update_data_product(s: Session, product_row_id: int, values: dict[str, Any]) -> None:
    """Change a product's state/size/md5/key (a failed download retried, a pending one stored)."""
    s.execute(DataProduct.__table__.update().where(DataProduct.__table__.c.id == product_row_id).values(**values))


def _rule_context_statements():
    """PostgreSQL statements of :func:`rule_context_rows`: the batch's target ids as one array (``= ANY``)."""
    from sqlalchemy import BigInteger, any_
    from sqlalchemy.dialects.postgresql import ARRAY

    ids = bindparam("ids", type_=ARRAY(BigInteger))
    lists = (select(TargetListMember.target_id, TargetList.name, TargetListMember.added_at)
             .join(TargetList, TargetList.id == TargetListMember.list_id)
             .where(TargetListMember.target_id == any_(ids)).order_by(TargetList.name))
    return {
        "targets": select(*_rule_target_columns()).where(_TARGETS.c.id == any_(ids)),
        "names": select(_NAMES.c.target_id, _NAMES.c.name).where(_NAMES.c.target_id == any_(ids)).order_by(
            _NAMES.c.target_id, _NAMES.c.primary.desc(), _NAMES.c.id),
        "tags": select(TargetTag.target_id, TargetTag.tag, TargetTag.added_at).where(
            TargetTag.target_id == any_(ids)).order_by(TargetTag.tag),
        "lists": lists,
    }


_RULE_CONTEXT: dict[str, Any] = {}


def rule_context_rows(s: Session, target_ids: Sequence[int], *,
                      timed: bool = False) -> tuple[dict, dict, dict, dict, dict]:
    """What the rule engine reads of a batch's targets, as (rows, names, tags, lists, photometry):
    :func:`target_rows`, :func:`names_for_rules`, :func:`tags_of` and :func:`lists_of` (with
    ``timed``, :func:`tag_times` and :func:`list_times`: ``(name, added_at)`` pairs) and
    :func:`photometry_for_rules`.

    PostgreSQL: each is one statement taking the ids as one array (``= ANY(:ids)``), the same SQL
    for every batch, so SQLAlchemy renders it once and psycopg prepares it once; ``IN (:ids)`` is
    rendered anew for each batch's length, 500 parameters at a time.
    """
    ids = list(target_ids)
    if not ids or s.get_bind().dialect.name != "postgresql":
        tags, lists = (tag_times(s, ids), list_times(s, ids)) if timed else (tags_of(s, ids), lists_of(s, ids))
        return target_rows_for_rules(s, ids), names_for_rules(s, ids), tags, lists, photometry_for_rules(s, ids)
    if not _RULE_CONTEXT:  # built on first use: the PostgreSQL dialect's types load only then
        _RULE_CONTEXT.update(_rule_context_statements())
    q = _RULE_CONTEXT
    p = {"ids": ids}
    rows = {r["id"]: r for r in s.execute(q["targets"], p).mappings()}
    names: dict[int, list[str]] = {t: [] for t in ids}
    for tid, name in s.execute(q["names"], p):
        names[tid].append(name)
    tags: dict[int, list] = {t: [] for t in ids}
    for tid, tag, at in s.execute(q["tags"], p):
        tags[tid].append((tag, at) if timed else tag)
    lists: dict[int, list] = {t: [] for t in ids}
    for tid, name, at in s.execute(q["lists"], p):
        lists[tid].append((name, at) if timed else name)
    # The photometry, thousands of rows of plain numbers and words, straight from psycopg: SQLAlchemy's
    # row processing cost 2/3 of this statement's time, and no column here needs a type of its own.
    phot: dict[int, list[tuple]] = {t: [] for t in ids}
    raw = s.connection().connection.driver_connection  # psycopg, inside this transaction
    with raw.cursor() as cur:
        cur.execute('SELECT target_id, mjd, band, kind, mag, "limit" FROM photometry WHERE target_id = ANY(%s)',
                    [ids])
        for r in cur.fetchall():
            phot[r[0]].append(r[1:])
    return rows, names, tags, lists, phot



# ---- notifications ----
# The durable notification queue (tomd.notify): enqueue is idempotent per
# (channel, dedupe_key); senders claim rows like the submitter claims intents.

from sqlalchemy import case  # noqa: E402

from tomd.db.models import Notification  # noqa: E402

_NOTIFS = Notification.__table__


def enqueue_notification(s: Session, row: dict[str, Any]) -> bool:
    """Queue one notification; False if (channel, dedupe_key) is already queued (any state)."""
    now = utcnow()
    values = {"state": "pending", "attempts": 0, "created_at": now, "next_attempt_at": None, **row}
    res = s.execute(_insert_ignore(s, _NOTIFS).returning(_NOTIFS.c.id), [values])
    return res.scalar_one_or_none() is not None

def lock_notification_channel(s: Session, channel: str) -> None:
    """Serialise claims on one channel across daemons (PostgreSQL), so that its rate
    limit and digest interval, counted from this table, hold however many notifiers run.
    SQLite serialises writers already (BEGIN IMMEDIATE)."""
    if s.get_bind().dialect.name == "postgresql":
        import zlib

        s.execute(text("SELECT pg_advisory_xact_lock(7412, CAST(:k AS integer))"),
                  {"k": zlib.crc32(channel.encode()) % 2**31})


def notification_channel_stats(s: Session, channel: str, *, since: datetime, now: datetime) -> dict[str, Any]:
    """What a channel has sent and is sending: rows and distinct send times (a digest's rows
    share one) sent since ``since``, rows claimed with a live lease, and the last send time."""
    n = _NOTIFS.c
    sent_recently = and_(n.state == "sent", n.sent_at >= since)
    in_flight = and_(n.state == "pending", n.claimed_by.is_not(None), n.claimed_until > now)
    row = s.execute(select(
        func.count(case((sent_recently, 1))),
        func.count(func.distinct(case((sent_recently, n.sent_at)))),
        func.count(case((in_flight, 1))),
        func.max(case((n.state == "sent", n.sent_at))),
    ).where(n.channel == channel)).one()
    return {"sent_rows": int(row[0] or 0), "sent_batches": int(row[1] or 0), "in_flight": int(row[2] or 0),
            "last_sent_at": row[3]}


def _due_notifications(now: datetime):
    n = _NOTIFS.c
    return and_(n.state == "pending", or_(n.next_attempt_at.is_(None), n.next_attempt_at <= now),
                or_(n.claimed_until.is_(None), n.claimed_until < now))


def due_notification_channels(s: Session, now: datetime) -> list[str]:
    """Channels with at least one pending notification due now and not claimed."""
    return list(s.scalars(select(_NOTIFS.c.channel).where(_due_notifications(now)).distinct()
                          .order_by(_NOTIFS.c.channel)))


def claim_notifications(s: Session, worker: str, *, channel: str, now: datetime, lease_until: datetime,
                        limit: int) -> list[Notification]:
    """Claim up to ``limit`` due notifications of ``channel`` (oldest first) for ``worker``.

    ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; the caller commits at once and
    sends outside the transaction, every later write fenced on ``claimed_by``.
    """
    if limit <= 0:
        return []
    N = Notification
    q = (select(N).where(N.channel == channel, _due_notifications(now)).order_by(N.id).limit(limit)
         .with_for_update(skip_locked=True))
    rows = list(s.scalars(q))
    if rows:
        s.execute(_NOTIFS.update().where(_NOTIFS.c.id.in_([r.id for r in rows]))
                  .values(claimed_by=worker, claimed_until=lease_until))
        for r in rows:
            r.claimed_by, r.claimed_until = worker, lease_until
    return rows


def mark_notifications_sent(s: Session, ids: Sequence[int], *, worker: str, sent_at: datetime) -> int:
    """Sent (fenced on the claim): returns how many rows this worker still held."""
    if not ids:
        return 0
    n = _NOTIFS.c
    return s.execute(_NOTIFS.update().where(n.id.in_(list(ids)), n.claimed_by == worker).values(
        state="sent", sent_at=sent_at, attempts=n.attempts + 1, error=None, claimed_by=None,
        claimed_until=None, next_attempt_at=None)).rowcount


def release_notifications(s: Session, ids: Sequence[int], *, worker: str, error: str,
                          next_attempt_at: datetime | None, max_attempts: int, final: bool = False) -> int:
    """A failed attempt: back to pending until ``next_attempt_at``, or failed once
    ``max_attempts`` attempts are spent (or at once with ``final``). Fenced on the claim."""
    if not ids:
        return 0
    n = _NOTIFS.c
    state = "failed" if final else case((n.attempts + 1 >= max_attempts, "failed"), else_="pending")
    return s.execute(_NOTIFS.update().where(n.id.in_(list(ids)), n.claimed_by == worker).values(
        state=state, attempts=n.attempts + 1, error=error[:4000], next_attempt_at=next_attempt_at,
        claimed_by=None, claimed_until=None)).rowcount


def notification_states(s: Session, ids: Sequence[int]) -> dict[int, str]:
    if not ids:
        return {}
    return {i: st for i, st in s.execute(select(_NOTIFS.c.id, _NOTIFS.c.state).where(_NOTIFS.c.id.in_(list(ids))))}


def query_notifications(s: Session, *, state: str | None = None, channel: str | None = None,
                        limit: int | None = None) -> list[Notification]:
    """Newest first."""
    q = select(Notification).order_by(Notification.id.desc())
    if state is not None:
        q = q.where(Notification.state == state)
    if channel is not None:
        q = q.where(Notification.channel == channel)
    if limit:
        q = q.limit(limit)
    return list(s.scalars(q))


def requeue_notifications(s: Session, ids: Sequence[int]) -> int:
    """Failed notifications back to pending with fresh attempts (``tomd notify retry``)."""
    if not ids:
        return 0
    n = _NOTIFS.c
    return s.execute(_NOTIFS.update().where(n.id.in_(list(ids)), n.state == "failed").values(
        state="pending", attempts=0, next_attempt_at=None, claimed_by=None, claimed_until=None)).rowcount


def next_notification_attempt(s: Session, after: datetime) -> datetime | None:
    """When the earliest backed-off pending notification becomes due after ``after`` (None: none waits).
    Rows already due but held back by a rate limit or digest interval do not count."""
    n = _NOTIFS.c
    return s.scalar(select(func.min(n.next_attempt_at)).where(n.state == "pending", n.next_attempt_at > after))


def latest_photometry(s: Session, target_id: int) -> Photometry | None:
    """The target's most recent detection (else any point), for a message's "latest" line."""
    P = Photometry
    q = select(P).where(P.target_id == target_id).order_by((P.kind == "detection").desc(), P.mjd.desc()).limit(1)
    return s.scalar(q)


def has_photometry(s: Session, target_id: int) -> bool:
    return s.scalar(select(Photometry.id).where(Photometry.target_id == target_id).limit(1)) is not None


# ---- status ----
# Status polling (tomd.status) and cadence series (tomd.cadence).

from tomd.db.models import PollState  # noqa: E402

_POLL = PollState.__table__
_STATUS = ObservationStatus.__table__
#: Submitted requests a facility may still change by itself (tomd.facilities.base.FINAL_STATES aside).
OPEN_STATES = ("pending", "scheduled", "in_progress")
#: Requests not finished yet, for the open-requests gauge.
UNFINISHED_STATES = ("intent", "submitting") + OPEN_STATES


def pollable_requests(s: Session, facility: str, *, completed_since: datetime) -> list[Any]:
    """Submitted requests of ``facility`` a poll follows: the open ones, and the completed ones
    touched since ``completed_since`` (a completed request can be reopened)."""
    R = _OBS
    q = select(R.c.id, R.c.name, R.c.facility_id, R.c.state, R.c.facility_state, R.c.target_id,
               R.c.submitted_at, R.c.created_at, R.c.cadence).where(
        R.c.facility == facility, R.c.facility_id.is_not(None),
        or_(R.c.state.in_(OPEN_STATES), and_(R.c.state == "completed", R.c.updated_at >= completed_since)))
    return list(s.execute(q).mappings())


def status_poll_state(s: Session, facility: str) -> tuple[datetime | None, str | None]:
    """(last poll time, cursor) of a facility's status polls; (None, None) before its first poll."""
    row = s.execute(select(_POLL.c.last_poll_at, _POLL.c.cursor).where(_POLL.c.facility == facility)).first()
    return (row[0], row[1]) if row is not None else (None, None)


def save_poll_state(s: Session, facility: str, last_poll_at: datetime, cursor: str | None) -> None:
    s.execute(_insert_ignore(s, _POLL), [{"facility": facility, "last_poll_at": last_poll_at, "cursor": cursor}])
    s.execute(_POLL.update().where(_POLL.c.facility == facility).values(last_poll_at=last_poll_at, cursor=cursor))


def set_request_status(s: Session, request_id: int, old_state: str, old_word: str | None,
                       values: dict[str, Any]) -> bool:
    """Move a request on only if it is still in (old_state, old_word): a change another
    writer (a cancel, a concurrent poll) made first is never overwritten."""
    R = _OBS
    word = R.c.facility_state.is_(None) if old_word is None else R.c.facility_state == old_word
    q = R.update().where(R.c.id == request_id, R.c.state == old_state, word)
    return s.execute(q.values(updated_at=utcnow(), **values)).rowcount == 1


def add_status_rows(s: Session, rows: list[dict[str, Any]]) -> None:
    """History rows (request_id, time, state, facility_state, message) in one statement."""
    if rows:
        s.execute(_STATUS.insert(), rows)


def unfinished_request_counts(s: Session) -> dict[str, int]:
    q = select(_OBS.c.state, func.count()).where(_OBS.c.state.in_(UNFINISHED_STATES)).group_by(_OBS.c.state)
    return {state: n for state, n in s.execute(q)}


def try_advisory_lock(conn, space: int, key: int) -> bool:
    """A session-level PostgreSQL advisory lock on ``conn`` (held until unlocked or the connection ends)."""
    return bool(conn.execute(text("SELECT pg_try_advisory_lock(:a, :b)"), {"a": space, "b": key}).scalar())


def advisory_unlock(conn, space: int, key: int) -> None:
    conn.execute(text("SELECT pg_advisory_unlock(:a, :b)"), {"a": space, "b": key})


def insert_intent_once(s: Session, values: dict[str, Any]) -> int | None:
    """Insert an intent unless its name exists (a replayed step); its id, or None when it existed."""
    now = utcnow()
    row = {"state": "intent", "request": {}, "attempts": 0, "created_at": now, "updated_at": now, **values}
    return s.execute(_insert_ignore(s, _OBS).returning(_OBS.c.id), [row]).scalar_one_or_none()


def series_requests(s: Session, root_id: int) -> list[ObservationRequest]:
    """A cadence series: its first request and every later one (``parent_id`` = the first's id)."""
    R = ObservationRequest
    return list(s.scalars(select(R).where(or_(R.id == root_id, R.parent_id == root_id)).order_by(R.id)))


def series_template_fields(s: Session, request_id: int) -> dict[str, Any] | None:
    """The inline template of a cadence request: its own decision's, else its series' first request's."""
    row = s.get(ObservationRequest, request_id)
    if row is None:
        return None
    if row.decision_id is None and row.parent_id is not None:
        row = s.get(ObservationRequest, row.parent_id)
    return decision_template_fields(s, row.decision_id) if row is not None else None


# ---- hooks ----
# hook_runs: one row per (hook, outbox event). tomd.hooks.runner expands new
# outbox events into pending rows (insert-ignore on the unique pair), claims
# due rows with a lease (FOR UPDATE SKIP LOCKED on PostgreSQL, BEGIN IMMEDIATE
# on SQLite), and finishes them fenced by its claim.

from tomd.db.models import HookRun  # noqa: E402

_RUNS = HookRun.__table__
_OUTBOX = OutboxEvent.__table__


def add_event_id(s: Session, event: Event, *, target_id: int | None = None) -> int:
    """``add_event`` that returns the outbox id."""
    return s.execute(_OUTBOX.insert().returning(_OUTBOX.c.id), [{
        "kind": event.kind, "version": event.version, "payload": event.payload(), "target_id": target_id,
        "created_at": utcnow()}]).scalar_one()


def get_outbox_event(s: Session, event_id: int) -> OutboxEvent | None:
    return s.get(OutboxEvent, event_id)


def outbox_max_id(s: Session) -> int:
    return s.scalar(select(func.max(_OUTBOX.c.id))) or 0


def outbox_first_id_since(s: Session, when) -> int | None:
    """The lowest outbox id written at or after ``when`` (None: none)."""
    return s.scalar(select(func.min(_OUTBOX.c.id)).where(_OUTBOX.c.created_at >= when))


def hooks_with_runs(s: Session, hooks: Sequence[str]) -> set[str]:
    """Which of ``hooks`` have any run recorded (a hook seen before)."""
    if not hooks:
        return set()
    q = select(_RUNS.c.hook).where(_RUNS.c.hook.in_(list(hooks))).group_by(_RUNS.c.hook)
    return set(s.scalars(q))


def hook_event_bounds(s: Session, hooks: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{hook: (lowest, highest) event id among its runs}."""
    if not hooks:
        return {}
    q = (select(_RUNS.c.hook, func.min(_RUNS.c.event_id), func.max(_RUNS.c.event_id))
         .where(_RUNS.c.hook.in_(list(hooks))).group_by(_RUNS.c.hook))
    return {h: (lo, hi) for h, lo, hi in s.execute(q)}


def add_hook_run(s: Session, values: dict[str, Any]) -> None:
    """One run row (e.g. a hook's registration, recorded done); ignored if the pair exists."""
    s.execute(_insert_ignore(s, _RUNS), [{"state": "pending", "attempts": 0, **values}])


def expand_hook_runs(s: Session, hook: str, kinds: Sequence[str] | None, after_id: int, now) -> int:
    """Pending runs of ``hook`` for outbox events of ``kinds`` (None: all) with id > ``after_id``
    that have none yet; returns how many were added."""
    o = _OUTBOX.c
    exists = select(_RUNS.c.id).where(_RUNS.c.hook == hook, _RUNS.c.event_id == o.id).exists()
    q = select(bindparam("h", hook, type_=_RUNS.c.hook.type), o.id,
               bindparam("st", "pending", type_=_RUNS.c.state.type),
               bindparam("a", 0, type_=_RUNS.c.attempts.type), bindparam("n", now, type_=_RUNS.c.next_attempt_at.type))
    q = q.where(o.id > after_id, ~exists)
    if kinds is not None:
        q = q.where(o.kind.in_(list(kinds)))
    q = q.order_by(o.id)  # run ids follow the outbox: each hook sees events in the order written
    stmt = _insert_ignore(s, _RUNS).from_select(["hook", "event_id", "state", "attempts", "next_attempt_at"], q)
    return len(s.execute(stmt.returning(_RUNS.c.id)).all())  # rowcount is -1 for INSERT … SELECT on psycopg


def claim_hook_runs(s: Session, worker: str, hooks: Sequence[str], *, now, lease: dict[str, Any],
                    limit: int = 1) -> list[tuple]:
    """Claim up to ``limit`` of the most overdue runs of ``hooks`` for ``worker``.

    Due: pending with its attempt time reached, or running with an expired
    lease (its daemon died). ``lease``: {hook: claimed_until}. Returns
    (run id, hook, attempts, event id, kind, version, payload, target_id,
    claimed_until) tuples in run order.
    """
    if not hooks:
        return []
    r, o = _RUNS.c, _OUTBOX.c
    q = (select(r.id, r.hook, r.attempts, r.event_id)
         .where(r.hook.in_(list(hooks)),
                or_(and_(r.state == "pending", or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now)),
                    and_(r.state == "running", r.claimed_until < now)))
         .order_by(r.next_attempt_at, r.id).limit(limit).with_for_update(skip_locked=True))
    rows = s.execute(q).all()
    if not rows:
        return []
    for hook in {row.hook for row in rows}:
        s.execute(_RUNS.update().where(r.id.in_([row.id for row in rows if row.hook == hook]))
                  .values(state="running", claimed_by=worker, claimed_until=lease[hook]))
    events = {e.id: e for e in s.execute(select(o.id, o.kind, o.version, o.payload, o.target_id)
                                         .where(o.id.in_([row.event_id for row in rows])))}
    return [(row.id, row.hook, row.attempts, row.event_id, events[row.event_id].kind, events[row.event_id].version,
             events[row.event_id].payload, events[row.event_id].target_id, lease[row.hook]) for row in rows]


def claimed_hook_run(s: Session, run_id: int, worker: str) -> tuple | None:
    """(run id, hook, attempts, event id, kind, target_id) of a run ``worker`` still holds, else None."""
    r, o = _RUNS.c, _OUTBOX.c
    q = (select(r.id, r.hook, r.attempts, r.event_id, o.kind, o.target_id).join(_OUTBOX, o.id == r.event_id)
         .where(r.id == run_id, r.claimed_by == worker, r.state == "running"))
    row = s.execute(q).first()
    return tuple(row) if row is not None else None


def extend_hook_leases(s: Session, worker: str, leases: dict[int, Any]) -> set[int]:
    """Push claimed runs' leases to {run id: claimed_until}; returns the ids still ours."""
    r = _RUNS.c
    kept = set()
    for run_id, until in leases.items():
        q = _RUNS.update().where(r.id == run_id, r.claimed_by == worker, r.state == "running")
        if s.execute(q.values(claimed_until=until)).rowcount == 1:
            kept.add(run_id)
    return kept


def finish_hook_run(s: Session, run_id: int, worker: str, values: dict[str, Any]) -> bool:
    """Update a run while ``worker`` still holds its claim (fencing); False if it lost it."""
    r = _RUNS.c
    q = _RUNS.update().where(r.id == run_id, r.claimed_by == worker, r.state == "running")
    return s.execute(q.values(**values)).rowcount == 1


def release_hook_runs(s: Session, worker: str, run_ids: Sequence[int] | None = None) -> int:
    """Runs claimed by ``worker`` (all, or ``run_ids``) back to pending, attempts unchanged."""
    r = _RUNS.c
    q = _RUNS.update().where(r.claimed_by == worker, r.state == "running")
    if run_ids is not None:
        q = q.where(r.id.in_(list(run_ids)))
    return s.execute(q.values(state="pending", claimed_by=None, claimed_until=None)).rowcount


_FINISH_KEYS = ("state", "attempts", "error", "next_attempt_at", "finished_at", "claimed_by", "claimed_until")


def finish_hook_runs(s: Session, worker: str, updates: Sequence[tuple[int, dict[str, Any]]]) -> set[int]:
    """``finish_hook_run`` for many runs in two statements; returns the ids updated (still ours)."""
    if not updates:
        return set()
    r = _RUNS.c
    ids = [rid for rid, _ in updates]
    mine = set(s.scalars(select(r.id).where(r.id.in_(ids), r.claimed_by == worker, r.state == "running")
                         .with_for_update()))
    rows = [{"rid": rid, **{k: values.get(k) for k in _FINISH_KEYS}} for rid, values in updates if rid in mine]
    if rows:
        s.execute(_RUNS.update().where(r.id == bindparam("rid")), rows)
    return mine


def hook_run_counts(s: Session) -> dict[str, dict[str, int]]:
    """{hook: {state: count}}."""
    out: dict[str, dict[str, int]] = {}
    for hook, state, n in s.execute(select(_RUNS.c.hook, _RUNS.c.state, func.count()).group_by(_RUNS.c.hook,
                                                                                              _RUNS.c.state)):
        out.setdefault(hook, {})[state] = n
    return out


def hook_last_runs(s: Session) -> dict[str, tuple[Any, Any]]:
    """{hook: (last finished_at of a done run, last finished_at of a failed run)}."""
    r = _RUNS.c
    out: dict[str, list[Any]] = {}
    q = (select(r.hook, r.state, func.max(r.finished_at))
         .where(r.state.in_(("done", "failed")), r.attempts > 0)  # attempts 0: a registration record
         .group_by(r.hook, r.state))
    for hook, state, when in s.execute(q):
        out.setdefault(hook, [None, None])[0 if state == "done" else 1] = when
    return {h: (v[0], v[1]) for h, v in out.items()}


def query_hook_runs(s: Session, *, state: str | None = None, hook: str | None = None,
                    limit: int | None = None) -> list[tuple[HookRun, str]]:
    """Runs newest first, with their event's kind."""
    q = (select(HookRun, OutboxEvent.kind).join(OutboxEvent, OutboxEvent.id == HookRun.event_id)
         .order_by(HookRun.id.desc()))
    if state is not None:
        q = q.where(HookRun.state == state)
    if hook is not None:
        q = q.where(HookRun.hook == hook)
    if limit:
        q = q.limit(limit)
    return [(run, kind) for run, kind in s.execute(q)]


def requeue_hook_runs(s: Session, *, ids: Sequence[int] | None = None, hook: str | None = None) -> int:
    """Failed runs back to pending with fresh attempts (``tomd hook retry``)."""
    r = _RUNS.c
    q = _RUNS.update().where(r.state == "failed")
    if ids is not None:
        q = q.where(r.id.in_(list(ids)))
    if hook is not None:
        q = q.where(r.hook == hook)
    return s.execute(q.values(state="pending", attempts=0, next_attempt_at=utcnow(), claimed_by=None,
                              claimed_until=None, finished_at=None)).rowcount


# ---- brokers (REST polls) ----
# A poll stream's cursor lives in poll_state under the key "broker:<stream name>"
# (the table's ``facility`` column holds the key; the facility status polls use
# bare facility names, so the prefix keeps the two apart).


def poll_cursor(s: Session, key: str) -> str | None:
    from tomd.db.models import PollState

    row = s.get(PollState, key)
    return row.cursor if row is not None else None


def save_poll_cursor(s: Session, key: str, cursor: str) -> None:
    """Insert or move the cursor (one row per key; a replayed save writes the same value)."""
    from tomd.db.models import PollState

    row = s.get(PollState, key, with_for_update=True)
    if row is None:
        s.add(PollState(facility=key, cursor=cursor, last_poll_at=utcnow()))
    else:
        row.cursor = cursor
        row.last_poll_at = utcnow()


def unresolved_dead_letter_topics(s: Session, stream: str, topics: Sequence[str]) -> set[str]:
    """Which of ``topics`` (a poll result's stable coordinates) already wait as dead letters of ``stream``."""
    from tomd.db.models import DeadLetter

    if not topics:
        return set()
    q = select(DeadLetter.topic).where(DeadLetter.stream == stream, DeadLetter.resolved_at.is_(None),
                                       DeadLetter.topic.in_(list(topics)))
    return set(s.scalars(q))


# ---- data retrieval ----
# tomd.retrieve: requests whose data is due (data_due_at <= now) are claimed
# by moving data_due_at forward to the claim's end (a lease, like a queue's
# visibility timeout); a finished or failed attempt sets it to NULL or to the
# next try, fenced on the lease so a worker whose lease ran out (or a poll
# that re-armed the request meanwhile) is never overwritten.

from tomd.db.models import DataProduct as _DP  # noqa: E402

_DPT = _DP.__table__


def schedule_data_retrieval(s: Session, request_id: int, when: datetime) -> None:
    """Make the request's data due at ``when`` (the status stage calls this on completion)."""
    s.execute(_OBS.update().where(_OBS.c.id == request_id).values(data_due_at=when))


def claim_data_requests(s: Session, *, now: datetime, lease_until: datetime, limit: int,
                        ids: Sequence[int] | None = None,
                        facilities: Sequence[str] | None = None) -> list[ObservationRequest]:
    """Claim requests whose data is due: ``data_due_at`` moves to ``lease_until`` (the lease).

    PostgreSQL skips rows another claimer has locked (``FOR UPDATE SKIP
    LOCKED``); SQLite's ``BEGIN IMMEDIATE`` serialises claimers. The caller
    commits at once and downloads outside the transaction.
    """
    R = ObservationRequest
    q = select(R).where(R.data_due_at.is_not(None), R.data_due_at <= now)
    if ids is not None:
        q = q.where(R.id.in_(list(ids)))
    if facilities is not None:
        q = q.where(R.facility.in_(list(facilities)))
    q = q.order_by(R.data_due_at, R.id).limit(limit).with_for_update(skip_locked=True)
    rows = list(s.scalars(q))
    if rows:
        s.execute(_OBS.update().where(_OBS.c.id.in_([r.id for r in rows])).values(data_due_at=lease_until))
        for r in rows:
            r.data_due_at = lease_until
    return rows


def update_data_lease(s: Session, request_id: int, lease: datetime | None, values: dict[str, Any]) -> bool:
    """Update the request only while ``data_due_at`` is still ``lease`` (compare and set)."""
    cond = _OBS.c.data_due_at.is_(None) if lease is None else _OBS.c.data_due_at == lease
    return s.execute(_OBS.update().where(_OBS.c.id == request_id, cond).values(**values)).rowcount == 1


def next_data_due(s: Session) -> datetime | None:
    """The earliest data_due_at (a lease or a backoff included); None when nothing waits."""
    return s.scalar(select(func.min(ObservationRequest.data_due_at)))


def data_products_by_ids(s: Session, facility: str, product_ids: Sequence[str]) -> dict[str, _DP]:
    """The facility's product rows among ``product_ids``, by product id."""
    out: dict[str, _DP] = {}
    ids = list(dict.fromkeys(product_ids))
    for i in range(0, len(ids), 500):
        q = select(_DP).where(_DP.facility == facility, _DP.product_id.in_(ids[i:i + 500]))
        out.update((r.product_id, r) for r in s.scalars(q))
    return out


def lock_data_product(s: Session, facility: str, product_id: str) -> _DP | None:
    """The product's row, locked until the transaction ends (PostgreSQL; SQLite locks the database)."""
    return s.scalar(select(_DP).where(_DP.facility == facility, _DP.product_id == product_id)
                    .with_for_update())


def get_data_product_by_id(s: Session, row_id: int) -> _DP | None:
    return s.get(_DP, row_id)


# The retrieval stage's name for the same listing (tomd.products, tests/test_retrieve.py).
query_data_products = data_products


# ---- operations ----
# Read at metrics scrape time: one indexed GROUP BY, cheap at any table size.

OPEN_REQUEST_STATES = ("intent", "submitting", "pending", "scheduled", "in_progress")


def open_requests_by_state(s: Session) -> dict[str, int]:
    """Observation requests not in a final state, counted by state."""
    R = ObservationRequest
    q = select(R.state, func.count()).where(R.state.in_(OPEN_REQUEST_STATES)).group_by(R.state)
    return {state: n for state, n in s.execute(q)}


def unresolved_dead_letter_count(s: Session) -> int:
    """Dead letters nobody has resolved (retried successfully or dismissed) yet."""
    return s.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.resolved_at.is_(None))) or 0


# ---- catalogs ----
# Answers of catalog services, shared by every process (tomd/catalogs/cache.py).


def catalog_cache_get(s: Session, service: str, key: str):
    """(payload, fetched_at) of a cached answer, or None."""
    from tomd.db.models import CatalogCache

    row = s.execute(select(CatalogCache.payload, CatalogCache.fetched_at)
                    .where(CatalogCache.service == service, CatalogCache.key == key)).first()
    return (row[0], row[1]) if row is not None else None


def catalog_cache_put(s: Session, service: str, key: str, payload: dict[str, Any]) -> None:
    """Insert or replace one answer. Two processes caching the same key at once both succeed."""
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    from tomd.db.models import CatalogCache

    now = utcnow()
    values = {"payload": payload, "fetched_at": now}
    where = (CatalogCache.service == service, CatalogCache.key == key)
    if s.execute(update(CatalogCache).where(*where).values(**values)).rowcount:
        return
    try:
        with s.begin_nested():
            s.execute(insert(CatalogCache).values(service=service, key=key, **values))
    except IntegrityError:  # inserted meanwhile by another process: ours is as fresh
        s.execute(update(CatalogCache).where(*where).values(**values))


# ---- cadence ----
# Series whose request ended before reaching the facility (tomd.cadence.sweep).


def unsent_ended_in_series(s: Session, *, since: datetime, states: Sequence[str] = ("failed",)) -> list[tuple[int, str]]:
    """(id, state) of requests with a cadence that ended in ``states`` without a facility id
    (the submitter gave up: window over, attempts exhausted) and changed since ``since``."""
    R = _OBS
    q = select(R.c.id, R.c.state).where(R.c.cadence.is_not(None), R.c.facility_id.is_(None),
                                        R.c.state.in_(list(states)), R.c.updated_at >= since).order_by(R.c.id)
    return [(i, st) for i, st in s.execute(q)]


# ---- status: partial completion ----


def mark_data_due(s: Session, request_ids: Sequence[int], now: datetime) -> int:
    """Data became available for these requests (an inner request completed): due now, unless the
    retriever already has them due (its own next try, maybe backed off, stands)."""
    if not request_ids:
        return 0
    q = _OBS.update().where(_OBS.c.id.in_(list(request_ids)), _OBS.c.data_due_at.is_(None))
    return s.execute(q.values(data_due_at=now, updated_at=utcnow())).rowcount


# ---- rules: nights, proposals, backtest ----
# tomd.rules.engine counts limits per night (from a night's start, tomd.rules.engine.night_of) and
# telescope hours per facility AND proposal; tomd.rules.cli rebuilds notice alerts as they stood.


def count_decisions_from(s: Session, rule: str, outcome: str, start, *, reason_prefix: str | None = None) -> int:
    """Decisions of ``rule`` with ``outcome`` created at or after ``start``."""
    q = _decision_filter(select(func.count()).select_from(_DECISIONS), rule, outcome, None, reason_prefix)
    return s.scalar(q.where(_DECISIONS.c.created_at >= start)) or 0


def requested_hours_from(s: Session, facility: str, proposal: str | None, start) -> float:
    """Estimated hours of the facility's requests under ``proposal`` (None: requests without one)
    created at or after ``start``, not cancelled or rejected."""
    R = _REQUESTS
    q = select(func.coalesce(func.sum(R.c.estimated_hours), 0.0)).where(
        R.c.facility == facility, R.c.created_at >= start, R.c.state.not_in(("cancelled", "rejected")),
        R.c.proposal == proposal if proposal is not None else R.c.proposal.is_(None))
    return float(s.scalar(q) or 0.0)


def notice_alert_ids(s: Session, notice_ids: Sequence[int]) -> dict[int, list[int]]:
    """{notice id: [ids of its alerts, in the order they were stored]}."""
    out: dict[int, list[int]] = {n: [] for n in notice_ids}
    if notice_ids:
        q = select(_ALERTS.c.notice_id, _ALERTS.c.id).where(_ALERTS.c.notice_id.in_(list(notice_ids))) \
            .order_by(_ALERTS.c.id)
        for nid, aid in s.execute(q):
            out[nid].append(aid)
    return out


def notice_received_payloads(s: Session, notice_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """{notice id: [notice.received payloads, in outbox order]}: each notice alert's own localisation
    as it was ingested (the notices row holds only the latest refinement)."""
    wanted = set(notice_ids)
    out: dict[int, list[dict[str, Any]]] = {n: [] for n in notice_ids}
    if wanted:
        q = select(OutboxEvent.payload).where(OutboxEvent.kind == "notice.received").order_by(OutboxEvent.id)
        for (p,) in s.execute(q):
            if isinstance(p, dict) and p.get("notice_id") in wanted:
                out[p["notice_id"]].append(p)
    return out


# ---- ingest: notices and cutouts ----


def notice_issued_times(s: Session, notice_id: int) -> list[str]:
    """The ``issued`` times (ISO UTC) of the alerts applied to a notice.

    A notice's refinements carry their issue time in ``fields["issued"]``; a
    notice issued before this one arrived late and must not overwrite it.
    A notice has a handful of alerts, so they are read whole.
    """
    q = select(_ALERTS.c.fields).where(_ALERTS.c.notice_id == notice_id)
    return [f["issued"] for f in s.scalars(q) if isinstance(f, dict) and isinstance(f.get("issued"), str)]


def insert_cutout_products(s: Session, rows: list[dict[str, Any]]) -> None:
    """Record alert cutouts (kind "cutout") in one statement.

    Only new alerts have cutouts to record, so there is nothing to skip: a
    clash (another daemon stored the same alert) fails the batch, which is
    then retried and finds the alert stored.
    """
    if rows:
        s.execute(DataProduct.__table__.insert(), rows)


# ---- submit: one lane per facility ----
# Used by tomd.submit.Submitter.run: each configured facility's intents are claimed by a lane
# (thread) of its own, so a slow facility holds back only its own intents.


def due_intent_ids_elsewhere(s: Session, configured: Sequence[str], *, now: datetime, limit: int) -> list[int]:
    """Ids of due, unclaimed intents naming a facility outside ``configured`` (they fail at once)."""
    R = _OBS
    q = select(R.c.id).where(
        R.c.state.in_(("intent", "submitting")), R.c.facility.not_in(list(configured)),
        or_(R.c.next_attempt_at.is_(None), R.c.next_attempt_at <= now),
        or_(R.c.claimed_until.is_(None), R.c.claimed_until < now),
    ).order_by(R.c.id).limit(limit)
    return list(s.scalars(q))


def next_intent_attempt_of(s: Session, *, facilities: Sequence[str] | None = None,
                           exclude: Sequence[str] | None = None) -> datetime | None:
    """``next_observation_attempt`` for the intents of ``facilities`` (or of every facility but ``exclude``)."""
    from sqlalchemy import case

    R = ObservationRequest
    due = func.coalesce(R.next_attempt_at, R.created_at)
    when = case((R.claimed_until > due, R.claimed_until), else_=due)
    q = select(func.min(when)).where(R.state.in_(("intent", "submitting")))
    if facilities is not None:
        q = q.where(R.facility.in_(list(facilities)))
    if exclude is not None:
        q = q.where(R.facility.not_in(list(exclude)))
    return s.scalar(q)


# ---- operations: outbox backlog ----
# tomd_outbox_pending_events, read at scrape time (cached by the caller).


def outbox_backlog(s: Session) -> int:
    """Outbox events some hook has not yet finished with: distinct events with a hook run still
    pending or running (retries waiting out their back-off included; failed runs have ended).

    Runs are written as soon as a hook runner sees an event, so this is the delivery backlog
    up to the runner's wake-up. It reads the unfinished runs only; with very large hook_runs
    tables a partial index on state IN ('pending', 'running') keeps it cheap."""
    from tomd.db.models import HookRun as _HR

    q = select(func.count(func.distinct(_HR.event_id))).where(_HR.state.in_(("pending", "running")))
    return int(s.scalar(q) or 0)


# ---- ingest: COPY on PostgreSQL ----
# The ingest path's bulk rows (alerts, photometry, outbox events, targets,
# names, cutout products, decisions) go to PostgreSQL with binary COPY: one
# statement streamed row by row instead of an executemany whose per-row
# parameter handling in SQLAlchemy and psycopg costs more than the server's
# work. Binary, not text: psycopg formats a photometry row in 0.34 us instead
# of 3.4 (no float-to-text, no escaping of the JSON), and the server parses
# no numbers. Same rows, same transaction; SQLite keeps the functions above.

from datetime import timezone as _tz  # noqa: E402

# Binary COPY needs each column's type: the model's, as PostgreSQL names it
# for the binary format. JSON and JSONB go as bytea, whose binary form is the
# bytes as they are: json's binary input is the JSON text (checked by the
# server as text input is), jsonb's a version byte and the text
# (``_copy_json``, ``_copy_jsonb``): no text object made for a payload.
_BINARY_TYPES = {"BIGINT": "int8", "INTEGER": "int4", "SMALLINT": "int2", "FLOAT": "float8",
                 "DOUBLE PRECISION": "float8", "REAL": "float4", "BOOLEAN": "bool", "TEXT": "text",
                 "VARCHAR": "text", "TIMESTAMP WITHOUT TIME ZONE": "timestamp", "JSON": "bytea", "JSONB": "bytea"}


@lru_cache(maxsize=64)
def _copy_types(table_name: str, columns: tuple[str, ...]) -> tuple[str, ...]:
    from sqlalchemy.dialects import postgresql

    from tomd.db.models import Base

    table, dialect = Base.metadata.tables[table_name], postgresql.dialect()
    out = []
    for c in columns:
        name = table.c[c].type.compile(dialect=dialect).split("(")[0]
        if name not in _BINARY_TYPES:
            raise TypeError(f"binary COPY: no binary type known for {table_name}.{c} ({name})")
        out.append(_BINARY_TYPES[name])
    return tuple(out)


def _copy(s: Session, table, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, into: str | None = None) -> None:
    """Binary COPY of ``rows`` (tuples in ``columns`` order) into ``table`` (or the
    table named ``into``, whose columns have ``table``'s types).

    Values must already be what the column stores: JSON and JSONB as bytes
    (``_copy_json``, ``_copy_jsonb``), datetimes as naive UTC (``_copy_time``),
    text as str.
    """
    import psycopg
    from sqlalchemy.exc import DBAPIError

    cols = ", ".join(f'"{c}"' for c in columns)
    sql = f"COPY {into or table.name} ({cols}) FROM STDIN (FORMAT BINARY)"
    cur = s.connection().connection.driver_connection.cursor()
    try:
        with cur.copy(sql) as copy:
            copy.set_types(_copy_types(table.name, tuple(columns)))
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as exc:
        # As SQLAlchemy would raise it (DataError, OperationalError, ...): callers
        # tell a refused row from an outage by those classes.
        raise DBAPIError.instance(sql, None, exc, psycopg.Error) from exc
    finally:
        cur.close()


def _copy_json(value: Any) -> bytes:
    """A json column's binary COPY value: the JSON text's bytes (None as JSON null, as the JSON type binds it)."""
    from tomd.db.migrate import json_bytes

    return json_bytes(value)


def _copy_jsonb(value: Any) -> bytes:
    """A jsonb column's binary COPY value: version 1, then the JSON text."""
    return b"\x01" + _copy_json(value)


def _copy_time(value: datetime | None) -> datetime | None:  # noqa: F821 (annotation only)
    """As UTCDateTime binds it: naive UTC (the columns are timestamp without time zone)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column; attach a timezone")
    return value.astimezone(_tz.utc).replace(tzinfo=None)


def _is_postgresql(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


_ALERT_COPY_COLUMNS = ("id", "source", "key", "stream", "topic", "partition", "offset", "kind", "object_id",
                       "target_id", "notice_id", "time", "ra", "dec", "band", "mag", "mag_err", "flux", "flux_err",
                       "fields", "payload", "ingested_at")


def ingest_alerts(s: Session, rows: list[dict[str, Any]]) -> list[int]:
    """``insert_alerts`` for the ingest path: the rows carry every alert column but
    id and ingested_at; on PostgreSQL the ids come from the sequence and the rows go by COPY."""
    if not rows or not _is_postgresql(s):
        return insert_alerts(s, rows)
    ids = list(s.scalars(
        text("SELECT nextval(pg_get_serial_sequence('alerts', 'id')) FROM generate_series(1, :n)"), {"n": len(rows)}))
    now = _copy_time(utcnow())
    _copy(s, _ALERTS, _ALERT_COPY_COLUMNS, (
        (i, r["source"], r["key"], r["stream"], r["topic"], r["partition"], r["offset"], r["kind"], r["object_id"],
         r["target_id"], r["notice_id"], _copy_time(r["time"]), r["ra"], r["dec"], r["band"], r["mag"], r["mag_err"],
         r["flux"], r["flux_err"], _copy_jsonb(r["fields"] if r["fields"] is not None else {}),
         _copy_json(r["payload"]), now)
        for i, r in zip(ids, rows)))
    return ids


_PHOT_COPY_COLUMNS = ("target_id", "alert_id", "source", "mjd", "band", "kind", "mag", "mag_err", "flux",
                      "flux_err", "limit", "dedupe")


def ingest_photometry(s: Session, rows: list[dict[str, Any]]) -> None:
    """``insert_photometry`` for the ingest path (same keys in each row; a point already
    stored for the target is skipped). On PostgreSQL: COPY into a temporary table,
    then one INSERT … SELECT … ON CONFLICT DO NOTHING, so a point another writer
    stores at the same moment is skipped as before, not an error."""
    if not rows or not _is_postgresql(s):
        return insert_photometry(s, rows)
    # Per connection, made once. ON COMMIT DELETE ROWS truncates it in place at
    # each commit (no dead rows, no new file); the DELETE below empties it for a
    # second call within one transaction. "ord" keeps the given order for the ids.
    s.execute(text(
        "CREATE TEMPORARY TABLE IF NOT EXISTS tomd_ingest_photometry ("
        " ord bigint GENERATED ALWAYS AS IDENTITY, target_id bigint, alert_id bigint, source text,"
        " mjd double precision, band text, kind text, mag double precision, mag_err double precision,"
        " flux double precision, flux_err double precision, \"limit\" double precision, dedupe text"
        ") ON COMMIT DELETE ROWS"))
    _copy(s, Photometry.__table__, _PHOT_COPY_COLUMNS,
          (tuple(r[c] for c in _PHOT_COPY_COLUMNS) for r in rows), into="tomd_ingest_photometry")
    cols = ", ".join(f'"{c}"' for c in _PHOT_COPY_COLUMNS)
    s.execute(text(f"INSERT INTO photometry ({cols}) SELECT {cols} FROM tomd_ingest_photometry ORDER BY ord "
                   "ON CONFLICT (target_id, dedupe) DO NOTHING"))
    s.execute(text("DELETE FROM tomd_ingest_photometry"))


def ingest_events(s: Session, events: Sequence[tuple[Event, int | None]]) -> None:
    """``add_events`` for the ingest path: on PostgreSQL by COPY."""
    if not events or not _is_postgresql(s):
        return add_events(s, events)
    now = _copy_time(utcnow())
    _copy(s, OutboxEvent.__table__, ("kind", "version", "payload", "target_id", "created_at"),
          ((e.kind, e.version, _copy_jsonb(e.payload()), tid, now) for e, tid in events))


# ---- targets: batch match and create on PostgreSQL ----
# tomd.targets.store.upsert_many's statements for a batch of alerts: fixed
# statement texts with array parameters (psycopg prepares each once per
# connection; one round trip whatever the batch size) instead of IN lists
# and OR'ed ranges whose text, and so whose parsing and planning, changes
# with the batch; new targets and names go by COPY. SQLite keeps the
# functions above.

_NORMS_ANY = text("SELECT norm, target_id FROM target_names WHERE norm = ANY(CAST(:norms AS text[]))")
_RANGES_ANY = text(
    "SELECT t.id, t.ra, t.dec FROM unnest(CAST(:lo AS bigint[]), CAST(:hi AS bigint[])) AS r(lo, hi)"
    " JOIN targets t ON t.hpx >= r.lo AND t.hpx < r.hi")


_PIN_PLAN = text("SELECT current_setting('jit'), current_setting('plan_cache_mode'), set_config('jit', 'off', true),"
                 " set_config('plan_cache_mode', 'force_custom_plan', true)")
_PUT_BACK_PLAN = text("SELECT set_config('jit', :jit, true), set_config('plan_cache_mode', :mode, true)")


def _planned_for_values(s: Session, stmt, params: dict[str, Any]) -> list[Any]:
    """The rows of a read whose arrays are the batch (names, keys, sky ranges), with a plan made for them.

    psycopg prepares a statement from its sixth run, and PostgreSQL then may
    switch to a generic plan made without the arrays' values: for these
    statements, one that reads the whole table once per element. Measured at
    10,000 targets: 250-400 ms of server CPU per batch of 500 alerts for the
    sky ranges, ~25 ms each for the names and the alert keys, where plans made
    for the values take 1-2 ms, and it grows with the tables. So custom plans
    are forced for the statement, and JIT is off: the planner cannot see the
    arrays' elements are narrow (it guesses 1/9 of the table per sky range), so
    at a few 10^5 targets the plan's cost passes jit_above_cost and JIT
    compilation takes ~60 ms for a query that runs in ~1 ms. Only for this
    statement: the transaction's settings are put back after it (not for
    every statement: the foreign-key checks of the writes that follow are
    prepared queries too, and a custom plan for each of their rows cost more
    than it saved). A failed statement aborts the transaction, whose rollback
    undoes the SET LOCALs.
    """
    jit, mode = s.execute(_PIN_PLAN).one()[:2]
    rows = s.execute(stmt, params).all()
    s.execute(_PUT_BACK_PLAN, {"jit": jit, "mode": mode})
    return rows


def match_target_names(s: Session, norms: Sequence[str]) -> dict[str, int]:
    """``target_id_by_norm`` in one fixed statement on PostgreSQL."""
    if not norms or not _is_postgresql(s):
        return target_id_by_norm(s, norms)
    return {norm: tid for norm, tid in _planned_for_values(s, _NORMS_ANY, {"norms": list(norms)})}


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ranges sorted, with overlapping and touching ones joined (each row found once)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def targets_near(s: Session, ranges: Sequence[tuple[int, int]]) -> dict[int, tuple[float, float]]:
    """``targets_in_range_set`` ({id: (ra, dec)} in any of the ranges): one statement on PostgreSQL."""
    if not ranges:
        return {}
    if not _is_postgresql(s):
        return targets_in_range_set(s, ranges)
    merged = merge_ranges(ranges)
    rows = _planned_for_values(s, _RANGES_ANY, {"lo": [a for a, _ in merged], "hi": [b for _, b in merged]})
    return {tid: (ra, dec) for tid, ra, dec in rows}


def target_rows_any(s: Session, ids: Sequence[int]) -> dict[int, Any]:
    """``target_rows`` in one fixed statement on PostgreSQL."""
    if not ids or not _is_postgresql(s):
        return target_rows(s, ids)
    from sqlalchemy import BigInteger, any_
    from sqlalchemy.dialects.postgresql import ARRAY

    q = select(_TARGETS).where(_TARGETS.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
    return {r["id"]: r for r in s.execute(q, {"ids": list(ids)}).mappings()}


def create_targets(s: Session, rows: list[dict[str, Any]]) -> list[int]:
    """``insert_targets`` (same keys in each row; ids returned in order): by COPY on PostgreSQL."""
    if not rows or not _is_postgresql(s):
        return insert_targets(s, rows)
    ids = list(s.scalars(
        text("SELECT nextval(pg_get_serial_sequence('targets', 'id')) FROM generate_series(1, :n)"),
        {"n": len(rows)}))
    now = _copy_time(utcnow())
    columns = [c for c in rows[0] if c not in ("id", "created_at", "modified_at")]
    _copy(s, _TARGETS, ("id", *columns, "created_at", "modified_at"), (
        (i, *(_copy_jsonb(r[c] or {}) if c == "extras" else _copy_json(r[c]) if c == "extras_set_at" else r[c]
              for c in columns), now, now)
        for i, r in zip(ids, rows)))
    return ids


_NAME_COPY_COLUMNS = ("target_id", "name", "norm", "primary", "source")


def create_target_names(s: Session, rows: list[dict[str, Any]]) -> None:
    """``add_names`` by COPY on PostgreSQL (a name another writer took meanwhile is an IntegrityError, as before)."""
    if not rows or not _is_postgresql(s):
        return add_names(s, rows)
    _copy(s, TargetName.__table__, _NAME_COPY_COLUMNS, (tuple(r[c] for c in _NAME_COPY_COLUMNS) for r in rows))


# ---- rules: tag and list history (backtests replay them as they stood) ----

def tag_times(s: Session, target_ids: Iterable[int]) -> dict[int, list[tuple[str, Any]]]:
    """{target: [(tag, added_at or None)]}: like ``tags_of``, with when each was put on."""
    ids = list(target_ids)
    out: dict[int, list[tuple[str, Any]]] = {i: [] for i in ids}
    if ids:
        q = (select(TargetTag.target_id, TargetTag.tag, TargetTag.added_at)
             .where(TargetTag.target_id.in_(ids)).order_by(TargetTag.tag))
        for tid, tag, at in s.execute(q):
            out[tid].append((tag, at))
    return out


def list_times(s: Session, target_ids: Iterable[int]) -> dict[int, list[tuple[str, Any]]]:
    """{target: [(list name, added_at or None)]}: like ``lists_of``, with when each membership began."""
    ids = list(target_ids)
    out: dict[int, list[tuple[str, Any]]] = {i: [] for i in ids}
    if ids:
        q = (select(TargetListMember.target_id, TargetList.name, TargetListMember.added_at)
             .join(TargetList, TargetList.id == TargetListMember.list_id)
             .where(TargetListMember.target_id.in_(ids)).order_by(TargetList.name))
        for tid, name, at in s.execute(q):
            out[tid].append((name, at))
    return out


def add_tags_at(s: Session, target_id: int, tags: Iterable[str], at) -> list[str]:
    """``add_tags`` stamped ``at`` (the rule's "now"); a tag already there but stamped later (a replay
    meeting today's copy) is moved back to ``at``. Returns the tags newly added."""
    tags = list(dict.fromkeys(tags))
    if not tags:
        return []
    have = dict(s.execute(select(TargetTag.tag, TargetTag.added_at)
                          .where(TargetTag.target_id == target_id, TargetTag.tag.in_(tags))).all())
    new = [t for t in tags if t not in have]
    if new:
        s.execute(insert(TargetTag), [{"target_id": target_id, "tag": t, "added_at": at} for t in new])
    later = [t for t, when in have.items() if when is not None and when > at]
    if later:
        s.execute(TargetTag.__table__.update().where(TargetTag.target_id == target_id, TargetTag.tag.in_(later))
                  .values(added_at=at))
    return new


def add_to_lists_at(s: Session, target_id: int, list_names: Iterable[str], at) -> list[str]:
    """``add_to_lists`` stamped ``at``, as :func:`add_tags_at`. Returns the lists newly joined."""
    added: list[str] = []
    for name in dict.fromkeys(list_names):
        lst = s.scalar(select(TargetList).where(TargetList.name == name))
        if lst is None:
            lst = TargetList(name=name, description="")
            s.add(lst)
            s.flush()
        member = s.get(TargetListMember, (lst.id, target_id))
        if member is None:
            s.add(TargetListMember(list_id=lst.id, target_id=target_id, added_at=at))
            added.append(name)
        elif member.added_at is not None and member.added_at > at:
            member.added_at = at
    s.flush()
    return added


def target_history_rows(s: Session, target_ids: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
    """The targets, names, tags, lists and memberships of ``target_ids`` as plain rows (to seed a replay)."""
    ids = sorted(set(target_ids))
    if not ids:
        return {"targets": [], "names": [], "tags": [], "lists": [], "members": []}

    def rows(table, cond):
        return [dict(r) for r in s.execute(select(table).where(cond)).mappings()]

    members = rows(TargetListMember.__table__, TargetListMember.target_id.in_(ids))
    list_ids = sorted({m["list_id"] for m in members})
    return {"targets": rows(_TARGETS, _TARGETS.c.id.in_(ids)),
            "names": rows(TargetName.__table__, TargetName.target_id.in_(ids)),
            "tags": rows(TargetTag.__table__, TargetTag.target_id.in_(ids)),
            "lists": rows(TargetList.__table__, TargetList.id.in_(list_ids)) if list_ids else [],
            "members": members}


def _rule_target_columns() -> list:
    """The targets' columns the rules read: all but ``extras_set_at``, which only backtests need
    (:func:`extras_set_at_of`): decoding it for every target of every batch cost the daemon ~2 us per
    target that has extras."""
    return [c for c in _TARGETS.c if c.name != "extras_set_at"]


def target_rows_for_rules(s: Session, ids: Sequence[int]) -> dict[int, Any]:
    """:func:`target_rows` without ``extras_set_at`` (:func:`_rule_target_columns`)."""
    if not ids:
        return {}
    q = select(*_rule_target_columns()).where(_TARGETS.c.id.in_(bindparam("ids", expanding=True)))
    return {r["id"]: r for r in s.execute(q, {"ids": list(ids)}).mappings()}


def extras_set_at_of(s: Session, target_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    """{target: {extra key: ISO time it was last set}} (``targets.extras_set_at``); a target or key of
    unknown time (set before schema 0009) is absent. For backtests (the rule engine's as_of mode)."""
    ids = list(target_ids)
    if not ids:
        return {}
    q = select(_TARGETS.c.id, _TARGETS.c.extras_set_at).where(_TARGETS.c.id.in_(ids))
    return {tid: at for tid, at in s.execute(q) if at}


def seed_target_history(s: Session, seed: dict[str, list[dict[str, Any]]]) -> None:
    """Insert rows from :func:`target_history_rows` as they are (ids kept): an empty scratch database only."""
    for table, key in ((_TARGETS, "targets"), (TargetName.__table__, "names"), (TargetList.__table__, "lists"),
                       (TargetTag.__table__, "tags"), (TargetListMember.__table__, "members")):
        if seed.get(key):
            s.execute(table.insert(), seed[key])


def raise_intent_priority(s: Session, request_id: int, priority: float) -> bool:
    """Raise a request's priority only while it is still an intent (not yet claimed for submission).

    False when the submitter claimed it first: the facility then holds the old priority.
    """
    res = s.execute(_REQUESTS.update().where(_REQUESTS.c.id == request_id, _REQUESTS.c.state == "intent")
                    .values(priority=priority, updated_at=utcnow()))
    return res.rowcount == 1


_CUTOUT_COPY_COLUMNS = ("facility", "product_id", "kind", "filename", "storage_key", "size", "md5", "state",
                        "stored_at", "created_at", "target_id", "meta", "attempts")


def ingest_cutout_products(s: Session, rows: list[dict[str, Any]]) -> None:
    """``insert_cutout_products`` by COPY on PostgreSQL (three rows per ZTF alert; a clash fails the batch as before)."""
    if not rows or not _is_postgresql(s):
        return insert_cutout_products(s, rows)
    _copy(s, DataProduct.__table__, _CUTOUT_COPY_COLUMNS, (
        (r["facility"], r["product_id"], r["kind"], r["filename"], r["storage_key"], r["size"], r["md5"], r["state"],
         _copy_time(r["stored_at"]), _copy_time(r["created_at"]), r["target_id"], _copy_jsonb(r["meta"] or {}),
         r.get("attempts", 0))
        for r in rows))


#: Target ids per statement of :func:`photometry_of_alerts`: SQLite caps bound parameters (999
#: before 3.32), and an ``IN`` list is rendered anew for each length.
PHOTOMETRY_OF_ALERTS_CHUNK = 500


def photometry_of_alerts(s: Session, alerts: Iterable[tuple[int, int | None]], *,
                         chunk: int = PHOTOMETRY_OF_ALERTS_CHUNK) -> dict[int, list[Any]]:
    """{alert id: the points it brought, ordered by mjd} for many ``(alert id, target id)`` pairs,
    every alert present (``[]`` when it brought none): :func:`photometry_of_alert` for each at once.

    The points are rows with Photometry's columns by name (``.mjd``, ``.band``, ``.limit``...),
    not ORM objects: a backtest reads millions. Ties in mjd come in id (storage) order.

    photometry.alert_id has no index (provenance only, migration 0010; one would cost every
    ingested point), so a query per alert scanned the whole table. The points are found through
    their targets instead (the unique (target_id, dedupe) leads with target_id), ``chunk``
    distinct targets per statement, and points of other alerts of those targets (before the
    window, or uploads without an alert) are dropped. That finds them all: ingest stores an
    alert's points under the alert's own target, and only when it has one (alerts/ingest.py
    ``_store``), and alerts.target_id only ever becomes NULL, when the target is deleted, which
    deletes its points (CASCADE). So an alert without a target (a notice too large for one, an
    unmatched solar-system object, a deleted target) has no points, and none are looked for.
    """
    out: dict[int, list[Any]] = {}
    target_ids: set[int] = set()
    for alert_id, target_id in alerts:
        out[alert_id] = []
        if target_id is not None:
            target_ids.add(target_id)
    if not target_ids:
        return out
    ids = sorted(target_ids)
    # Alert ids grow with ingestion: the wanted ones' range drops most of the targets' older points
    # in the database, cheaply (the exact filter is the dict look-up below).
    p = Photometry
    q = (select(p.id, p.alert_id, p.source, p.mjd, p.band, p.kind, p.mag, p.mag_err, p.flux, p.flux_err, p.limit)
         .where(p.target_id.in_(bindparam("tids", expanding=True)), p.alert_id.between(min(out), max(out)))
         .order_by(p.mjd, p.id))
    # A target's points all come in one chunk, so each alert's list stays in mjd order.
    for i in range(0, len(ids), chunk):
        for row in s.execute(q, {"tids": ids[i:i + chunk]}):
            points = out.get(row.alert_id)
            if points is not None:
                points.append(row)
    return out
