"""Cadence: parsing, planning, and series made by the poller against the simulated observatory."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from tomd.cadence import Cadence, CadenceError, cadence_from_table, initial, parse_cadence, plan_next, series_name
from tomd.db import repository as repo
from tomd.db.models import ObservationRequest, OutboxEvent, PollState
from tomd.facilities.lco import LCOClient
from tomd.facilities.sim import SimObservatory
from tomd.status import Poller
from tomd.submit import SubmitSettings, Submitter, create_intent
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert

T0 = datetime(2026, 11, 28, 0, 0, tzinfo=timezone.utc)
TEMPLATES = {"1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"],
                        "exposure_time": 120}}
FAST = SubmitSettings(lease_s=30, backoff_base_s=0.01, backoff_cap_s=0.05, settle_s=0.05, batch=50)


# ------------------------------------------------------------------ parsing --


@pytest.mark.parametrize("text, expect", [
    ("every 1d x5", Cadence(every_s=86400.0, count=5)),
    ("5 times every 12h", Cadence(every_s=43200.0, count=5)),
    ("every 12h for 10d", Cadence(every_s=43200.0, for_s=864000.0)),
    ("every 2d until 2026-12-31", Cadence(every_s=172800.0, until=datetime(2026, 12, 31, tzinfo=timezone.utc))),
    ("every 1d until 'target.last_mag > 20'", Cadence(every_s=86400.0, until_expr="target.last_mag > 20")),
    ("retry 3 shift 12h", Cadence(retries=3, shift_s=43200.0)),
    ("every 1d x5 retry 2 shift 6h resume", Cadence(every_s=86400.0, count=5, retries=2, shift_s=21600.0,
                                                    resume=True)),
])
def test_parse_and_describe_round_trip(text, expect):
    c = parse_cadence(text)
    assert c == expect
    assert parse_cadence(c.describe()) == c
    assert Cadence.from_json(c.to_json()) == c


@pytest.mark.parametrize("text, words", [
    ("every 1d", "needs an end"),
    ("evry 1d x5", "did you mean 'every'"),
    ("x5", "count needs a repeat"),
    ("every 1m x3", "too often"),
    ("retry 3 shift", "shift needs a value"),
    ("shift 2h", "shift needs retry"),
    ("every 1d until 'alert.mag > 3'", "only target.*"),
    ("every 1d until 'target.last_mag >'", "syntax error"),
    ("every soon x2", 'expected a duration like "12h"'),
    ("retry many", "expected a whole number"),
    ("every 1d x5 every 2d", "twice"),
    ("", "empty"),
])
def test_parse_errors_say_what_is_wrong(text, words):
    with pytest.raises(CadenceError) as e:
        parse_cadence(text)
    assert words in str(e.value)


def test_table_form_as_in_rule_files():
    assert cadence_from_table({"every": "1d", "count": 3, "retry": 1, "shift": "6h"}) == \
        Cadence(every_s=86400.0, count=3, retries=1, shift_s=21600.0)
    with pytest.raises(CadenceError) as e:
        cadence_from_table({"every": "1d", "cnt": 3})
    assert e.value.key == "cnt"


# ----------------------------------------------------------------- planning --


def test_plan_repeats_on_the_first_windows_rhythm_and_stops_at_count():
    c = Cadence(every_s=86400.0, count=3)
    w = dict(series_start=T0, window_start=T0, window_end=T0 + timedelta(hours=6))
    s = plan_next(c, seq=0, attempt=0, state="completed", now=T0 + timedelta(hours=3), **w)
    assert (s.seq, s.attempt, s.window_start, s.window_end) == (1, 0, T0 + timedelta(days=1),
                                                                T0 + timedelta(days=1, hours=6))
    late = plan_next(c, seq=1, attempt=0, state="completed", now=T0 + timedelta(days=2, hours=5), **w)
    assert late.window_start == T0 + timedelta(days=2, hours=5)  # never in the past
    assert plan_next(c, seq=2, attempt=0, state="completed", now=T0, **w).seq is None
    assert plan_next(c, seq=0, attempt=0, state="cancelled", now=T0, **w).seq is None
    assert plan_next(c, seq=0, attempt=0, state="expired", now=T0, **w).seq is None  # no resume
    r = plan_next(Cadence(every_s=86400.0, count=3, resume=True), seq=0, attempt=0, state="expired", now=T0, **w)
    assert r.seq == 1 and "resumed" in r.reason


def test_plan_retries_shift_the_window_a_limited_number_of_times():
    c = Cadence(retries=2, shift_s=12 * 3600.0)
    w = dict(series_start=T0, window_start=T0, window_end=T0 + timedelta(hours=24))
    s = plan_next(c, seq=0, attempt=0, state="expired", now=T0 + timedelta(hours=25), **w)
    assert (s.seq, s.attempt) == (0, 1) and s.window_start == T0 + timedelta(hours=25)
    assert s.window_end - s.window_start == timedelta(hours=24)
    s = plan_next(c, seq=0, attempt=0, state="failed", now=T0 + timedelta(hours=1), **w)
    assert s.window_start == T0 + timedelta(hours=12)
    assert plan_next(c, seq=0, attempt=2, state="failed", now=T0, **w).seq is None
    assert plan_next(c, seq=0, attempt=0, state="completed", now=T0, **w).seq is None  # retry-only: done


def test_series_names_are_deterministic_and_fit_the_portal():
    assert series_name("tomd-12-ab", 3, 0) == "tomd-12-ab-3"
    assert series_name("tomd-12-ab", 3, 1) == "tomd-12-ab-3r1"
    long = "x" * 50
    assert series_name(long, 12, 2) == series_name(long, 12, 2) and len(series_name(long, 12, 2)) <= 50
    assert series_name(long, 12, 2) != series_name(long, 12, 1)


# ------------------------------------------------- series against the simulator --


@pytest.fixture
def sim():
    with SimObservatory(pending_s=3600) as s:
        yield s


def client(sim):
    return LCOClient("sim", url=sim.url, token=sim.token, proposal="SIM2026A-001", templates=TEMPLATES,
                     timeout=2.0, max_attempts=2, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)


class Series:
    def __init__(self, db, sim, cadence: str, *, target="SN 2026cad", proposal: str | None = None):
        self.db, self.sim = db, sim
        self.fac = client(sim)
        self.poller = Poller(db.sessions, {"sim": self.fac})
        with db.sessions.begin() as s:
            self.tid = upsert(s, TargetSpec(name=target, ra=150.0, dec=-20.0), origin="test").target_id
        with db.sessions.begin() as s:
            self.first = create_intent(s, target_id=self.tid, facility="sim", template="1m-gri", name="cad-1",
                                       proposal=proposal)
            repo.update_observation(s, self.first, {"cadence": initial(parse_cadence(cadence))})
        self.submit()

    def submit(self):
        Submitter(self.db.sessions, {"sim": self.fac}, FAST, worker_id="w").run_until_settled(timeout_s=20)

    def rows(self) -> list[ObservationRequest]:
        with self.db.sessions() as s:
            return list(s.scalars(select(ObservationRequest).order_by(ObservationRequest.id)))

    def end_last(self, word: str) -> list:
        """The newest request ends at the facility with ``word``; poll; submit what it made."""
        last = self.rows()[-1]
        assert last.state == "pending", (last.name, last.state)
        self.sim.set_state(int(last.facility_id), word)
        (p,) = self.poller.poll()
        assert p.error is None
        self.submit()
        return p.changes

    def replay(self):
        """Poll as after a crash that lost the cursor: every change is seen again."""
        with self.db.sessions.begin() as s:
            s.execute(PollState.__table__.delete())
        self.poller.poll()
        self.poller.poll(full=True)


def test_repeat_count_creates_exactly_the_next_intents_also_when_replayed(db, sim):
    ser = Series(db, sim, "every 1d x3")
    (c,) = ser.end_last("COMPLETED")
    assert c.next_intent is not None
    ser.replay()
    rows = ser.rows()
    assert [r.name for r in rows] == ["cad-1", "cad-1-1"]
    child = rows[1]
    assert child.parent_id == ser.first and child.cadence["seq"] == 1 and child.state == "pending"
    first_start = rows[0].submitted_at
    assert abs((child.window_start - (first_start + timedelta(days=1))).total_seconds()) < 5
    assert child.window_end - child.window_start == timedelta(hours=24)
    ser.end_last("COMPLETED")
    ser.replay()
    ser.end_last("COMPLETED")  # the third and last
    ser.replay()
    assert [r.name for r in ser.rows()] == ["cad-1", "cad-1-1", "cad-1-2"]
    assert [r.state for r in ser.rows()] == ["completed"] * 3
    with db.sessions() as s:
        steps = list(s.scalars(select(OutboxEvent).where(OutboxEvent.kind == "observation.cadence_step")))
    assert [e.payload["reason"] for e in steps] == ["repeat 2 of 3", "repeat 3 of 3"]
    assert all(e.payload["series_id"] == ser.first for e in steps)


def test_later_visits_keep_the_proposal_and_count_in_its_hours(db, sim):
    """A series' later visits (repeats and retries) are under the first request's proposal, so the
    rules' hours_per_night (per facility and proposal) counts them."""
    ser = Series(db, sim, "every 1d x3 retry 1 shift 6h", proposal="P1")
    ser.end_last("COMPLETED")  # → repeat 1
    ser.end_last("WINDOW_EXPIRED")  # → retry of repeat 1
    rows = ser.rows()
    assert [r.name for r in rows] == ["cad-1", "cad-1-1", "cad-1-1r1"]
    assert [r.proposal for r in rows] == ["P1"] * 3
    hours = rows[0].estimated_hours  # the submitter's estimate for the template
    assert hours > 0 and [r.estimated_hours for r in rows] == [hours] * 3
    with db.sessions() as s:
        start = rows[0].created_at - timedelta(seconds=1)
        # All three (an expired request asked for its time too; only cancelled/rejected ones are not counted).
        assert repo.requested_hours_from(s, "sim", "P1", start) == pytest.approx(3 * hours)
        assert repo.requested_hours_from(s, "sim", None, start) == 0.0


