"""An alert's not-fired verdicts in one alert_verdicts row; every other outcome a decisions row each.

A batch of 3 alerts × 4 rules with mixed outcomes (not-fired compact tuples and
dict details, fired, error, limited, deduplicated, test) goes through
``repository.insert_decisions``: one alert_verdicts row per alert with not-fired
verdicts (in the order given), decisions rows for the rest, and the readers
(decisions_of_alert, all_verdicts, verdict_counts) give every verdict back.
Deleting a target deletes its alert_verdicts rows. End to end, an alert no
rule fires for stores one alert_verdicts row and no decision row, and
``tomd rule explain --json`` still lists each rule's verdict with its reason.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, insert, select, text

from tests.alert_samples import read_ztf, ztf_files
from tests.test_rules_engine import engine, ingest, rule
from tomd.config import Config
from tomd.db import repository as repo
from tomd.db.models import AlertRow, AlertVerdicts, Decision, Target
from tomd.rules.cli import cmd_rule_explain
from tomd.rules.engine import full_reason
from tomd.rules.expr import describe_values

T0 = datetime(2026, 3, 1, 4, 5, 6, 789000, tzinfo=timezone.utc)
T1 = T0 + timedelta(seconds=1)
T2 = T0 + timedelta(seconds=2)
ALERT_TARGET = {1: 1, 2: 1, 3: 2}
NUL_REASON = "alert.fields.name == 'x' raised ValueError: bad value 'a\x00b'"

# (alert, rule) → the row given to insert_decisions; compact not-fired rows carry the texts their
# clause read, then clause, line and the values: (…, reason, texts, clause, line, *values).
ROWS = {
    (1, "r1"): (1, 1, "r1", "v1", "not_fired", T0, "alert.mag < 18 is false", ("alert.mag",), 0, 1, 18.25),
    (1, "r2"): (1, 1, "r2", "v2", "not_fired", T0, "alert.fields.rb > 0.5 is false",
                {"clause": 1, "values": {"alert.fields.rb": 0.25}, "line": 2}),
    (1, "r3"): (1, 1, "r3", "v3", "fired", T0, "all 1 clause true", {"values": {"alert.mag": 18.25}}),
    (1, "r4"): (1, 1, "r4", "v4", "not_fired", T0, "alert.band == 'ztfr' and alert.mag < 19 is false",
                ("alert.band", "alert.mag"), 0, 1, "ztfg", 18.25),
    (2, "r1"): (2, 1, "r1", "v1", "not_fired", T1, "alert.mag < 18 is false",
                {"clause": 0, "values": {"alert.mag": 19.5}, "line": 1}),
    (2, "r2"): (2, 1, "r2", "v2", "error", T1, NUL_REASON, {}),
    (2, "r3"): (2, 1, "r3", "v3", "not_fired", T1, "alert.fields.missing > 1 is false",
                ("alert.fields.missing",), 0, 3, None),
    (2, "r4"): (2, 1, "r4", "v4", "not_fired", T1, "'sn' in target.tags is false", ("target.tags",), 0, 1, []),
    (3, "r1"): (3, 2, "r1", "v1", "limited", T2, "cooldown: fired 1h ago", {"limit": "cooldown"}),
    (3, "r2"): (3, 2, "r2", "v2", "deduplicated", T2, "duplicate of request 7", {}),
    (3, "r3"): (3, 2, "r3", "v3", "test", T2, "all 1 clause true (test mode)", {}),
    (3, "r4"): (3, 2, "r4", "v4", "error", T2, "feature lc_slope raised KeyError", {}),
}
RULES = ("r1", "r2", "r3", "r4")


def _details(row: tuple) -> dict:
    if isinstance(row[7], dict):
        return row[7]
    return {"clause": row[8], "values": dict(zip(row[7], row[10:])), "line": row[9]}


def _fill(db) -> None:
    with db.sessions() as s, s.begin():
        s.execute(insert(Target.__table__), [{"id": i, "name": f"ZTF26aaa{i}", "type": "sidereal"} for i in (1, 2)])
        s.execute(insert(AlertRow.__table__), [
            {"id": a, "source": "ztf", "key": str(a), "kind": "transient", "target_id": t, "time": T0}
            for a, t in ALERT_TARGET.items()])
        # Rule-major, as a batch of rules × alerts comes: each alert's verdicts are interleaved.
        repo.insert_decisions(s, [ROWS[(a, r)] for r in RULES for a in ALERT_TARGET])


def _stored_reason(db, reason: str) -> str:
    # PostgreSQL's text refuses NUL: the COPY writes it escaped (repository.insert_decisions).
    return reason.replace("\x00", "\\x00") if db.kind == "postgresql" else reason


def test_not_fired_verdicts_go_to_one_row_per_alert_and_read_back_by_rule(db):
    _fill(db)
    with db.sessions() as s:
        stored = {v.alert_id: (v.target_id, v.created_at, v.verdicts)
                  for v in s.scalars(select(AlertVerdicts))}
        decisions = sorted((d.alert_id, d.rule, d.outcome) for d in s.scalars(select(Decision)))
    # One row for alert 1 and one for alert 2; none for alert 3, which has no not-fired verdict.
    assert set(stored) == {1, 2}
    assert stored[1][:2] == (1, T0) and stored[2][:2] == (1, T1)
    # In the order given, each entry [rule, version, reason, ...] (the details as a dict, or a compact
    # row's clause, line, texts and values: the readers below make both a dict).
    assert [e[:3] for e in stored[1][2]] == [[r, ROWS[(1, r)][3], ROWS[(1, r)][6]] for r in ("r1", "r2", "r4")]
    assert [e[:3] for e in stored[2][2]] == [[r, ROWS[(2, r)][3], ROWS[(2, r)][6]] for r in ("r1", "r3", "r4")]
    assert decisions == [(1, "r3", "fired"), (2, "r2", "error"), (3, "r1", "limited"), (3, "r2", "deduplicated"),
                         (3, "r3", "test"), (3, "r4", "error")]

    with db.sessions() as s:
        for alert_id, target_id in ALERT_TARGET.items():
            got = repo.decisions_of_alert(s, alert_id)
            assert [v.rule for v in got] == list(RULES)
            for v in got:
                row = ROWS[(alert_id, v.rule)]
                assert (v.alert_id, v.target_id, v.rule_version, v.outcome, v.details, v.created_at) == (
                    alert_id, target_id, row[3], row[4], _details(row), row[5])
                assert v.reason == _stored_reason(db, row[6])
                assert (v.id is None) == (row[4] == "not_fired")  # not-fired verdicts have no decision row
        r4 = next(v for v in repo.decisions_of_alert(s, 1) if v.rule == "r4")
        # Explain spells the values of the clause out, as it did from a decision row.
        assert full_reason(r4.reason, r4.details) == (
            "alert.band == 'ztfr' and alert.mag < 19 is false (alert.band = 'ztfg', alert.mag = 18.25)")
        r3 = next(v for v in repo.decisions_of_alert(s, 2) if v.rule == "r3")
        assert full_reason(r3.reason, r3.details) == (
            f"alert.fields.missing > 1 is false ({describe_values({'alert.fields.missing': None})})")
        every = repo.all_verdicts(s)
        assert len(every) == len(ROWS)
        assert [v.created_at for v in every] == sorted(v.created_at for v in every)
        counts = repo.verdict_counts(s)
    expected: dict[tuple[str, str], int] = {}
    for row in ROWS.values():
        expected[(row[2], row[4])] = expected.get((row[2], row[4]), 0) + 1
    assert counts == expected
    assert sum(counts.values()) == 12 and sum(n for (_, o), n in counts.items() if o == "not_fired") == 6


def test_deleting_a_target_deletes_its_alert_verdicts_rows(db):
    _fill(db)
    if db.kind == "sqlite":
        with db.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # as tomd's engine sets it
    with db.sessions() as s, s.begin():
        # Alert 3 (target 2) gets a not-fired verdict too, from a later batch of other rules.
        repo.insert_decisions(s, [(3, 2, "r5", "v5", "not_fired", T2, "alert.mag < 10 is false",
                                   ("alert.mag",), 0, 1, 18.0)])
        s.execute(text("DELETE FROM targets WHERE id = 1"))
    with db.sessions() as s:
        # alerts.target_id is SET NULL: alerts 1 and 2 stay, their verdict rows go with the target.
        assert s.scalar(select(func.count()).select_from(AlertRow)) == 3
        assert [v.alert_id for v in s.scalars(select(AlertVerdicts))] == [3]
        assert repo.decisions_of_alert(s, 1) == [] and repo.decisions_of_alert(s, 2) == []
        assert [(v.rule, v.outcome) for v in repo.decisions_of_alert(s, 3)] == [
            ("r1", "limited"), ("r2", "deduplicated"), ("r3", "test"), ("r4", "error"), ("r5", "not_fired")]


class App:
    """What cmd_rule_explain reads of tomd's app: its config and sessions."""

    def __init__(self, db):
        self.config = Config()
        self.sessions = db.sessions


