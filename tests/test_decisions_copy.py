"""The decision rows' COPY on PostgreSQL fails the way SQLAlchemy would (so the ingest retries an
outage and finds a refused row, instead of stopping the stream), and a NUL in a reason is stored."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError

from tomd.db import repository as repo
from tomd.db.models import AlertRow, Decision

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _row(alert_id, reason="alert.mag < 17 is false", outcome="error"):
    # An error's reason can quote an alert's value (a NUL among them); errors get a decisions row each.
    return (alert_id, None, "bright", "v1", outcome, T0, reason, {"clause": 0})


def test_a_refused_decision_row_raises_as_sqlalchemy_would(db):
    if db.kind != "postgresql":
        pytest.skip("the COPY path is PostgreSQL's")
    with pytest.raises(IntegrityError) as info:  # no alert 999999: the foreign key refuses it
        with db.sessions.begin() as s:
            repo.insert_decisions(s, [_row(999999)])
    assert isinstance(info.value, DBAPIError) and "foreign key" in str(info.value.orig).lower()


def test_a_nul_in_a_reason_is_stored_visibly(db):
    with db.sessions.begin() as s:
        a = AlertRow(source="ztf", key="1", kind="transient", time=T0, fields={})
        s.add(a)
        s.flush()
        repo.insert_decisions(s, [_row(a.id, "ZeroDivisionError: bad\x00name")])
    with db.sessions() as s:
        (d,) = s.scalars(select(Decision))
    assert d.reason in ("ZeroDivisionError: bad\\x00name", "ZeroDivisionError: bad\x00name")
    if db.kind == "postgresql":
        assert d.reason == "ZeroDivisionError: bad\\x00name"