def test_retry_shifts_the_window_and_stops_after_its_attempts(db, sim):
    ser = Series(db, sim, "retry 2 shift 12h")
    ser.end_last("WINDOW_EXPIRED")
    ser.replay()
    rows = ser.rows()
    assert [r.name for r in rows] == ["cad-1", "cad-1-0r1"]
    assert rows[1].cadence["attempt"] == 1 and rows[1].window_start > rows[0].submitted_at + timedelta(hours=11)
    ser.end_last("FAILURE_LIMIT_REACHED")
    ser.end_last("WINDOW_EXPIRED")  # the second retry failed too: that was the last
    ser.replay()
    assert [r.name for r in ser.rows()] == ["cad-1", "cad-1-0r1", "cad-1-0r2"]
    assert [r.state for r in ser.rows()] == ["expired", "failed", "expired"]


def test_repeat_with_retry_and_resume(db, sim):
    ser = Series(db, sim, "every 1d x2 retry 1 shift 1h resume")
    ser.end_last("WINDOW_EXPIRED")  # → retry of repeat 0
    ser.end_last("WINDOW_EXPIRED")  # no retry left, resume → repeat 1
    ser.end_last("COMPLETED")  # last repeat
    ser.replay()
    assert [r.name for r in ser.rows()] == ["cad-1", "cad-1-0r1", "cad-1-1"]


