"""Tables for the whole mission, as SQLAlchemy 2 declarative models.

Only table definitions live here; queries live in ``repository.py``. The
schema itself is created by the Alembic migrations in ``migrations/``, never
by ``create_all`` (except for the migration autogenerate check in tests).

Times are stored as naive UTC and returned as aware UTC (``UTCDateTime``).
Observation epochs are MJD floats (UTC scale) where arithmetic matters.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names so migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT ids on PostgreSQL; SQLite only autoincrements "INTEGER PRIMARY KEY".
Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, on both databases."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; attach a timezone")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# ----------------------------------------------------------------- targets --


class Target(Base):
    """One astronomical object, however many names it has.

    Sidereal targets carry ra/dec (+ epoch, proper motion, parallax);
    non-sidereal ones carry orbital elements in one of the schemes MPC minor
    planet, MPC comet or JPL major body (field names as in the LCO portal).
    """

    __tablename__ = "targets"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(16), default="sidereal")  # sidereal | non_sidereal
    ra: Mapped[float | None] = mapped_column(Float)
    dec: Mapped[float | None] = mapped_column(Float)
    # Nested HEALPix pixel at depth 29 (tomd.sky.INDEX_DEPTH) for cone range queries.
    hpx: Mapped[int | None] = mapped_column(BigInteger, index=True)
    gal_l: Mapped[float | None] = mapped_column(Float)
    gal_b: Mapped[float | None] = mapped_column(Float)
    epoch: Mapped[float | None] = mapped_column(Float)  # Julian year of ra/dec, e.g. 2000.0
    pm_ra: Mapped[float | None] = mapped_column(Float)  # mas/yr, includes cos(dec)
    pm_dec: Mapped[float | None] = mapped_column(Float)  # mas/yr
    parallax: Mapped[float | None] = mapped_column(Float)  # mas
    distance: Mapped[float | None] = mapped_column(Float)  # pc
    # Orbital elements (non-sidereal). Angles in degrees, distances in AU,
    # epochs as MJD (TT, as MPC and JPL give them).
    scheme: Mapped[str | None] = mapped_column(String(32))
    epochofel: Mapped[float | None] = mapped_column(Float)
    orbinc: Mapped[float | None] = mapped_column(Float)
    longascnode: Mapped[float | None] = mapped_column(Float)
    argofperih: Mapped[float | None] = mapped_column(Float)
    eccentricity: Mapped[float | None] = mapped_column(Float)
    meandist: Mapped[float | None] = mapped_column(Float)
    meananom: Mapped[float | None] = mapped_column(Float)
    perihdist: Mapped[float | None] = mapped_column(Float)
    epochofperih: Mapped[float | None] = mapped_column(Float)
    dailymot: Mapped[float | None] = mapped_column(Float)
    extras: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    # {key: ISO UTC time} of the latest write that set or changed each extra (backtests replay extras as
    # they stood); a key missing, or NULL (rows from before schema 0009): unknown. json on PostgreSQL:
    # never queried inside.
    extras_set_at: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    modified_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class TargetName(Base):
    """Primary name and aliases. ``norm`` is the match key ("ZTF 25abc" = "ztf25abc")."""

    __tablename__ = "target_names"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    norm: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str | None] = mapped_column(String(32))  # "ztf", "tns", "user", ...
    primary: Mapped[bool] = mapped_column(Boolean, default=False)


class TargetTag(Base):
    __tablename__ = "target_tags"

    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)
    # When the tag was put on (backtests replay tags as they stood); NULL: before tomd kept it.
    added_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow)


class TargetList(Base):
    __tablename__ = "target_lists"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TargetListMember(Base):
    __tablename__ = "target_list_members"

    list_id: Mapped[int] = mapped_column(ForeignKey("target_lists.id", ondelete="CASCADE"), primary_key=True)
    target_id: Mapped[int] = mapped_column(
        ForeignKey("targets.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    added_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow)  # NULL: before tomd kept it


# ------------------------------------------------------------------ alerts --


class AlertRow(Base):
    """An ingested alert. ``(source, key)`` is unique: replays change nothing."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("source", "key"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(200))
    stream: Mapped[str | None] = mapped_column(String(100))
    topic: Mapped[str | None] = mapped_column(String(249))
    partition: Mapped[int | None] = mapped_column(Integer)
    offset: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16), default="transient")
    object_id: Mapped[str | None] = mapped_column(String(200), index=True)
    target_id: Mapped[int | None] = mapped_column(ForeignKey("targets.id", ondelete="SET NULL"), index=True)
    notice_id: Mapped[int | None] = mapped_column(ForeignKey("notices.id", ondelete="SET NULL"))
    time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ra: Mapped[float | None] = mapped_column(Float)
    dec: Mapped[float | None] = mapped_column(Float)
    band: Mapped[str | None] = mapped_column(String(32))
    mag: Mapped[float | None] = mapped_column(Float)
    mag_err: Mapped[float | None] = mapped_column(Float)
    flux: Mapped[float | None] = mapped_column(Float)
    flux_err: Mapped[float | None] = mapped_column(Float)
    fields: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    # json, not jsonb, on PostgreSQL: kept as the survey sent it and never queried inside in SQL,
    # and jsonb's parse and re-encode of ~9 kB was the server's largest cost per alert (migration 0007).
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Notice(Base):
    """An event known by its localisation only: GRB error circle, GW skymap.

    It becomes a target only when the localisation is small enough.
    """

    __tablename__ = "notices"
    __table_args__ = (UniqueConstraint("source", "event_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(200))
    notice_type: Mapped[str | None] = mapped_column(String(100))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    ra: Mapped[float | None] = mapped_column(Float)
    dec: Mapped[float | None] = mapped_column(Float)
    error_deg: Mapped[float | None] = mapped_column(Float)
    area_90_deg2: Mapped[float | None] = mapped_column(Float)
    retracted: Mapped[bool] = mapped_column(Boolean, default=False)
    test: Mapped[bool] = mapped_column(Boolean, default=False)
    target_id: Mapped[int | None] = mapped_column(ForeignKey("targets.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Photometry(Base):
    """One measurement or upper limit. ``dedupe`` makes overlapping histories merge."""

    __tablename__ = "photometry"
    __table_args__ = (UniqueConstraint("target_id", "dedupe"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # No index of its own: the unique (target_id, dedupe) leads with target_id and serves every
    # lookup by target; a second index made each point (~7 per ZTF alert) pay two insertions.
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"))
    # The alert that brought the point (provenance), without a foreign key: PostgreSQL checked it
    # (index probe and row lock) for every point stored, and its ON DELETE SET NULL never fires, as
    # tomd never deletes alerts. Migration 0010.
    alert_id: Mapped[int | None] = mapped_column(Id)
    source: Mapped[str] = mapped_column(String(32))  # survey or "upload:<file>"
    mjd: Mapped[float] = mapped_column(Float)  # UTC
    band: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))  # detection | upper_limit | forced
    mag: Mapped[float | None] = mapped_column(Float)
    mag_err: Mapped[float | None] = mapped_column(Float)
    flux: Mapped[float | None] = mapped_column(Float)  # nJy
    flux_err: Mapped[float | None] = mapped_column(Float)
    limit: Mapped[float | None] = mapped_column(Float)
    dedupe: Mapped[str] = mapped_column(String(200))


# ------------------------------------------------------------------- rules --


class Decision(Base):
    """A rule verdict for an alert, recorded with its reason in the alert's transaction."""

    __tablename__ = "decisions"
    # A row per rule and alert: each index is paid that often (migration 0008). The unique index
    # serves rule explain (by alert); ix_decisions_limits the cooldown and per-night look-ups.
    __table_args__ = (UniqueConstraint("alert_id", "rule"),
                      Index("ix_decisions_limits", "rule", "outcome", "target_id", "created_at"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    target_id: Mapped[int | None] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), index=True)
    rule: Mapped[str] = mapped_column(String(200))
    rule_version: Mapped[str] = mapped_column(String(64), default="")
    # fired | not_fired | limited | deduplicated | error | test
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # json on PostgreSQL: not queried inside
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AlertVerdicts(Base):
    """An alert's not-fired verdicts, one row for all of them (migration 0011).

    Most verdicts are "not fired": with 25 rules, 25 decision rows per alert,
    each paying its heap tuple, indexes and foreign-key checks (~14 us of
    PostgreSQL CPU and ~150 bytes each; at Rubin's 10^7 alerts a night, 2.5·10^8
    rows a night). They are kept here as one JSON list per alert instead,
    ``[[rule, rule_version, reason, details], ...]`` in rule order (a not-fired
    verdict's details as ``clause, line, texts, values``, as the rule engine
    hands them over), still every one explainable
    (``repository.decisions_of_alert`` reads both tables).
    Fired, limited, deduplicated, test and error verdicts stay in ``decisions``:
    limits, requests and events point at those rows.
    """

    __tablename__ = "alert_verdicts"

    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), primary_key=True)
    target_id: Mapped[int | None] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    verdicts: Mapped[list[Any]] = mapped_column(JSON, default=list)  # json on PostgreSQL: not queried inside


# ------------------------------------------------------------ observations --


class ObservationRequest(Base):
    """A submission intent and, once submitted, the facility's request.

    ``name`` is the idempotency key sent to the facility; ``decision_id`` is
    unique so a decision becomes at most one request. ``claimed_by`` /
    ``claimed_until`` let one worker at a time own the intent.
    """

    __tablename__ = "observation_requests"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    decision_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id", ondelete="SET NULL"), unique=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), index=True)
    facility: Mapped[str] = mapped_column(String(64), index=True)
    template: Mapped[str | None] = mapped_column(String(100))
    mode: Mapped[str | None] = mapped_column(String(32))
    priority: Mapped[float | None] = mapped_column(Float)
    window_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # intent | submitting | pending | scheduled | in_progress | completed |
    # failed | expired | cancelled | rejected
    state: Mapped[str] = mapped_column(String(16), index=True, default="intent")
    facility_state: Mapped[str | None] = mapped_column(String(64))
    facility_id: Mapped[str | None] = mapped_column(String(100), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)  # what is (was) sent
    estimated_hours: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    cadence: Mapped[dict[str, Any] | None] = mapped_column(Json)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("observation_requests.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    last_polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    proposal: Mapped[str | None] = mapped_column(String(100), index=True)  # for hours per facility and proposal
    # Data retrieval: set when the request (partly) completes; cleared once its products are all stored.
    data_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    data_attempts: Mapped[int] = mapped_column(Integer, default=0)


class ObservationStatus(Base):
    """Every state change of a request, with the facility's own words."""

    __tablename__ = "observation_status"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    request_id: Mapped[int] = mapped_column(
        ForeignKey("observation_requests.id", ondelete="CASCADE"), index=True
    )
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state: Mapped[str] = mapped_column(String(16))
    facility_state: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")


# -------------------------------------------------------------------- data --


class DataProduct(Base):
    """A stored file: downloaded from a facility, uploaded, or a skymap."""

    __tablename__ = "data_products"
    __table_args__ = (UniqueConstraint("facility", "product_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    target_id: Mapped[int | None] = mapped_column(ForeignKey("targets.id", ondelete="CASCADE"), index=True)
    request_id: Mapped[int | None] = mapped_column(
        ForeignKey("observation_requests.id", ondelete="SET NULL"), index=True
    )
    notice_id: Mapped[int | None] = mapped_column(ForeignKey("notices.id", ondelete="SET NULL"))
    facility: Mapped[str] = mapped_column(String(64))  # or "upload", "lvk"
    product_id: Mapped[str] = mapped_column(String(200))  # facility's id; unique per facility
    kind: Mapped[str] = mapped_column(String(32))  # image | spectroscopy | photometry | skymap
    filename: Mapped[str] = mapped_column(String(400))
    storage_key: Mapped[str | None] = mapped_column(String(1000))
    size: Mapped[int | None] = mapped_column(BigInteger)
    md5: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | stored | failed
    meta: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stored_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # download attempts
    error: Mapped[str | None] = mapped_column(Text)  # the last download failure


# ------------------------------------------------------- events and errors --


class OutboxEvent(Base):
    """An event written in the same transaction as the change it describes."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    payload: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    target_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class HookRun(Base):
    """One (hook, event) delivery: a hook that succeeded never runs again for that event."""

    __tablename__ = "hook_runs"
    __table_args__ = (
        UniqueConstraint("hook", "event_id"),
        # Claims and the backlog gauge read only unfinished runs: a partial index keeps them cheap
        # however many finished runs the table holds.
        Index("ix_hook_runs_due", "state", "hook", "next_attempt_at",
              postgresql_where=text("state IN ('pending', 'running')"),
              sqlite_where=text("state IN ('pending', 'running')")),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    hook: Mapped[str] = mapped_column(String(200))
    event_id: Mapped[int] = mapped_column(ForeignKey("outbox.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | running | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DeadLetter(Base):
    """A message that could not be decoded or parsed, kept whole for a retry."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_coords", "topic", "partition", "offset"),
                      UniqueConstraint("stream", "fingerprint"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    stream: Mapped[str] = mapped_column(String(100))
    format: Mapped[str] = mapped_column(String(32))
    topic: Mapped[str | None] = mapped_column(String(249))
    partition: Mapped[int | None] = mapped_column(Integer)
    offset: Mapped[int | None] = mapped_column(BigInteger)
    key: Mapped[bytes | None] = mapped_column(LargeBinary)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The same message delivered again (replay, redelivery after a crash) is one letter:
    # topic[partition]@offset for Kafka, a hash of the bytes for files.
    fingerprint: Mapped[str | None] = mapped_column(String(300))
    headers: Mapped[dict[str, Any] | None] = mapped_column(Json)  # Kafka headers (hop's _id, _test, _format)


class PollState(Base):
    """Per-facility bookkeeping for batched status polls (last poll time)."""

    __tablename__ = "poll_state"

    facility: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cursor: Mapped[str | None] = mapped_column(String(200))


class Notification(Base):
    """One message for one channel, durable until sent (rules and hooks enqueue; the notifier sends).

    ``dedupe_key`` makes enqueueing idempotent: an event delivered twice, or a
    hook retried, queues its message once per channel.
    """

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("channel", "dedupe_key"), Index("ix_notifications_due", "state", "channel"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    channel: Mapped[str] = mapped_column(String(100))
    dedupe_key: Mapped[str] = mapped_column(String(300))
    event_id: Mapped[int | None] = mapped_column(ForeignKey("outbox.id", ondelete="SET NULL"))
    target_id: Mapped[int | None] = mapped_column(BigInteger)
    message: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)  # subject, text, fields, links, image key
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CatalogCache(Base):
    """Answers of catalog services (SIMBAD, NED, Horizons, MPC, TNS), shared by every process."""

    __tablename__ = "catalog_cache"
    __table_args__ = (UniqueConstraint("service", "key"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    service: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(300))
    payload: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    fetched_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
