"""GCN notice ids qualified by mission: rewrite the notices stored under the bare trigger number

Since commit 192f717 the parsers qualify a GCN trigger number by its mission
("1125809" of Swift → "swift:1125809"): missions number their triggers
independently. Notices stored before that keep the bare number, so a later
notice of the same event (now "swift:1125809") would not find them and would
start a second notice. This migration gives those rows the id the parsers
give now, and gives the notice's target the name the ingest now looks it up
by ("GCN swift 1125809", beside its old "GCN 1125809").

The mission comes from what the row's own alerts say (alerts.notice_id): the
classic packet (payload ``packet_type``/``words``), the VOEvent (IVORN and
``Packet_Type``), the gcn-schema notice (``$schema`` path, ``mission``). A
notice with no stored alert falls back to its ``notice_type`` when that names
the mission on its own (a gcn-schema path, a classic packet type of a named
mission). Left alone, on purpose:

- LVK superevent ids (S240514x, MS…): they are unique and stay bare;
- GCN circulars: their event id is the circular's own event name;
- a notice whose alerts name different missions: it is one row holding two
  events (the collision the qualification ends); which alerts belong to which
  cannot be undone here;
- a notice whose alerts disagree with its stored id, or whose mission nothing
  names (a VOEvent notice_type such as "Preliminary" with no alert left);
- a notice whose qualified id is already taken for its source: tomd ran with
  the new parsers before this migration and stored the event afresh; merging
  the two rows (their alerts, skymaps, targets) is a decision for a person.
  Each is logged (logger ``tomd.db.migrations``) with the ids.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 04:00:00
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

import sqlalchemy as sa
from alembic import op

# The rewrite must produce exactly the ids the parsers produce, so it uses
# their mission table and slug rule rather than a copy that could drift.
from tomd.alerts.formats.gcn_binary import LVC_TYPES, TYPES, mission_slug
from tomd.alerts.formats.gcn_json import notice_type as gcn_schema_type
from tomd.targets.names import normalize

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

log = logging.getLogger("tomd.db.migrations")

BARE = "bare"  # this notice's id stays as it is (LVK, circular)
_TYPES_BY_NAME = {t.name: t for t in TYPES.values()}
# An LVK superevent id (S240514x, MS181101ab, TS…): bare in the old and the new parsers.
SUPEREVENT = re.compile(r"^[MT]?S\d{6}[a-z]{1,3}$")

notices = sa.table(
    "notices", sa.column("id", sa.BigInteger), sa.column("source", sa.String), sa.column("event_id", sa.String),
    sa.column("notice_type", sa.String), sa.column("target_id", sa.BigInteger),
)
alerts = sa.table(
    "alerts", sa.column("id", sa.BigInteger), sa.column("notice_id", sa.BigInteger), sa.column("key", sa.String),
    sa.column("fields", sa.Text), sa.column("payload", sa.Text),
)
target_names = sa.table(
    "target_names", sa.column("target_id", sa.BigInteger), sa.column("name", sa.String),
    sa.column("norm", sa.String), sa.column("source", sa.String), sa.column("primary", sa.Boolean),
)


def _json(value: Any) -> dict:
    """A JSON column as a dict (PostgreSQL's driver decodes it, SQLite gives text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _qualified(mission: Any, trig: str) -> str | None:
    return f"{mission_slug(str(mission))}:{trig}" if mission else None


def _ids(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    return [str(value)]


def _from_alert(old: str, key: str, payload: dict) -> str | None:
    """The id the parsers now give the notice ``old`` this stored alert belongs to:
    a new id, BARE, or None when the alert does not tell."""
    if "circularId" in payload or "superevent_id" in payload:
        return BARE
    if "words" in payload and "packet_type" in payload:  # classic 160-byte packet
        try:
            ptype, trig = int(payload["packet_type"]), str(payload["words"][4])
        except (TypeError, ValueError, IndexError, KeyError):
            return None
        if ptype in LVC_TYPES:
            return BARE  # the superevent id, built from the packet's words
        info = TYPES.get(ptype)
        return _qualified(info.mission, trig) if info is not None and trig == old else None
    if "ivorn" in payload:  # VOEvent
        params = payload.get("params") if isinstance(payload.get("params"), dict) else {}
        if params.get("GraceID"):
            return BARE
        trig = params.get("TrigID") or params.get("EventID")
        if trig is None and params.get("run_id") and params.get("event_id"):
            trig = f"{params['run_id']}_{params['event_id']}"  # IceCube (AMON); was keyed by its IVORN
            if old != key:
                return None
        elif trig is None or str(trig) != old:
            return None
        ivorn = str(payload["ivorn"])
        try:
            info = TYPES.get(int(params.get("Packet_Type")))
        except (TypeError, ValueError):
            info = None
        mission = info.mission if info is not None and info.mission != "GCN" else (
            ivorn.split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1] or None)
        return _qualified(mission, str(trig))
    # gcn-schema JSON notice: the first trigger id, else ref_ID, else the event name.
    ids, ref, names = _ids(payload.get("id")), payload.get("ref_ID"), _ids(payload.get("event_name"))
    bare = ids[0] if ids else (str(ref) if ref else (names[0] if names else None))
    if bare is None or bare != old:
        return None
    ntype = gcn_schema_type(payload)
    return _qualified(ntype.split("/")[0] if ntype else payload.get("mission"), old)


def _from_notice_type(old: str, notice_type: str | None) -> str | None:
    """Without a stored alert: only a notice type that names the mission by itself."""
    if notice_type == "circular":
        return BARE
    if notice_type and "/" in notice_type:  # gcn-schema path: fermi/gbm/trigger
        return _qualified(notice_type.split("/")[0], old)
    info = _TYPES_BY_NAME.get(notice_type or "")
    # "GCN" types take the IVORN's stream in a VOEvent and "gcn" in a packet;
    # LVK ones may be a superevent id: neither can be told from the type alone.
    if info is not None and info.mission not in ("GCN", "LVK"):
        return _qualified(info.mission, old)
    return BARE if SUPEREVENT.match(old) else None


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(notices.c.id, notices.c.source, notices.c.event_id, notices.c.notice_type, notices.c.target_id)
        .where(sa.or_(~notices.c.event_id.contains(":"), notices.c.event_id.startswith("ivo://")))
        .order_by(notices.c.id)
    ).all()
    candidates = {r[0]: r for r in rows}
    # alerts.notice_id has no index: one pass over the linked alerts rather
    # than one scan per notice.
    linked: dict[int, list[tuple[str, Any]]] = {nid: [] for nid in candidates}
    if candidates:
        result = conn.execute(
            sa.select(alerts.c.notice_id, alerts.c.key, alerts.c.payload).where(alerts.c.notice_id.isnot(None))
            .execution_options(stream_results=True)  # on the statement: Connection's would stick to it
        )
        for nid, key, payload in result:
            if nid in linked:
                linked[nid].append((key, payload))
    moved = kept = 0
    for nid, source, old, ntype, target_id in rows:
        if linked[nid]:
            answers = {_from_alert(old, key, _json(payload)) for key, payload in linked[nid]}
        else:
            answers = {_from_notice_type(old, ntype)}
        if BARE in answers:
            continue
        if answers == {None}:
            if not old.startswith("ivo://"):  # an IVORN key stays the id when nothing else names the event
                log.warning("notice %s (%s %r, %s): no mission can be told from its row or alerts; id kept",
                            nid, source, old, ntype)
                kept += 1
            continue
        new_ids = answers - {None}
        if len(new_ids) > 1 or None in answers:
            log.warning("notice %s (%s %r): its alerts name %s; one row holding several events, id kept",
                        nid, source, old, sorted(new_ids) + (["(undetermined)"] if None in answers else []))
            kept += 1
            continue
        (new,) = new_ids
        taken = conn.execute(
            sa.select(notices.c.id).where(notices.c.source == source, notices.c.event_id == new)
        ).scalar()
        if taken is not None:
            log.warning("notice %s (%s %r) is notice %s (%r) under the new id, stored since; both kept, "
                        "merge them by hand if wanted", nid, source, old, taken, new)
            kept += 1
            continue
        conn.execute(notices.update().where(notices.c.id == nid).values(event_id=new))
        moved += 1
        if target_id is not None:
            # The ingest finds a notice's target by "<SOURCE> <mission> <trigger>"
            # (tomd.alerts.ingest.notice_target_name); the old name stays too.
            name = f"{source.upper()} {new.replace(':', ' ', 1)}"
            norm = normalize(name)
            taken_name = conn.execute(sa.select(target_names.c.norm).where(target_names.c.norm == norm)).first()
            if len(name) <= 200 and taken_name is None:
                conn.execute(target_names.insert().values(
                    target_id=target_id, name=name, norm=norm, source=source, primary=False))
    log.info("GCN notice ids qualified by mission: %d rewritten, %d kept (see the warnings)", moved, kept)


def downgrade() -> None:
    # Nothing to undo: a qualified id is a valid id for the older code too (it
    # stores a later notice under the bare number beside it), while stripping
    # the prefix would merge the missions' triggers again; the added target
    # names are ordinary aliases.
    pass