def test_a_failed_repeat_without_resume_ends_the_series(db, sim):
    ser = Series(db, sim, "every 1d x5")
    ser.end_last("WINDOW_EXPIRED")
    assert [r.name for r in ser.rows()] == ["cad-1"]


def test_until_expression_on_the_target_ends_the_series(db, sim):
    ser = Series(db, sim, "every 1d x10 until 'target.last_mag > 20'")
    ser.end_last("COMPLETED")  # no photometry: last_mag unknown, the series goes on
    assert [r.name for r in ser.rows()] == ["cad-1", "cad-1-1"]
    with db.sessions.begin() as s:
        repo.insert_photometry(s, [{"target_id": ser.tid, "source": "test", "mjd": 61000.0, "band": "r",
                                    "kind": "detection", "mag": 20.5, "mag_err": 0.1, "dedupe": "t1"}])
    ser.end_last("COMPLETED")  # faded below 20: done
    ser.replay()
    assert [r.name for r in ser.rows()] == ["cad-1", "cad-1-1"]


def test_a_reopened_request_completing_again_does_not_make_a_second_next(db, sim):
    ser = Series(db, sim, "every 1d x3")
    gid = int(ser.rows()[0].facility_id)
    sim.set_state(gid, "COMPLETED")
    ser.poller.poll()
    sim.set_state(gid, "PENDING")
    ser.poller.poll()
    sim.set_state(gid, "COMPLETED")
    (p,) = ser.poller.poll()
    assert [c.new_state for c in p.changes] == ["completed"] and p.changes[0].next_intent is None
    assert [r.name for r in ser.rows()] == ["cad-1", "cad-1-1"]


