"""Migration 0008: decisions keep one index for the limits (and the unique one), details as json on
PostgreSQL; magnitudes stored for negative fluxes (ZTF negative subtractions, before the parsers
stopped giving them one) are cleared, positive ones kept."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import inspect, select

from tests.conftest import pg_database_at
from tomd.db import migrate
from tomd.db.models import AlertRow, Photometry, Target

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_at_0007(request, tmp_path):
    if request.param == "sqlite":
        engine = migrate.connect(f"sqlite:///{tmp_path / 'old.db'}")
        migrate.upgrade(engine, "0007")
        yield engine
        engine.dispose()
        return
    with pg_database_at("0007") as engine:
        yield engine


def test_negative_fluxes_lose_their_magnitude_and_decisions_their_extra_indexes(engine_at_0007):
    engine = engine_at_0007
    with migrate.sessions(engine).begin() as s:
        t = Target(name="ZTF17aaacxxf", ra=10.0, dec=20.0)
        s.add(t)
        s.flush()
        neg = AlertRow(source="ztf", key="1", kind="transient", time=T0, target_id=t.id, fields={},
                       mag=15.26, mag_err=0.1, flux=-3.0e6)
        pos = AlertRow(source="ztf", key="2", kind="transient", time=T0, target_id=t.id, fields={},
                       mag=19.03, mag_err=0.1, flux=8.6e4)
        s.add_all([neg, pos])
        s.add_all([
            Photometry(target_id=t.id, mjd=60000.1, band="ztfg", kind="detection", mag=15.26, flux=-3.0e6,
                       source="ztf", dedupe="a"),
            Photometry(target_id=t.id, mjd=60000.2, band="ztfg", kind="detection", mag=19.03, flux=8.6e4,
                       source="ztf", dedupe="b"),
            Photometry(target_id=t.id, mjd=60000.3, band="ztfg", kind="upper_limit", limit=20.5,
                       source="ztf", dedupe="c"),
        ])
    before = {ix["name"] for ix in inspect(engine).get_indexes("decisions")}
    assert {"ix_decisions_rule", "ix_decisions_outcome", "ix_decisions_created_at"} <= before
    migrate.upgrade(engine)
    with migrate.sessions(engine)() as s:
        mags = {p.dedupe: (p.mag, p.flux) for p in s.scalars(select(Photometry))}
        alerts = {a.key: a.mag for a in s.scalars(select(AlertRow))}
    assert mags == {"a": (None, -3.0e6), "b": (19.03, 8.6e4), "c": (None, None)}
    assert alerts == {"1": None, "2": 19.03}
    after = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("decisions")}
    assert after.get("ix_decisions_limits") == ["rule", "outcome", "target_id", "created_at"]
    assert not {"ix_decisions_alert_id", "ix_decisions_rule", "ix_decisions_outcome",
                "ix_decisions_created_at"} & set(after)
    if engine.dialect.name == "postgresql":
        cols = {c["name"]: str(c["type"]) for c in inspect(engine).get_columns("decisions")}
        assert cols["details"] == "JSON"
