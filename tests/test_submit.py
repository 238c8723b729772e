"""Exactly-once submission against the simulated observatory, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from tomd.db import migrate
from tomd.db import repository as repo
from tomd.db.models import ObservationRequest, OutboxEvent
from tomd.facilities.lco import LCOClient
from tomd.facilities.sim import SimObservatory
from tomd.submit import SubmitSettings, Submitter, create_intent
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert

TEMPLATES = {
    "1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"], "exposure_time": 120},
    "bad-filter": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["Halpha"], "exposure_time": 60},
}
FAST = SubmitSettings(lease_s=30, max_attempts=8, backoff_base_s=0.01, backoff_cap_s=0.05, settle_s=0.05,
                      token_backoff_s=60, batch=50, sweep_interval_s=5)


# A loaded machine may take a second or more to answer on loopback: every call must beat the
# client's timeout (30 s), except where a test makes the facility hang on purpose. There the
# client waits HANG_TIMEOUT (the hang itself lasts until the fixture's end, far longer), and a
# storm of faults uses STORM_TIMEOUT (its "slow" answers take 0.2 s and must not time out).
HANG_TIMEOUT = 2.0
STORM_TIMEOUT = 1.0


@pytest.fixture
def sim():
    with SimObservatory(pending_s=3600, hang_s=600) as s:
        yield s


def client(sim, **kw):
    args = dict(url=sim.url, token=sim.token, proposal="SIM2026A-001", templates=TEMPLATES, timeout=30.0,
                max_attempts=3, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)
    args.update(kw)
    return LCOClient("sim", **args)


def make_target(db, name="SN 2026abc", ra=150.0, dec=-20.0) -> int:
    with db.sessions.begin() as s:
        return upsert(s, TargetSpec(name=name, ra=ra, dec=dec), origin="test").target_id


def make_intents(db, n, *, template="1m-gri", prefix="tomd-i", **kw) -> list[int]:
    tid = make_target(db)
    with db.sessions.begin() as s:
        return [create_intent(s, target_id=tid, facility="sim", template=template, name=f"{prefix}-{i}", **kw)
                for i in range(n)]


def rows(db) -> list[ObservationRequest]:
    with db.sessions() as s:
        return list(s.scalars(select(ObservationRequest).order_by(ObservationRequest.id)))


def events(db, kind=None) -> list[OutboxEvent]:
    with db.sessions() as s:
        q = select(OutboxEvent).order_by(OutboxEvent.id)
        if kind:
            q = q.where(OutboxEvent.kind == kind)
        return list(s.scalars(q))


def test_intent_becomes_one_request_with_history_and_event(db, sim):
    (rid,) = make_intents(db, 1, mode="RAPID_RESPONSE", priority=1.2)
    sub = Submitter(db.sessions, {"sim": client(sim)}, FAST, worker_id="w1")
    (out,) = sub.run_once()
    assert out.state == "pending" and out.facility_id
    (row,) = rows(db)
    assert (row.state, row.facility_state, row.facility_id, row.attempts) == ("pending", "PENDING", out.facility_id, 1)
    assert row.claimed_by is None and row.submitted_at is not None
    assert row.request["name"] == "tomd-i-0" and row.request["observation_type"] == "RAPID_RESPONSE"
    assert row.request["ipp_value"] == 1.2
    (group,) = sim.groups()
    assert group["name"] == "tomd-i-0" and str(group["id"]) == row.facility_id
    with db.sessions() as s:
        hist = repo.observation_history(s, rid)
    assert [(h.state, h.facility_state) for h in hist] == [("pending", "PENDING")]
    (ev,) = events(db, "observation.submitted")
    assert ev.payload["facility_id"] == row.facility_id and ev.payload["recovered"] is False
    assert sub.run_once() == []  # nothing left: a second sweep submits nothing


def test_rejection_is_final_with_the_facility_words(db, sim):
    make_intents(db, 1, template="bad-filter")
    sub = Submitter(db.sessions, {"sim": client(sim)}, FAST)
    (out,) = sub.run_once()
    assert out.state == "rejected"
    (row,) = rows(db)
    assert row.state == "rejected"
    assert ("requests[0].configurations[0].instrument_configs[0].optical_elements.filter: "
            "Invalid filter 'Halpha'") in row.last_error
    assert sim.groups() == [] and sub.run_once() == []
    assert events(db, "observation.rejected")[0].payload["reason"] == row.last_error


def test_rejection_on_post_without_validation(db, sim):
    make_intents(db, 1, template="bad-filter")
    sub = Submitter(db.sessions, {"sim": client(sim)}, SubmitSettings(**{**FAST.__dict__, "validate": False}))
    (out,) = sub.run_once()
    assert out.state == "rejected" and "Invalid filter 'Halpha'" in rows(db)[0].last_error
    assert len(sim.submissions()) == 1


@pytest.mark.parametrize("fault", ["accept_then_hang", "accept_then_drop", "accept_then_500"])
def test_ambiguous_failure_is_looked_up_not_resubmitted(db, sim, fault):
    make_intents(db, 1)
    sim.inject(fault, method="POST", path="/api/requestgroups/")
    sub = Submitter(db.sessions, {"sim": client(sim, timeout=HANG_TIMEOUT)}, FAST)
    (first,) = sub.run_once()
    assert first.state == "submitting"
    sub.run_until_settled(timeout_s=120)
    (row,) = rows(db)
    assert row.state == "pending" and sim.names() == {"tomd-i-0": 1}
    assert len(sim.submissions()) == 1  # never POSTed again
    assert events(db, "observation.submitted")[0].payload["recovered"] is True


def test_ambiguous_without_storing_is_submitted_after_the_look_up(db, sim):
    make_intents(db, 1)
    sim.inject("drop", method="POST", path="/api/requestgroups/")
    sub = Submitter(db.sessions, {"sim": client(sim)}, FAST)
    sub.run_until_settled(timeout_s=120)
    (row,) = rows(db)
    assert row.state == "pending" and row.attempts == 2 and sim.names() == {"tomd-i-0": 1}
    lookups = [r for r in sim.received if r.method == "GET" and r.path == "/api/requestgroups/"]
    assert len(lookups) == 1  # looked before the second POST


def test_a_window_that_ends_after_an_ambiguous_post_is_looked_up_first(db, sim):
    """The request may exist although its window is over: look before calling it failed."""
    now = datetime.now(timezone.utc)
    make_intents(db, 1, window_start=now, window_end=now + timedelta(hours=2))
    sim.inject("accept_then_hang", method="POST", path="/api/requestgroups/")
    (first,) = Submitter(db.sessions, {"sim": client(sim, timeout=HANG_TIMEOUT)}, FAST).run_once()
    assert first.state == "submitting"
    later = now + timedelta(hours=3)  # past the window and past the lease
    (out,) = Submitter(db.sessions, {"sim": client(sim)}, FAST, clock=lambda: later).run_once()
    (row,) = rows(db)
    assert out.state == "pending" and row.state == "pending" and row.facility_id
    assert sim.names() == {"tomd-i-0": 1}


def test_a_window_over_and_nothing_at_the_facility_fails_after_the_look_up(db, sim):
    now = datetime.now(timezone.utc)
    make_intents(db, 1, window_start=now, window_end=now + timedelta(hours=2))
    sim.inject("drop", method="POST", path="/api/requestgroups/")  # not stored: unknown outcome
    (first,) = Submitter(db.sessions, {"sim": client(sim)}, FAST).run_once()
    assert first.state == "submitting"
    later = now + timedelta(hours=3)
    (out,) = Submitter(db.sessions, {"sim": client(sim)}, FAST, clock=lambda: later).run_once()
    assert out.state == "failed" and "holds no request named tomd-i-0" in out.message
    assert sim.names() == {}
    looked = [r for r in sim.received if r.method == "GET" and r.path == "/api/requestgroups/"]
    assert len(looked) == 1


def test_a_404_from_the_facility_is_final_not_retried(db, sim):
    make_intents(db, 1)
    c = client(sim, url=sim.url + "/nothere")
    (out,) = Submitter(db.sessions, {"sim": c}, FAST).run_once()
    (row,) = rows(db)
    assert out.state == "rejected" and row.state == "rejected" and "404" in row.last_error
    assert Submitter(db.sessions, {"sim": c}, FAST).run_once() == []  # nothing left to retry


def test_crash_after_marking_submitting_is_recovered_by_the_next_worker(db, sim):
    """A worker died mid-POST (the group exists, the row says submitting, its lease ran out)."""
    (rid,) = make_intents(db, 1)
    c = client(sim)
    with db.sessions() as s:
        target = repo.get_target(s, rows(db)[0].target_id)
        from tomd.facilities.base import Intent

        doc = c.build_request("1m-gri", target, Intent(name="tomd-i-0"))
    c.submit(doc)
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    with db.sessions.begin() as s:
        repo.update_observation(s, rid, {"state": "submitting", "attempts": 1, "claimed_by": "dead",
                                         "claimed_until": past})
    Submitter(db.sessions, {"sim": c}, FAST, worker_id="heir").run_until_settled(timeout_s=120)
    assert rows(db)[0].state == "pending" and sim.names() == {"tomd-i-0": 1}


def test_a_live_claim_is_not_taken(db, sim):
    (rid,) = make_intents(db, 1)
    future = datetime.now(timezone.utc) + timedelta(minutes=5)
    with db.sessions.begin() as s:
        repo.update_observation(s, rid, {"claimed_by": "other", "claimed_until": future})
    assert Submitter(db.sessions, {"sim": client(sim)}, FAST).run_once() == []
    assert sim.groups() == []


def test_storm_of_faults_no_duplicates_every_intent_settles(db, sim):
    n = 20
    make_intents(db, n - 2)
    make_intents(db, 2, template="bad-filter", prefix="tomd-bad")
    sim.chaos(0.35, seed=7)
    sub = Submitter(db.sessions, {"sim": client(sim, timeout=STORM_TIMEOUT)}, FAST)
    sub.run_until_settled(timeout_s=300)
    sim.clear_faults()
    names = sim.names()
    assert all(c == 1 for c in names.values()), {k: c for k, c in names.items() if c > 1}
    by_name = {g["name"]: str(g["id"]) for g in sim.groups()}
    final = rows(db)
    assert len(final) == n
    for r in final:
        assert r.state in ("pending", "rejected", "failed"), (r.name, r.state, r.last_error)
        if r.state == "pending":
            assert by_name[r.name] == r.facility_id
        else:
            assert r.last_error and r.name not in by_name
    assert sum(r.state == "pending" for r in final) >= n - 2 - 1  # chaos may exhaust one intent's attempts
    assert {r.name for r in final if r.state == "rejected"} >= {"tomd-bad-0", "tomd-bad-1"} - {
        r.name for r in final if r.state == "failed"}
    assert len(events(db, "observation.submitted")) == sum(r.state == "pending" for r in final)


def test_two_submitters_never_submit_the_same_intent_twice(db, sim):
    n = 30
    make_intents(db, n)
    sim.inject("slow", delay=0.05, method="POST", count=n)  # widen the race window
    engines = [migrate.connect(db.url) for _ in range(2)]  # separate pools, as two daemons
    try:
        subs = [Submitter(migrate.sessions(e), {"sim": client(sim)}, FAST, worker_id=f"w{i}")
                for i, e in enumerate(engines)]
        outcomes: list = [[], []]

        def work(i):
            outcomes[i] = subs[i].run_until_settled(timeout_s=300)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for e in engines:
            e.dispose()
    assert sim.names() == {f"tomd-i-{i}": 1 for i in range(n)}
    assert len(sim.submissions()) == n
    assert all(r.state == "pending" for r in rows(db))
    done = [o.request_id for out in outcomes for o in out if o.state == "pending"]
    assert sorted(done) == sorted(set(done)) and len(done) == n


def test_refused_token_keeps_the_intent_waiting(db, sim):
    make_intents(db, 1)
    sub = Submitter(db.sessions, {"sim": client(sim, token="wrong")}, FAST)
    (out,) = sub.run_once()
    (row,) = rows(db)
    assert row.state == "intent" and "refused the API token" in row.last_error and "wrong" not in row.last_error
    assert row.next_attempt_at > datetime.now(timezone.utc) + timedelta(seconds=30)
    assert sim.groups() == []


def test_429_on_submit_is_honoured_and_submitted_once(db, sim):
    make_intents(db, 1)
    sim.inject("429", retry_after=0.3, method="POST", path="/api/requestgroups/", count=5)
    sub = Submitter(db.sessions, {"sim": client(sim)}, FAST)
    t0 = time.monotonic()
    sub.run_until_settled(timeout_s=120)
    assert time.monotonic() - t0 >= 0.3 * 5  # a lower bound: a slow machine only adds to it
    assert rows(db)[0].state == "pending" and sim.names() == {"tomd-i-0": 1}


def test_retries_are_bounded(db, sim):
    make_intents(db, 1)
    sim.inject("drop", method="POST", path="/api/requestgroups/", count=100)
    sub = Submitter(db.sessions, {"sim": client(sim)}, SubmitSettings(**{**FAST.__dict__, "max_attempts": 3}))
    sub.run_until_settled(timeout_s=120)
    (row,) = rows(db)
    assert row.state == "failed" and row.attempts == 3 and "gave up after 3 attempts" in row.last_error
    assert len(sim.submissions()) == 3 and sim.groups() == []
    assert events(db, "observation.failed")[0].payload["attempts"] == 3


def test_template_and_window_problems_fail_with_a_reason(db, sim):
    tid = make_target(db)
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    with db.sessions.begin() as s:
        create_intent(s, target_id=tid, facility="sim", template="nope", name="a")
        create_intent(s, target_id=tid, facility="sim", template="1m-gri", name="b", window_end=past)
        create_intent(s, target_id=tid, facility="elsewhere", template="1m-gri", name="c")
    Submitter(db.sessions, {"sim": client(sim)}, FAST).run_once()
    reasons = {r.name: (r.state, r.last_error) for r in rows(db)}
    assert reasons["a"][0] == "failed" and "no template 'nope'" in reasons["a"][1]
    assert reasons["b"][0] == "failed" and "window ended" in reasons["b"][1]
    assert reasons["c"][0] == "failed" and "no facility 'elsewhere'" in reasons["c"][1]


def test_wake_submits_at_once(db, sim):
    sub = Submitter(db.sessions, {"sim": client(sim)}, SubmitSettings(**{**FAST.__dict__, "sweep_interval_s": 3600}))
    stop = threading.Event()
    t = threading.Thread(target=sub.run, args=(stop,))
    t.start()
    try:
        # The first sweep (most likely) found nothing; now it sleeps an hour. Were it late, it would
        # find the intent itself: a pass this test did not earn, never a failure.
        time.sleep(0.2)
        make_intents(db, 1)
        t0 = time.monotonic()
        sub.wake()
        while rows(db)[0].state != "pending":
            assert time.monotonic() - t0 < 120, "not submitted: the wake did not start a sweep"  # the sweep: 1 h
            time.sleep(0.01)
    finally:
        stop.set()
        sub.wake()
        t.join(60)
    assert not t.is_alive()


def test_a_hanging_facility_does_not_delay_another_facilitys_intent(db, sim):
    """Each facility has a lane of its own: an LCO rapid-response intent is not queued behind
    a facility whose validation call hangs (as Swift's job_wait or a stuck Gemini endpoint can)."""
    with SimObservatory(pending_s=3600, hang_s=3600) as slow_sim:  # the hang ends when slow_sim stops
        slow_sim.inject("hang", path="/api/requestgroups/validate/")
        tid = make_target(db)
        with db.sessions.begin() as s:  # the slow facility's intent first: one thread would take it first
            slow_id = create_intent(s, target_id=tid, facility="slow", template="1m-gri", name="slow-0")
            fast_id = create_intent(s, target_id=tid, facility="fast", template="1m-gri", name="fast-0",
                                    mode="RAPID_RESPONSE")
        sub = Submitter(db.sessions, {"slow": client(slow_sim, timeout=120, max_attempts=1),
                                      "fast": client(sim)}, FAST)
        stop = threading.Event()
        t = threading.Thread(target=sub.run, args=(stop,))
        t.start()
        try:
            deadline = time.monotonic() + 120  # well inside the hour's hang
            while {r.id: r.state for r in rows(db)}[fast_id] != "pending":
                assert time.monotonic() < deadline, "the fast facility's intent waited behind the hanging one"
                time.sleep(0.02)
            # The slow facility's validation is still hanging: its intent is claimed, not sent.
            slow = {r.id: r for r in rows(db)}[slow_id]
            assert slow.state == "intent" and slow.claimed_by == sub.worker
            assert any(r.path == "/api/requestgroups/validate/" for r in slow_sim.received)
            assert slow_sim.submissions() == [] and [g["name"] for g in sim.groups()] == ["fast-0"]
        finally:
            stop.set()
            sub.wake()
            slow_sim.stop()  # ends the hang: the lane records a retry and sees the stop
            t.join(60)
    assert not t.is_alive()


def test_an_intent_for_a_facility_not_configured_fails_in_its_own_lane(db, sim):
    tid = make_target(db)
    with db.sessions.begin() as s:
        gone = create_intent(s, target_id=tid, facility="retired", template="1m-gri", name="gone-0")
        ok = create_intent(s, target_id=tid, facility="sim", template="1m-gri", name="ok-0")
    sub = Submitter(db.sessions, {"sim": client(sim)}, FAST)
    stop = threading.Event()
    t = threading.Thread(target=sub.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 120
        while {r.id: r.state for r in rows(db)} != {gone: "failed", ok: "pending"}:
            assert time.monotonic() < deadline, {r.id: r.state for r in rows(db)}
            time.sleep(0.02)
    finally:
        stop.set()
        sub.wake()
        t.join(60)
    assert not t.is_alive()
    assert "no facility 'retired' is configured" in {r.id: r for r in rows(db)}[gone].last_error


def test_inline_template_from_the_rule_decision(db, sim):
    """The rules engine stores an inline template with its decision; the intent names it "inline:<hash>"."""
    from tomd.db.models import Decision

    tid = make_target(db)
    fields = {"instrument_type": "0M4-SCICAM-QHY600", "filters": ["rp"], "exposure_time": 30}
    with db.sessions.begin() as s:
        d = Decision(target_id=tid, rule="young", outcome="fired", reason="r",
                     details={"observe": {"facility": "sim", "template": "inline:abc", "template_fields": fields}})
        s.add(d)
        s.flush()
        create_intent(s, target_id=tid, facility="sim", template="inline:abc", name=f"tomd-{d.id}-00",
                      decision_id=d.id, priority=7.0)
    (out,) = Submitter(db.sessions, {"sim": client(sim)}, FAST).run_once()
    assert out.state == "pending"
    (g,) = sim.groups()
    assert g["requests"][0]["configurations"][0]["instrument_type"] == "0M4-SCICAM-QHY600"
    assert g["ipp_value"] == 2.0  # a rule priority above the portal's range is clamped


def test_wake_after_commit_sink_wakes_only_after_the_commit(db):
    from tomd.submit import WakeAfterCommit

    woken = []
    sink = WakeAfterCommit(lambda: woken.append(True))
    with db.sessions.begin() as s:
        sink(s, [])
        assert woken == []  # still inside the transaction
    assert woken == [True]
    with pytest.raises(RuntimeError):
        with db.sessions.begin() as s:
            sink(s, [])
            raise RuntimeError("rolled back")
    assert woken == [True]


def test_rule_decision_to_facility_end_to_end(db, sim, tmp_path):
    """Ingest → rule engine (decision + intent in the batch's transaction) → wake after commit → POST."""
    import json as _json

    from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
    from tomd.config import Config, Facility, Rules
    from tomd.daemon import parser_for
    from tomd.rules.engine import RuleEngine
    from tomd.submit import WakeAfterCommit

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bright.toml").write_text(
        'name = "bright"\nwhen = "alert.mag < 14"\n[observe]\nfacility = "sim"\ntemplate = "1m-gri"\n'
        'mode = "RAPID_RESPONSE"\nwindow = "12h"\n')
    config = Config(rules=Rules(paths=[str(tmp_path / "rules")]),
                    facilities={"sim": Facility(kind="sim", url=sim.url, templates=TEMPLATES)})
    sub = Submitter(db.sessions, {"sim": client(sim)}, SubmitSettings(**{**FAST.__dict__, "sweep_interval_s": 3600}))
    stop = threading.Event()
    worker = threading.Thread(target=sub.run, args=(stop,))
    worker.start()
    try:
        time.sleep(0.2)  # the first sweep (most likely) over: were it late, a pass not earned, never a failure
        ing = Ingestor(db.sessions, IngestSettings(stream="t", format="lasair-json"),
                       parser_for("lasair-json", include_test=False),
                       sinks=[RuleEngine.from_config(config), WakeAfterCommit(sub.wake)])
        msgs = [FileMessage("mem", i, _json.dumps({"objectId": f"ZTF26e2e{i}", "ramean": 150.0 + i, "decmean": -20.0,
                                                   "jdmax": 2461000.5 + i, "latestmag": mag}).encode())
                for i, mag in enumerate((13.0, 18.0, 13.5))]
        ing.handle(msgs)
        ing.handle(msgs)  # a replay changes nothing: no second decision, no second request
        t0 = time.monotonic()
        while len([r for r in rows(db) if r.state == "pending"]) < 2:  # without the wake: an hour
            assert time.monotonic() - t0 < 120, [(r.name, r.state, r.last_error) for r in rows(db)]
            time.sleep(0.01)
    finally:
        stop.set()
        sub.wake()
        worker.join(60)
    final = rows(db)
    assert len(final) == 2 and all(r.decision_id for r in final)
    assert sorted(sim.names().values()) == [1, 1] and len(sim.submissions()) == 2
    assert {g["observation_type"] for g in sim.groups()} == {"RAPID_RESPONSE"}


def test_stop_finishes_the_intent_in_hand_and_releases_the_rest(db, sim):
    """SIGTERM must not wait for a whole claimed batch at a slow facility (nor strand it for a lease)."""
    n = 8
    make_intents(db, n)
    sim.inject("slow", count=100, method="POST", path="/api/requestgroups/", delay=0.5)
    sub = Submitter(db.sessions, {"sim": client(sim)}, FAST)
    stop = threading.Event()
    th = threading.Thread(target=sub.run, args=(stop,), daemon=True)
    th.start()
    deadline = time.monotonic() + 120
    while not any(r.method == "POST" and r.path == "/api/requestgroups/" for r in sim.received):
        assert time.monotonic() < deadline, "no submission started"
        time.sleep(0.02)
    stop.set()
    th.join(timeout=60)
    assert not th.is_alive()
    posted = sum(r.method == "POST" and r.path == "/api/requestgroups/" for r in sim.received)
    left = [r for r in rows(db) if r.state == "intent"]
    assert posted < n and len(left) == n - posted
    assert all(r.claimed_by is None for r in left)  # released now, not after the lease
