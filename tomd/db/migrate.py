"""Engines and migrations.

``connect(url)`` builds an engine with the settings tomd relies on (SQLite:
foreign keys on, WAL, a busy timeout; PostgreSQL: pre-ping). ``upgrade``
runs the Alembic migrations shipped in the package. ``ensure_current``
refuses a database whose schema is not at the head revision and says what
to run: commands never write into an unmigrated database.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tomd.alerts.model import PayloadJson
from tomd.errors import DatabaseNotReady, redact

MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x746F6D64  # "tomd"


def json_bytes(value) -> bytes:
    # orjson: ~8x faster than json.dumps for alert payloads (a large share of
    # ingest time otherwise); NaN/Infinity become null, as JSON requires.
    if isinstance(value, PayloadJson):  # serialised already, by its parser or a parse worker
        return value
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def _json_dumps(value) -> str:
    return json_bytes(value).decode()


def connect(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """An engine for ``url`` (sqlite:///path or postgresql+psycopg://...)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30}, json_serializer=_json_dumps)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # Let SQLAlchemy's "begin" event open transactions (below), not pysqlite.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            # SQLite's default page cache is 2 MB: the sky and name indexes of a
            # million targets then live on disk and every lookup pays for it.
            cur.execute("PRAGMA cache_size=-65536")
            cur.execute("PRAGMA mmap_size=268435456")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # Take the write lock at BEGIN: two processes that both look for a
            # target and then create it are serialised, not interleaved.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, echo=echo, pool_size=pool_size, pool_pre_ping=True, json_serializer=_json_dumps)


def sessions(engine: Engine) -> sessionmaker[Session]:
    """The session factory; objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise DatabaseNotReady(
            f"cannot reach the database {redact(engine.url.render_as_string())}: "
            f"{redact(str(exc.orig) if exc.orig else str(exc)).strip()}"
        ) from None


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to ``revision``; returns (before, after)."""
    before = current_revision(engine)
    cfg = _alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Several replicas may start at once: one migrates, the others wait.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return before, current_revision(engine) or ""


def ensure_current(engine: Engine) -> None:
    """Raise DatabaseNotReady unless the schema is at the head revision."""
    current = current_revision(engine)
    head = head_revision()
    where = redact(engine.url.render_as_string(hide_password=True))
    if current is None:
        raise DatabaseNotReady(f"the database {where} has no tomd schema yet: run `tomd db upgrade`")
    if current != head:
        raise DatabaseNotReady(
            f"the database {where} is at schema revision {current}, this tomd needs {head}: "
            "run `tomd db upgrade`"
        )
