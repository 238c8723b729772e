"""Migration 0007: alerts.payload becomes json (lz4-compressed where the server has it) on PostgreSQL.

A database at 0006 holding alerts (jsonb payloads, a NUL escape and nested
values included) is upgraded; every payload reads back equal, the column is
json, and a downgrade restores jsonb with the same contents.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text

from tests.conftest import pg_database_at
from tomd.db import migrate
from tomd.db.models import AlertRow

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
PAYLOADS = [
    {"candidate": {"magpsf": 18.25, "ssnamenr": "null", "isdiffpos": "t"}, "prv_candidates": [{"jd": 1.5}] * 3},
    {"text": "NUL \u0000 inside", "list": [1, 2.5, None, True], "nested": {"a": {"b": [{}]}}},
    None,
]


@pytest.fixture
def pg_at_0006():
    with pg_database_at("0006") as engine:
        yield engine


def _column(engine) -> tuple[str, str | None]:
    with engine.connect() as c:
        return c.execute(text(
            "SELECT format_type(a.atttypid, a.atttypmod), nullif(a.attcompression, '') FROM pg_attribute a "
            "WHERE a.attrelid = 'alerts'::regclass AND a.attname = 'payload'")).one()


def test_payloads_survive_the_type_change_both_ways(pg_at_0006):
    engine = pg_at_0006
    # The payloads have NUL escapes jsonb refuses: these rows go in without one.
    before = [p for p in PAYLOADS if p is None or "text" not in p]
    with migrate.sessions(engine).begin() as s:
        for i, p in enumerate(before):
            s.add(AlertRow(source="ztf", key=str(i), kind="transient", time=T0, fields={"i": i}, payload=p))
    assert _column(engine)[0] == "jsonb"
    migrate.upgrade(engine)
    typ, compression = _column(engine)
    assert typ == "json"
    with engine.connect() as c:
        lz4 = c.execute(text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                             "WHERE name = 'default_toast_compression'")).scalar()
    assert compression == ("l" if lz4 else None)  # pg_attribute spells lz4 'l'
    with migrate.sessions(engine).begin() as s:
        s.add(AlertRow(source="ztf", key="nul", kind="transient", time=T0, fields={}, payload=PAYLOADS[1]))
    with migrate.sessions(engine)() as s:
        got = {r.key: r.payload for r in s.scalars(select(AlertRow))}
    assert got == {**{str(i): p for i, p in enumerate(before)}, "nul": PAYLOADS[1]}

    with migrate.sessions(engine).begin() as s:  # jsonb cannot hold \u0000: out before going back
        s.execute(text("DELETE FROM alerts WHERE key = 'nul'"))
    _downgrade(engine, "0006")
    assert _column(engine) == ("jsonb", None)
    with migrate.sessions(engine)() as s:
        assert {r.key: r.payload for r in s.scalars(select(AlertRow))} == {str(i): p for i, p in enumerate(before)}


def _downgrade(engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        cfg = migrate._alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