@pytest.fixture
def sample(shared_data):
    schema, (rec,) = read_ztf(ztf_files()[0])
    return schema, rec


def test_an_alert_no_rule_fires_for_stores_one_row_and_explain_lists_every_verdict(db, sample, capsys):
    schema, rec = sample
    mag = rec["candidate"]["magpsf"]
    clauses = {"bright": f"alert.mag < {mag - 1}", "real": "alert.fields.real_bogus > 2",
               "late": "alert.mag > 40"}
    rules = [rule(f'name = "{n}"\nwhen = "alert.mag > 0 and {w}"\nadd_tags = ["x"]') for n, w in clauses.items()]
    ingest(db, engine(*rules), [rec], schema)
    with db.sessions() as s:
        (alert_id,) = s.scalars(select(AlertRow.id)).all()
        assert s.scalar(select(func.count()).select_from(Decision)) == 0
        assert [v.alert_id for v in s.scalars(select(AlertVerdicts))] == [alert_id]

    assert cmd_rule_explain(App(db), argparse.Namespace(alert_id=alert_id, json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alert"]["alert_id"] == alert_id
    got = {d["rule"]: d for d in out["decisions"]}
    assert sorted(got) == sorted(clauses)
    for name, clause in clauses.items():
        d = got[name]
        assert d["outcome"] == "not_fired" and d["decision_id"] is None and d["request"] is None
        assert d["details"]["clause"] == 1
        # The reason names the false clause and spells out the values it read.
        assert d["reason"] == f"{clause} is false ({describe_values(d['details']['values'])})"
    assert got["bright"]["details"]["values"]["alert.mag"] == pytest.approx(mag)
