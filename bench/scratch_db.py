"""A throw-away database for a benchmark run: SQLite in a temp dir, or a fresh
PostgreSQL database (dropped afterwards) on the server the tests use."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable

from sqlalchemy import create_engine, text

ADMIN_URL = os.environ.get("TOMD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def scratch_database(kind: str, label: str = "bench") -> tuple[str, Callable[[], None]]:
    """(url, drop) for a new empty database of ``kind`` ("sqlite" or "postgresql")."""
    if kind == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix=f'tomd-{label}-')}/{label}.db", lambda: None
    name = f"tomd_{label}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", drop