# ------------------------------------------------------------------- rules --


RULE = '''name = "follow-up"
when = "alert.mag < 30"

[observe]
facility = "lco"
template = "1m-gri"
cadence = {cadence}
'''


def test_rule_files_take_a_cadence_as_words_or_a_table():
    from tests.test_rules_engine import ENV
    from tomd.rules.load import parse_rule

    r, problems = parse_rule(RULE.format(cadence='"every 1d x3 retry 1 shift 6h"'), "r.toml", ENV)
    assert not problems
    assert r.observe.cadence == {"spec": {"every_s": 86400.0, "count": 3, "retries": 1, "shift_s": 21600.0},
                                 "seq": 0, "attempt": 0}
    r, problems = parse_rule(RULE.format(cadence='{ every = "12h", for = "3d" }'), "r.toml", ENV)
    assert not problems and r.observe.cadence["spec"] == {"every_s": 43200.0, "for_s": 259200.0}
    r, problems = parse_rule(RULE.format(cadence='"every 1d"'), "rules/r.toml", ENV)
    assert r is None and len(problems) == 1
    assert problems[0].startswith("rules/r.toml:7:")  # the cadence line
    assert problems[0].endswith("observe.cadence: a repeat needs an end: x<N>, for <duration> or until <date or "
                                "'expression'>")
    r, problems = parse_rule(RULE.format(cadence='{ every = "1d", count = "five" }'), "r.toml", ENV)
    assert r is None and "observe.cadence.count: expected a whole number" in problems[0]
    r, problems = parse_rule(RULE.format(cadence="5"), "r.toml", ENV)
    assert r is None and 'expected words like "every 1d x5"' in problems[0]


def test_a_fired_rule_with_a_cadence_starts_a_series(db, shared_data):
    from tests.test_rules_engine import count, engine, ingest, rule
    from tests.alert_samples import read_ztf, ztf_files

    schema, (rec,) = read_ztf(ztf_files()[0])
    r = rule(RULE.format(cadence='"every 1d x2"'))
    ingest(db, engine(r), [rec], schema)
    with db.sessions() as s:
        req = s.scalars(select(ObservationRequest)).one()
    assert req.cadence == {"spec": {"every_s": 86400.0, "count": 2}, "seq": 0, "attempt": 0}
    assert req.parent_id is None and count(db, ObservationRequest) == 1


def test_a_request_failed_before_submission_is_retried_by_the_sweep(db, sim):
    from tomd.cadence import sweep

    with db.sessions.begin() as s:
        tid = upsert(s, TargetSpec(name="SN 2026late", ra=150.0, dec=-20.0), origin="test").target_id
    past = datetime.now(timezone.utc) - timedelta(hours=30)
    with db.sessions.begin() as s:
        first = create_intent(s, target_id=tid, facility="sim", template="1m-gri", name="late-1",
                              window_start=past, window_end=past + timedelta(hours=6))
        repo.update_observation(s, first, {"cadence": initial(parse_cadence("retry 1 shift 12h"))})
    fac = client(sim)
    Submitter(db.sessions, {"sim": fac}, FAST, worker_id="w").run_until_settled(timeout_s=20)
    with db.sessions() as s:
        assert repo.get_observation(s, first).state == "failed"  # its window ended before it was sent
    made = sweep(db.sessions)
    assert len(made) == 1 and sweep(db.sessions) == []  # a second sweep makes nothing
    Submitter(db.sessions, {"sim": fac}, FAST, worker_id="w").run_until_settled(timeout_s=20)
    with db.sessions() as s:
        retry = repo.get_observation(s, made[0])
    assert retry.name == "late-1-0r1" and retry.state == "pending" and retry.parent_id == first
    assert retry.window_end - retry.window_start == timedelta(hours=6)
    assert sim.names()["late-1-0r1"] == 1
