"""When each target extra was set (targets.extras_set_at, schema 0009): every writer stamps the keys it
sets or changes, a key given again unchanged keeps its time, targets made without extras (ingest's)
write no times; migration 0009 keeps every existing extra, of unknown time."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from tests.conftest import pg_database_at
from tomd.db import migrate
from tomd.db.models import Json, Target, UTCDateTime
from tomd.targets import store
from tomd.targets.importer import import_file
from tomd.targets.model import TargetSpec


def _set_at(db, name):
    with db.sessions() as s:
        t = s.scalar(select(Target).where(Target.name == name))
        return dict(t.extras), t.extras_set_at


def _near_now(iso: str) -> bool:
    return abs(datetime.fromisoformat(iso) - datetime.now(timezone.utc)) < timedelta(minutes=5)


def test_upsert_stamps_each_extra_it_sets_or_changes(db):
    with db.sessions.begin() as s:
        store.upsert(s, TargetSpec("SN 2026a", ra=10.0, dec=10.0, extras={"redshift": 0.05, "host": "NGC 1"}))
        store.upsert(s, TargetSpec("SN 2026b", ra=20.0, dec=20.0))
    extras, set_at = _set_at(db, "SN 2026a")
    assert extras == {"redshift": 0.05, "host": "NGC 1"}
    assert set(set_at) == {"redshift", "host"} and all(_near_now(v) for v in set_at.values())
    assert _set_at(db, "SN 2026b") == ({}, None)  # no extras, no times written
    # Make the first times old, so a new stamp is told apart from them.
    old = (datetime.now(timezone.utc) - timedelta(days=30)).isoformat()
    with db.sessions.begin() as s:
        s.execute(sa.update(Target).where(Target.name == "SN 2026a")
                  .values(extras_set_at={"redshift": old, "host": old}))
    with db.sessions.begin() as s:
        res = store.upsert(s, TargetSpec("SN 2026a", ra=10.0, dec=10.0, extras={"redshift": 0.06, "host": "NGC 1", "class": "SN Ia"}))
    assert res.changes == {"extras.redshift": 0.06, "extras.class": "SN Ia"}
    extras, set_at = _set_at(db, "SN 2026a")
    assert extras == {"redshift": 0.06, "host": "NGC 1", "class": "SN Ia"}
    assert set_at["host"] == old  # given again unchanged: keeps its time
    assert _near_now(set_at["redshift"]) and _near_now(set_at["class"])


def test_a_merge_into_a_target_of_unknown_times_stamps_only_what_it_sets(db):
    with db.sessions.begin() as s:
        store.upsert(s, TargetSpec("AT 2026c", ra=30.0, dec=30.0, extras={"redshift": 0.1}))
        s.execute(sa.update(Target).values(extras_set_at=None))  # as a row from before schema 0009
    with db.sessions.begin() as s:
        store.upsert(s, TargetSpec("AT 2026c", ra=30.0, dec=30.0, extras={"host": "M 101"}))
    extras, set_at = _set_at(db, "AT 2026c")
    assert extras == {"redshift": 0.1, "host": "M 101"}
    assert list(set_at) == ["host"]  # redshift's time stays unknown


def test_import_stamps_extras_and_writes_no_times_for_rows_without(db, tmp_path):
    """The batch path (upsert_many; COPY on PostgreSQL): a batch mixing targets with and without extras."""
    f = tmp_path / "t.csv"
    f.write_text("name,ra,dec,redshift\nSN 2026d,40.0,40.0,0.02\nSN 2026e,41.0,41.0,\n")
    report = import_file(db.sessions, f, radius_arcsec=1.5, progress=False)
    assert not report.errors
    extras, set_at = _set_at(db, "SN 2026d")
    assert extras == {"redshift": 0.02} and list(set_at) == ["redshift"] and _near_now(set_at["redshift"])
    assert _set_at(db, "SN 2026e") == ({}, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_at_0008(request, tmp_path):
    if request.param == "sqlite":
        engine = migrate.connect(f"sqlite:///{tmp_path / 'old.db'}")
        migrate.upgrade(engine, "0008")
        yield engine
        engine.dispose()
        return
    with pg_database_at("0008") as engine:
        yield engine


def test_migration_0009_keeps_every_extra_with_unknown_time(engine_at_0008):
    engine = engine_at_0008
    # The table as it stood at 0008 (the model has the new column already).
    old = sa.table("targets", sa.column("name"), sa.column("type"), sa.column("extras", Json),
                   sa.column("created_at", UTCDateTime()), sa.column("modified_at", UTCDateTime()))
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    with engine.begin() as c:
        c.execute(old.insert(), [
            {"name": "SN 2025x", "type": "sidereal", "extras": {"redshift": 0.05, "class": "SN Ia"},
             "created_at": now, "modified_at": now},
            {"name": "SN 2025y", "type": "sidereal", "extras": {}, "created_at": now, "modified_at": now},
        ])
    assert "extras_set_at" not in {c["name"] for c in sa.inspect(engine).get_columns("targets")}
    migrate.upgrade(engine)
    with migrate.sessions(engine)() as s:
        got = {t.name: (t.extras, t.extras_set_at) for t in s.scalars(select(Target))}
    assert got == {"SN 2025x": ({"redshift": 0.05, "class": "SN Ia"}, None), "SN 2025y": ({}, None)}
    if engine.dialect.name == "postgresql":
        cols = {c["name"]: str(c["type"]) for c in sa.inspect(engine).get_columns("targets")}
        assert cols["extras_set_at"] == "JSON"
