"""Migration 0011: an alert's not-fired verdicts in one alert_verdicts row.

A database at 0010 holding targets, alerts and old-style decision rows (not
fired and fired, a row each) is upgraded: those rows stay in decisions and
are still read by decisions_of_alert and all_verdicts; alert_verdicts comes
with its primary key, target_id index and both foreign keys cascading (and
lz4 on ``verdicts`` where the PostgreSQL server has it). A downgrade writes
every alert_verdicts entry back as a not_fired decision row and drops the
table, and the upgrade runs again.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import JSON, Engine, column, insert, inspect, select, text
from sqlalchemy import table as sa_table

from tests.conftest import pg_database_at
from tomd.db import migrate
from tomd.db import repository as repo
from tomd.db.models import UTCDateTime

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)

# Schema 0010's columns (Core: today's models describe the schema after 0011).
_TARGETS = sa_table("targets", column("id"), column("name"), column("type"), column("extras", JSON),
                    column("created_at", UTCDateTime), column("modified_at", UTCDateTime))
_ALERTS = sa_table("alerts", column("id"), column("source"), column("key"), column("kind"), column("target_id"),
                   column("time", UTCDateTime), column("fields", JSON), column("ingested_at", UTCDateTime))
_DECISION_COLUMNS = ("alert_id", "target_id", "rule", "rule_version", "outcome", "reason", "details", "created_at")
_DECISIONS = sa_table("decisions", column("id"), column("alert_id"), column("target_id"), column("rule"),
                      column("rule_version"), column("outcome"), column("reason"), column("details", JSON),
                      column("created_at", UTCDateTime))

# Old-style rows: one per (alert, rule), whatever the outcome.
OLD = [
    (1, 1, "bright", "v1", "not_fired", "alert.mag < 18 is false",
     {"clause": 0, "values": {"alert.mag": 18.25}, "line": 1}, T0),
    (1, 1, "faint", "v2", "fired", "all 1 clause true", {}, T0),
    (2, 1, "bright", "v1", "not_fired", "alert.mag < 18 is false",
     {"clause": 0, "values": {"alert.mag": 19.5}, "line": 1}, T0 + timedelta(seconds=1)),
    (3, 2, "faint", "v2", "not_fired", "alert.fields.rb > 0.5 is false",
     {"clause": 1, "values": {"alert.fields.rb": None}, "line": 2}, T0 + timedelta(seconds=2)),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_at_0010(request, tmp_path):
    if request.param == "sqlite":
        engine = migrate.connect(f"sqlite:///{tmp_path / 'old.db'}")
        migrate.upgrade(engine, "0010")
        yield engine
        engine.dispose()
        return
    with pg_database_at("0010") as engine:
        yield engine


def _fill(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(insert(_TARGETS), [
            {"id": i, "name": f"ZTF26aaa{i}", "type": "sidereal", "extras": {}, "created_at": T0, "modified_at": T0}
            for i in (1, 2)])
        c.execute(insert(_ALERTS), [
            {"id": i, "source": "ztf", "key": str(i), "kind": "transient", "target_id": 1 if i < 3 else 2,
             "time": T0, "fields": {}, "ingested_at": T0}
            for i in (1, 2, 3, 4)])
        c.execute(insert(_DECISIONS), [dict(zip(_DECISION_COLUMNS, d)) for d in OLD])


def _decision_rows(engine: Engine) -> list[tuple]:
    """The decisions table as 0010 has it, without ids, by alert then rule."""
    cols = [getattr(_DECISIONS.c, c) for c in _DECISION_COLUMNS]
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(select(*cols).order_by(_DECISIONS.c.alert_id, _DECISIONS.c.rule))]


def _as_verdicts(rows) -> list[tuple]:
    return [(v.alert_id, v.target_id, v.rule, v.rule_version, v.outcome, v.reason, v.details, v.created_at)
            for v in rows]


def _foreign_keys(engine: Engine) -> dict[str, tuple]:
    """{constrained column: (referred table, referred columns, ON DELETE)} of alert_verdicts."""
    return {fk["constrained_columns"][0]: (fk["referred_table"], fk["referred_columns"],
                                           (fk.get("options") or {}).get("ondelete", "").upper())
            for fk in inspect(engine).get_foreign_keys("alert_verdicts")}


def _downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        cfg = migrate._alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def _server_has_lz4(engine: Engine) -> bool:
    with engine.connect() as c:
        return bool(c.execute(text(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")).scalar())


def test_upgrade_keeps_old_decision_rows_readable_and_creates_alert_verdicts(engine_at_0010):
    engine = engine_at_0010
    _fill(engine)
    assert not inspect(engine).has_table("alert_verdicts")

    migrate.upgrade(engine, "0011")

    assert migrate.current_revision(engine) == "0011"
    assert _decision_rows(engine) == OLD  # the old rows stay where they were
    insp = inspect(engine)
    assert insp.get_pk_constraint("alert_verdicts")["constrained_columns"] == ["alert_id"]
    assert {ix["name"]: ix["column_names"] for ix in insp.get_indexes("alert_verdicts")} == {
        "ix_alert_verdicts_target_id": ["target_id"]}
    assert _foreign_keys(engine) == {"alert_id": ("alerts", ["id"], "CASCADE"),
                                     "target_id": ("targets", ["id"], "CASCADE")}
    if engine.dialect.name == "postgresql":
        with engine.connect() as c:
            compression = c.execute(text(
                "SELECT attcompression FROM pg_attribute WHERE attrelid = 'alert_verdicts'::regclass "
                "AND attname = 'verdicts'")).scalar()
        assert compression == ("l" if _server_has_lz4(engine) else "")

    # The readers see the old rows as before, beside a new alert's compact one.
    with migrate.sessions(engine)() as s, s.begin():
        repo.insert_decisions(s, [(4, 2, "bright", "v1", "not_fired", T0 + timedelta(seconds=3),
                                   "alert.mag < 18 is false", {"clause": 0, "values": {}, "line": 1})])
    with migrate.sessions(engine)() as s:
        assert _as_verdicts(repo.decisions_of_alert(s, 1)) == OLD[:2]
        assert all(v.id is not None for v in repo.decisions_of_alert(s, 1))  # decision rows, ids kept
        assert _as_verdicts(repo.decisions_of_alert(s, 3)) == [OLD[3]]
        new = (4, 2, "bright", "v1", "not_fired", "alert.mag < 18 is false",
               {"clause": 0, "values": {}, "line": 1}, T0 + timedelta(seconds=3))
        assert _as_verdicts(repo.all_verdicts(s)) == OLD + [new]  # oldest first
        assert repo.verdict_counts(s) == {("bright", "not_fired"): 3, ("faint", "fired"): 1,
                                          ("faint", "not_fired"): 1}
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM alert_verdicts")).scalar() == 1
        assert c.execute(text("SELECT count(*) FROM decisions")).scalar() == len(OLD)


def test_downgrade_writes_verdicts_back_as_decision_rows_and_upgrade_runs_again(engine_at_0010):
    engine = engine_at_0010
    _fill(engine)
    migrate.upgrade(engine, "0011")
    at = T0 + timedelta(seconds=3, microseconds=250)
    details_a = {"clause": 0, "values": {"alert.mag": 17.5, "target.tags": ["sn"]}, "line": 1}
    details_b = {"clause": 2, "values": {"alert.band": "ztfg"}, "line": 3}
    with migrate.sessions(engine)() as s, s.begin():
        repo.insert_decisions(s, [
            (4, 2, "alpha", "a1", "not_fired", at, "alert.mag > 18 is false", details_a),
            (4, 2, "beta", "b1", "not_fired", at, "alert.band == 'ztfr' is false", details_b),
            # The engine's compact row: (…, reason, texts, clause, line, *values).
            (4, 2, "delta", "d1", "not_fired", at, "alert.fields.rb > 0.5 and alert.mag < 19 is false",
             ("alert.fields.rb", "alert.mag"), 1, 2, None, 17.5),
            (4, 2, "gamma", "c1", "fired", at, "all 1 clause true", {}),
        ])
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM alert_verdicts")).scalar() == 1

    _downgrade(engine, "0010")

    assert migrate.current_revision(engine) == "0010"
    assert not inspect(engine).has_table("alert_verdicts")
    back = [(4, 2, "alpha", "a1", "not_fired", "alert.mag > 18 is false", details_a, at),
            (4, 2, "beta", "b1", "not_fired", "alert.band == 'ztfr' is false", details_b, at),
            (4, 2, "delta", "d1", "not_fired", "alert.fields.rb > 0.5 and alert.mag < 19 is false",
             {"clause": 1, "values": {"alert.fields.rb": None, "alert.mag": 17.5}, "line": 2}, at),
            (4, 2, "gamma", "c1", "fired", "all 1 clause true", {}, at)]
    assert _decision_rows(engine) == OLD + back

    migrate.upgrade(engine, "0011")

    assert migrate.current_revision(engine) == "0011"
    assert inspect(engine).has_table("alert_verdicts")
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM alert_verdicts")).scalar() == 0
    with migrate.sessions(engine)() as s:  # the written-back rows read as any old row
        assert _as_verdicts(repo.decisions_of_alert(s, 4)) == back


def test_downgrade_writes_a_not_fired_reason_holding_nul_visibly() -> None:
    """JSON keeps a NUL a reason quoted; decisions.reason (text) refuses it on PostgreSQL: the
    downgrade writes it as insert_decisions writes an error's, visibly, and does not fail."""
    with pg_database_at("0010") as engine:
        _fill(engine)
        migrate.upgrade(engine, "0011")
        with migrate.sessions(engine)() as s, s.begin():
            repo.insert_decisions(s, [(4, 2, "x", "v", "not_fired", T0, "alert.band == 'a\x00b' is false", {})])
        _downgrade(engine, "0010")
        assert migrate.current_revision(engine) == "0010"
        with engine.connect() as c:
            reason = c.execute(text("SELECT reason FROM decisions WHERE rule = 'x'")).scalar_one()
        assert reason == "alert.band == 'a\\x00b' is false"
