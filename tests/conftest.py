"""Shared fixtures: databases (SQLite and PostgreSQL), sample data paths.

Every database test runs on both backends through the ``db`` fixture. The
PostgreSQL side gets a database of its own per test run
(``tomd_test_<pid>_<random>``), migrated once and emptied between tests, so
concurrent runs never collide. Set TOMD_TEST_PG_URL to point elsewhere
(default postgresql+psycopg://postgres@127.0.0.1:5432/postgres as the
admin connection).
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from tomd.db import migrate
from tomd.db.models import Base

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ADMIN_URL = os.environ.get("TOMD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

try:  # Kafka broker fixtures (tests/kafka_fixtures.py)
    from tests.kafka_fixtures import *  # noqa: F401,F403
except ImportError:
    pass


@dataclass
class Db:
    """A migrated, empty database for one test."""

    kind: str  # "sqlite" | "postgresql"
    url: str
    engine: Engine
    sessions: sessionmaker[Session]


@pytest.fixture(scope="session")
def pg_database():
    """URL of a fresh migrated PostgreSQL database for this test run."""
    from sqlalchemy import create_engine

    name = f"tomd_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            _drop_orphans(c)
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - report and stop, CI must see it
        pytest.fail(f"PostgreSQL is needed at {ADMIN_URL} (run `make test`, which starts it): {exc}")
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = migrate.connect(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@contextmanager
def pg_database_at(revision: str):
    """An engine on a new PostgreSQL database migrated to ``revision`` (migration tests), dropped after.

    Named like the run's own (``tomd_test_<pid>_<random>``), so a killed run's is dropped by the next.
    """
    from sqlalchemy import create_engine

    name = f"tomd_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    engine = migrate.connect(ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        migrate.upgrade(engine, revision)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _drop_orphans(c) -> None:
    """Drop databases left by test runs that were killed (their process is gone)."""
    for (db_name,) in c.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 'tomd_test_%'")):
        parts = db_name.split("_")
        if len(parts) == 4 and parts[2].isdigit() and not _alive(int(parts[2])):
            c.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = migrate.connect(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    return path


def _empty_pg(engine: Engine) -> None:
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as c:
        c.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Db:
    if request.param == "sqlite":
        path = tmp_path / "tomd.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
        engine = migrate.connect(url)
    else:
        url = request.getfixturevalue("pg_database")
        engine = migrate.connect(url)
        _empty_pg(engine)
    yield Db(request.param, url, engine, migrate.sessions(engine))
    engine.dispose()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real alert samples not found at {SHARED_DATA}")
    return SHARED_DATA
