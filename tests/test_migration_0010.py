"""Migration 0010: photometry loses ix_photometry_target_id and the foreign key on alert_id.

A database at 0009 holding targets, alerts and photometry (points with and
without an alert, upper limits, NULLs) is upgraded: every point reads back
with every value, the index and the alert_id foreign key are gone, the
unique (target_id, dedupe) and the target_id foreign key remain, and
deleting a target still deletes its points (SQLite with foreign keys on, as
tomd's engine sets it). A downgrade restores both, a point naming an alert
that is not there losing its alert_id, and the upgrade runs again.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import JSON, Engine, column, insert, inspect, select, text
from sqlalchemy import table as sa_table

from tests.conftest import pg_database_at
from tomd.db import migrate
from tomd.db.models import UTCDateTime

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)

# Schema 0009's columns (Core: today's models describe the schema after 0010).
_TARGETS = sa_table("targets", column("id"), column("name"), column("type"), column("extras", JSON),
                    column("created_at", UTCDateTime), column("modified_at", UTCDateTime))
_ALERTS = sa_table("alerts", column("id"), column("source"), column("key"), column("kind"), column("target_id"),
                   column("time", UTCDateTime), column("fields", JSON), column("ingested_at", UTCDateTime))
_PHOT_COLUMNS = ("id", "target_id", "alert_id", "source", "mjd", "band", "kind", "mag", "mag_err", "flux",
                 "flux_err", "limit", "dedupe")
_PHOT = sa_table("photometry", *(column(c) for c in _PHOT_COLUMNS))

POINTS = [
    (1, 1, 1, "ztf", 60000.125, "ztfg", "detection", 18.25, 0.05, 1.8e5, 9.0e3, None, "ztf:1"),
    (2, 1, 1, "ztf", 60001.5, "ztfr", "upper_limit", None, None, None, None, 20.5, "ztf:2"),
    (3, 1, 2, "ztf", 60002.75, "ztfg", "forced", 19.5, 0.2, -4.5e3, 1.2e3, None, "ztf:3"),
    (4, 1, None, "upload:night1.csv", 60003.0, "r", "detection", 17.0, 0.01, None, None, None, "up:4"),
    (5, 2, 3, "ztf", 60004.0, "ztfi", "detection", 20.0, 0.3, 3.6e4, 5.0e3, None, "ztf:5"),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_at_0009(request, tmp_path):
    if request.param == "sqlite":
        engine = migrate.connect(f"sqlite:///{tmp_path / 'old.db'}")
        migrate.upgrade(engine, "0009")
        yield engine
        engine.dispose()
        return
    with pg_database_at("0009") as engine:
        yield engine


def _fill(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(insert(_TARGETS), [
            {"id": i, "name": f"ZTF26aaa{i}", "type": "sidereal", "extras": {}, "created_at": T0, "modified_at": T0}
            for i in (1, 2)])
        c.execute(insert(_ALERTS), [
            {"id": i, "source": "ztf", "key": str(i), "kind": "transient", "target_id": 1 if i < 3 else 2,
             "time": T0, "fields": {}, "ingested_at": T0}
            for i in (1, 2, 3)])
        c.execute(insert(_PHOT), [dict(zip(_PHOT_COLUMNS, p)) for p in POINTS])


def _points(engine: Engine) -> list[tuple]:
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(select(_PHOT).order_by(_PHOT.c.id))]


def _indexes(engine: Engine) -> dict[str, list[str]]:
    return {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("photometry")}


def _foreign_keys(engine: Engine) -> dict[str, tuple]:
    """{constrained column: (referred table, referred columns, ON DELETE)} of photometry."""
    return {fk["constrained_columns"][0]: (fk["referred_table"], fk["referred_columns"],
                                           (fk.get("options") or {}).get("ondelete", "").upper())
            for fk in inspect(engine).get_foreign_keys("photometry")}


def _unique(engine: Engine) -> dict[str, list[str]]:
    return {u["name"]: u["column_names"] for u in inspect(engine).get_unique_constraints("photometry")}


def _downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        cfg = migrate._alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_upgrade_keeps_points_drops_index_and_alert_fk_keeps_cascade(engine_at_0009):
    engine = engine_at_0009
    _fill(engine)
    assert "ix_photometry_target_id" in _indexes(engine)
    assert _foreign_keys(engine)["alert_id"] == ("alerts", ["id"], "SET NULL")

    migrate.upgrade(engine, "0010")

    assert migrate.current_revision(engine) == "0010"
    assert _points(engine) == POINTS
    assert "ix_photometry_target_id" not in _indexes(engine)
    assert _foreign_keys(engine) == {"target_id": ("targets", ["id"], "CASCADE")}
    assert _unique(engine) == {"uq_photometry_target_id_dedupe": ["target_id", "dedupe"]}
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # as tomd runs it

    with engine.begin() as c:
        # No check on alert_id any more: a point may name an alert id that is not there.
        c.execute(insert(_PHOT), [dict(zip(_PHOT_COLUMNS, (6, 2, 999, "ztf", 60005.0, "ztfg", "detection",
                                                           19.0, 0.1, 6.0e4, 5.0e3, None, "ztf:6")))])
        c.execute(text("DELETE FROM targets WHERE id = 1"))
    assert [p[0] for p in _points(engine)] == [5, 6]  # target 1's points went with it


def test_downgrade_restores_index_and_fk_and_upgrade_runs_again(engine_at_0009):
    engine = engine_at_0009
    _fill(engine)
    migrate.upgrade(engine)
    with engine.begin() as c:
        c.execute(insert(_PHOT), [dict(zip(_PHOT_COLUMNS, (6, 2, 999, "ztf", 60005.0, "ztfg", "detection",
                                                           19.0, 0.1, 6.0e4, 5.0e3, None, "ztf:6")))])

    _downgrade(engine, "0009")

    assert migrate.current_revision(engine) == "0009"
    assert _indexes(engine).get("ix_photometry_target_id") == ["target_id"]
    assert _foreign_keys(engine) == {"target_id": ("targets", ["id"], "CASCADE"),
                                     "alert_id": ("alerts", ["id"], "SET NULL")}
    assert _unique(engine) == {"uq_photometry_target_id_dedupe": ["target_id", "dedupe"]}
    orphan = (6, 2, None, "ztf", 60005.0, "ztfg", "detection", 19.0, 0.1, 6.0e4, 5.0e3, None, "ztf:6")
    assert _points(engine) == POINTS + [orphan]  # the alert 999 is not there: the link went, the point stayed
    with engine.begin() as c:  # the constraint is back and acts: deleting an alert unlinks its points
        c.execute(text("DELETE FROM alerts WHERE id = 3"))
    assert [p[2] for p in _points(engine)] == [1, 1, 2, None, None, None]

    migrate.upgrade(engine, "0010")

    assert migrate.current_revision(engine) == "0010"
    assert "ix_photometry_target_id" not in _indexes(engine)
    assert _foreign_keys(engine) == {"target_id": ("targets", ["id"], "CASCADE")}
    assert len(_points(engine)) == 6
