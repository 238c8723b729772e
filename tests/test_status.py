"""Status polling against the simulated observatory, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy import func, select

from tests.loopback import Gate
from tomd.db import migrate
from tomd.db import repository as repo
from tomd.db.models import ObservationRequest, ObservationStatus, OutboxEvent, PollState
from tomd.facilities.lco import LCOClient
from tomd.facilities.sim import SimObservatory
from tomd.status import PollSettings, Poller
from tomd.submit import SubmitSettings, Submitter, create_intent
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert

TEMPLATES = {"1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"],
                        "exposure_time": 120}}
FAST = SubmitSettings(lease_s=30, backoff_base_s=0.01, backoff_cap_s=0.05, settle_s=0.05, batch=50)


@pytest.fixture
def sim():
    # A hang lasts until the simulator stops: only the client's timeout ends it.
    with SimObservatory(pending_s=3600, hang_s=600.0) as s:
        yield s


def client(sim, **kw):
    args = dict(url=sim.url, token=sim.token, proposal="SIM2026A-001", templates=TEMPLATES, timeout=10.0,
                max_attempts=2, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)
    args.update(kw)
    return LCOClient("sim", **args)


def submitted(db, sim, n=1, *, target="SN 2026abc") -> list[tuple[int, int]]:
    """n requests submitted to the sim: [(request id, group id)]."""
    with db.sessions.begin() as s:
        tid = upsert(s, TargetSpec(name=target, ra=150.0, dec=-20.0), origin="test").target_id
    with db.sessions.begin() as s:
        ids = [create_intent(s, target_id=tid, facility="sim", template="1m-gri", name=f"st-{target[-3:]}-{i}")
               for i in range(n)]
    Submitter(db.sessions, {"sim": client(sim)}, FAST, worker_id="w").run_until_settled(timeout_s=120, ids=ids)
    with db.sessions() as s:
        out = [(i, int(repo.get_observation(s, i).facility_id)) for i in ids]
    return out


def history(db, rid) -> list[tuple[str, str]]:
    with db.sessions() as s:
        return [(h.state, h.facility_state) for h in repo.observation_history(s, rid)]


def changed_events(db) -> list[dict]:
    with db.sessions() as s:
        return [e.payload for e in s.scalars(select(OutboxEvent).where(
            OutboxEvent.kind == "observation.status_changed").order_by(OutboxEvent.id))]


def row(db, rid) -> ObservationRequest:
    with db.sessions() as s:
        return repo.get_observation(s, rid)


def list_calls(sim) -> int:
    return sum(1 for r in sim.received if r.method == "GET" and r.path == "/api/requestgroups/")


def test_pending_in_progress_completed_each_recorded_once(db, sim):
    ((rid, gid),) = submitted(db, sim)
    seen = []
    poller = Poller(db.sessions, {"sim": client(sim)}, on_change=lambda f, st: seen.append((f, st)))
    (p,) = poller.poll()
    assert p.error is None and p.changes == [] and p.followed == 1  # still PENDING: nothing new
    sim.set_state(gid, "IN_PROGRESS")
    (p,) = poller.poll()
    assert [(c.old_state, c.new_state, c.facility_state) for c in p.changes] == [("pending", "in_progress",
                                                                                 "IN_PROGRESS")]
    assert row(db, rid).data_due_at is None
    sim.set_state(gid, "COMPLETED")
    (p,) = poller.poll()
    assert [c.new_state for c in p.changes] == ["completed"]
    r = row(db, rid)
    assert (r.state, r.facility_state) == ("completed", "COMPLETED")
    assert r.data_due_at is not None and r.last_polled_at is not None
    assert history(db, rid) == [("pending", "PENDING"), ("in_progress", "IN_PROGRESS"), ("completed", "COMPLETED")]
    evs = changed_events(db)
    assert [(e["old_state"], e["new_state"], e["facility_state"], e["reopened"]) for e in evs] == [
        ("pending", "in_progress", "IN_PROGRESS", False), ("in_progress", "completed", "COMPLETED", False)]
    assert evs[0]["request_id"] == rid and evs[0]["facility_id"] == str(gid) and evs[0]["target_id"] == r.target_id
    assert seen == [("sim", "in_progress"), ("sim", "completed")]

    # A replayed poll (the cursor lost, as after a crash before saving it) records nothing new.
    with db.sessions.begin() as s:
        s.execute(PollState.__table__.delete())
    (p,) = poller.poll()
    (p2,) = poller.poll(full=True)
    assert p.changes == [] and p2.changes == [] and p.reported == 1
    assert len(history(db, rid)) == 3 and len(changed_events(db)) == 2


def test_one_listing_answers_for_many_and_the_cursor_follows_the_facility(db, sim):
    reqs = submitted(db, sim, 25)
    poller = Poller(db.sessions, {"sim": client(sim)})
    before = list_calls(sim)
    (p,) = poller.poll()
    assert list_calls(sim) - before == 1 and p.followed == 25 and p.changes == []
    for _, gid in reqs[:10]:
        sim.set_state(gid, "COMPLETED")
    before = len(sim.received)
    (p,) = poller.poll()
    calls = [(r.method, r.path) for r in list(sim.received)[before:]]
    # Listings only, none per request: the groups changed since the cursor, the observations changed
    # since it, and (groups changed while pending) the active observations.
    assert len(calls) <= 3 and {m for m, _ in calls} == {"GET"}
    assert {p for _, p in calls} <= {"/api/requestgroups/", "/api/observations/"}
    assert sorted(c.request_id for c in p.changes) == sorted(r for r, _ in reqs[:10])
    with db.sessions() as s:
        _, cursor = repo.status_poll_state(s, "sim")
        assert cursor is not None
    # The cursor is the facility's latest `modified`, not our clock.
    latest = max(g["modified"] for g in sim.groups())
    assert cursor.replace("+00:00", "") == latest.rstrip("Z")


def test_reopened_completed_request_is_a_recorded_change(db, sim):
    ((rid, gid),) = submitted(db, sim)
    poller = Poller(db.sessions, {"sim": client(sim)})
    sim.set_state(gid, "COMPLETED")
    poller.poll()
    first_due = row(db, rid).data_due_at
    sim.set_state(gid, "PENDING")
    (p,) = poller.poll()
    (c,) = p.changes
    assert (c.old_state, c.new_state, c.reopened) == ("completed", "pending", True)
    assert row(db, rid).state == "pending"
    evs = changed_events(db)
    assert evs[-1]["reopened"] is True and evs[-1]["old_state"] == "completed"
    with db.sessions() as s:
        last = repo.observation_history(s, rid)[-1]
    assert last.state == "pending" and "reopened" in last.message
    time.sleep(0.01)
    sim.set_state(gid, "COMPLETED")
    (p,) = poller.poll()
    assert [c.new_state for c in p.changes] == ["completed"]
    assert row(db, rid).data_due_at > first_due  # its (new) data is due again
    assert [s for s, _ in history(db, rid)] == ["pending", "completed", "pending", "completed"]


def test_a_change_made_elsewhere_first_is_not_overwritten(db, sim):
    ((rid, gid),) = submitted(db, sim)
    sim.set_state(gid, "COMPLETED")
    fac = client(sim)
    poller = Poller(db.sessions, {"sim": fac})
    # A person cancels between the poll's read and its write: the guarded update loses, nothing recorded.
    real = fac.statuses

    def statuses_then_cancel(ids, since=None):
        out = real(ids, since)
        with db.sessions.begin() as s:
            repo.update_observation(s, rid, {"state": "cancelled", "facility_state": "CANCELED"})
        return out

    fac.statuses = statuses_then_cancel
    (p,) = poller.poll()
    assert p.changes == [] and row(db, rid).state == "cancelled" and changed_events(db) == []


@pytest.mark.parametrize("fault", ["status", "hang", "429"])
def test_faults_record_nothing_wrong_and_the_next_poll_catches_up(db, sim, fault):
    reqs = submitted(db, sim, 3)
    poller = Poller(db.sessions, {"sim": client(sim)})
    # The hung listing is left by the client's timeout (the hang outlasts the test): a short one keeps the
    # test quick, on a poller of its own (the same database), so no answer that arrives has to beat it.
    hung = Poller(db.sessions, {"sim": client(sim, timeout=0.4)})
    poller.poll()
    for _, gid in reqs:
        sim.set_state(gid, "COMPLETED")
    with db.sessions() as s:
        cursor_before = repo.status_poll_state(s, "sim")[1]
    if fault == "429":
        # Throttled once: the client waits out Retry-After and the poll still answers.
        sim.inject("429", count=1, method="GET", path="/api/requestgroups/", retry_after=0.2)
        (p,) = poller.poll()
        assert p.error is None and len(p.changes) == 3
    else:
        sim.inject(fault, count=10, method="GET", path="/api/requestgroups/", status=503)
        (p,) = (hung if fault == "hang" else poller).poll()
        assert p.error and p.changes == []
        assert [row(db, r).state for r, _ in reqs] == ["pending"] * 3 and changed_events(db) == []
        with db.sessions() as s:
            assert repo.status_poll_state(s, "sim")[1] == cursor_before  # the cursor did not move either
        sim.clear_faults()
        (p,) = poller.poll()
        assert p.error is None and len(p.changes) == 3
    assert [row(db, r).state for r, _ in reqs] == ["completed"] * 3
    assert len(changed_events(db)) == 3
    (p,) = poller.poll()
    assert p.changes == []


def test_two_pollers_never_poll_one_facility_at_once(db, sim):
    if db.kind != "postgresql":
        pytest.skip("SQLite is one process; the cross-process lock is PostgreSQL's")
    reqs = submitted(db, sim, 5)
    for _, gid in reqs:
        sim.set_state(gid, "COMPLETED")
    # Two daemons: separate engines (separate connection pools), the same database.
    other = migrate.connect(db.url)
    try:
        # a reaches the facility through a gate that holds its listing until b has polled (a's timeout
        # outlasts any wait for b: a held listing is never given up and asked again).
        gate = Gate(sim.url, "GET", "/api/requestgroups/")
        a = Poller(db.sessions, {"sim": client(sim, url=gate.url, timeout=300.0)})
        b = Poller(migrate.sessions(other), {"sim": client(sim)})
        before = list_calls(sim)
        results = {}
        ta = threading.Thread(target=lambda: results.setdefault("a", a.poll()[0]))
        ta.start()
        try:
            assert gate.arrived.wait(60), "a never asked for the listing"  # a holds the facility, waiting on it
            results["b"] = b.poll()[0]
        finally:
            gate.release.set()
            ta.join(60)
            gate.close()
        assert not ta.is_alive()
        assert results["b"].skipped and results["b"].changes == []
        assert results["a"].skipped is None and len(results["a"].changes) == 5
        assert list_calls(sim) - before == 1  # only a asked the facility
        # The lock was released: b polls now (and finds nothing new).
        (p,) = b.poll()
        assert p.skipped is None and p.changes == []
        with db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(ObservationStatus)
                            .where(ObservationStatus.state == "completed")) == 5
    finally:
        other.dispose()


def test_concurrent_pollers_record_each_change_once(db, sim):
    reqs = submitted(db, sim, 20)
    for _, gid in reqs:
        sim.set_state(gid, "COMPLETED")
    engines = [migrate.connect(db.url) for _ in range(3)] if db.kind == "postgresql" else []
    try:
        pollers = [Poller(migrate.sessions(e), {"sim": client(sim)}) for e in engines] or \
            [Poller(db.sessions, {"sim": client(sim)})] * 3
        threads = [threading.Thread(target=p.poll) for p in pollers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        for p in pollers:
            p.poll()
    finally:
        for e in engines:
            e.dispose()
    assert len(changed_events(db)) == 20
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ObservationStatus)
                        .where(ObservationStatus.state == "completed")) == 20


def test_open_requests_observer_and_settings(db, sim):
    submitted(db, sim, 2)
    got = []
    poller = Poller(db.sessions, {"sim": client(sim)}, PollSettings(max_workers=1), on_open=got.append)
    poller.poll()
    assert got == [{"pending": 2}]


# ---------------------------------------------------------------- scheduler --


def test_jobs_survive_exceptions_and_run_now(db, sim):
    from tomd.scheduler import Jobs

    ((rid, gid),) = submitted(db, sim)
    poller = Poller(db.sessions, {"sim": client(sim)})
    jobs = Jobs(first_delay_s=0.0, jitter_s=0.0)
    calls = []
    boom_ran = threading.Event()

    def boom():
        calls.append("boom")
        if len(calls) >= 2:
            boom_ran.set()
        raise RuntimeError("a bad cycle")

    jobs.add_interval("boom", boom, 0.2)
    jobs.add_pollers(poller, {"sim": 3600.0})  # far apart: only run_now makes it poll again
    with pytest.raises(ValueError):
        jobs.add_interval("boom", boom, 1.0)
    jobs.start()
    try:
        assert boom_ran.wait(60), "a job that raised must run again"
        deadline = time.time() + 60
        while jobs.runs.get("poll:sim", 0) < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert jobs.runs["poll:sim"] == 1 and jobs.failures.get("poll:sim") is None
        sim.set_state(gid, "COMPLETED")
        jobs.run_now("poll:sim")
        deadline = time.time() + 60
        while row(db, rid).state != "completed" and time.time() < deadline:
            time.sleep(0.05)
        assert row(db, rid).state == "completed"
        assert jobs.failures["boom"] >= 2 and "a bad cycle" in jobs.last_error["boom"]
        with pytest.raises(KeyError):
            jobs.run_now("poll:nowhere")
    finally:
        jobs.shutdown(wait=True)
    assert not jobs.running


# -------------------------------------------------------------- the commands --


@pytest.fixture
def cli(db, sim, tmp_path, capsys):
    import argparse

    from tomd.cli import App
    from tomd.facilities.cli import register

    cfg = tmp_path / "tomd.toml"
    cfg.write_text(f'''
[database]
url = "{db.url}"

[facilities.lab]
kind = "sim"
url = "{sim.url}"
token = "sim-token"
proposal = "SIM2026A-001"
timeout = "1s"

[facilities.lab.templates.1m-gri]
instrument_type = "1M0-SCICAM-SINISTRO"
filters = ["gp", "rp", "ip"]
exposure_time = 300
''')
    with db.sessions.begin() as s:
        upsert(s, TargetSpec(name="SN 2026cli", ra=150.0, dec=-20.0), origin="test")

    def run(*argv):
        p = argparse.ArgumentParser()
        p.add_argument("--config")
        register(p.add_subparsers(dest="command", required=True))
        args = p.parse_args(["--config", str(cfg), *argv])
        capsys.readouterr()
        code = args.func(App(args.config), args)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_obs_update_prints_changes_and_submit_takes_a_cadence(db, sim, cli):
    import json

    code, out, err = cli("obs", "submit", "SN 2026cli", "--facility", "lab", "--template", "1m-gri",
                         "--cadence", "every 1d x2")
    assert code == 0, err
    assert "cadence every 1d x2 (repeat 1)" in out
    code, out, _ = cli("obs", "update")
    assert code == 0 and "lab: 0 change(s) among 1 followed request(s)" in out
    (group,) = sim.groups()
    sim.set_state(group["id"], "COMPLETED")
    code, out, _ = cli("obs", "update", "--facility", "lab")
    assert code == 0
    assert "pending → completed (lab says COMPLETED); cadence: next request #2" in out
    code, out, _ = cli("obs", "show", "2", "--json")
    shown = json.loads(out)
    assert shown["state"] == "intent" and shown["series"] == 1 and shown["cadence"] == "every 1d x2 (repeat 2)"
    code, out, _ = cli("obs", "update", "--json", "--full")
    assert json.loads(out)[0]["changes"] == []


def test_bad_cadence_is_refused_before_anything_is_recorded(db, cli):
    from tomd.errors import InputError

    with pytest.raises(InputError) as e:
        cli("obs", "submit", "SN 2026cli", "--facility", "lab", "--template", "1m-gri", "--cadence", "every 1d")
    assert "--cadence" in str(e.value) and "needs an end" in str(e.value)
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ObservationRequest)) == 0


def test_the_daemon_runs_the_status_jobs(db):
    from tomd.config import Config, Facility
    from tomd.daemon import Daemon
    from tomd.metrics import instrument
    from tomd.scheduler import status_jobs

    cfg = Config(facilities={"lab": Facility(kind="sim", poll_interval=1.0)})
    daemon = Daemon(cfg, engine=db.engine)
    daemon.metrics = instrument(daemon)
    jobs = daemon.add(status_jobs(daemon.sessions, daemon.facilities, cfg, wake=daemon.submitter.wake,
                                  metrics=daemon.metrics))
    assert jobs.names() == ["cadence", "poll:lab"]
    with db.sessions.begin() as s:
        tid = upsert(s, TargetSpec(name="SN 2026run", ra=150.0, dec=-20.0), origin="test").target_id
    with db.sessions.begin() as s:
        rid = create_intent(s, target_id=tid, facility="lab", template="1m-gri", name="run-1")
    daemon.start()
    try:
        deadline = time.time() + 120
        while row(db, rid).state != "pending":
            assert time.time() < deadline
            time.sleep(0.05)
        (sim,) = daemon.facilities._sims
        sim.set_state(int(row(db, rid).facility_id), "COMPLETED")
        deadline = time.time() + 120
        while row(db, rid).state != "completed":
            assert time.time() < deadline
            time.sleep(0.05)
        assert daemon.metrics.registry.get_sample_value(
            "tomd_observation_status_changes_total", {"facility": "lab", "state": "completed"}) == 1
    finally:
        daemon.stop.set()
        assert daemon.wait() == 0
    assert not jobs.running


def test_a_poller_that_dies_releases_its_facility(db, sim):
    """The lock is a session lock: a killed process's connection ends and takes the lock with it."""
    if db.kind != "postgresql":
        pytest.skip("the cross-process lock is PostgreSQL's")
    import subprocess
    import sys
    import textwrap

    from tomd.status import LOCK_SPACE, lock_key

    ((rid, gid),) = submitted(db, sim)
    sim.set_state(gid, "COMPLETED")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sqlalchemy import create_engine, text
        c = create_engine({db.url!r}).connect()
        assert c.execute(text("SELECT pg_try_advisory_lock({LOCK_SPACE}, {lock_key('sim')})")).scalar()
        c.commit()
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        poller = Poller(db.sessions, {"sim": client(sim)})
        (p,) = poller.poll()
        assert p.skipped and row(db, rid).state == "pending"
        holder.kill()
        holder.wait(10)
        deadline = time.time() + 60
        while True:  # the server notices the closed connection at once; allow it a moment
            (p,) = poller.poll()
            if not p.skipped or time.time() > deadline:
                break
            time.sleep(0.2)
        assert p.skipped is None and [c.new_state for c in p.changes] == ["completed"]
    finally:
        if holder.poll() is None:
            holder.kill()


def test_states_progressing_by_themselves_at_the_sim_are_followed(db):
    # The sim's own timeline (nobody calls set_state), with the clock taken out: pending and running
    # last an hour each, and the test ends each phase by moving its end to now, as time would.
    with SimObservatory(pending_s=3600.0, running_s=3600.0) as sim:
        ((rid, gid),) = submitted(db, sim)
        created_by = time.monotonic()  # the group was created before this: its age is at least ours
        poller = Poller(db.sessions, {"sim": client(sim)})
        seen = [c.new_state for p in poller.poll() for c in p.changes]
        assert seen == []  # still pending

        def poll_until(state: str) -> None:
            deadline = time.time() + 60
            while row(db, rid).state != state:
                assert time.time() < deadline, (state, seen)
                seen.extend(c.new_state for p in poller.poll() for c in p.changes)
                time.sleep(0.1)

        sim.pending_s = time.monotonic() - created_by  # the observation starts now
        poll_until("in_progress")
        sim.running_s = time.monotonic() - created_by - sim.pending_s  # and ends now
        assert sim.running_s > 0
        poll_until("completed")
        # Each state the sim went through is seen, and recorded once.
        assert seen == ["in_progress", "completed"]
        assert [s for s, _ in history(db, rid)] == ["pending", "in_progress", "completed"]


@pytest.mark.skipif("completed_request_ids" not in __import__("tomd.facilities.base", fromlist=["x"])
                    .RequestStatus.__dataclass_fields__,
                    reason="RequestStatus has no completed_request_ids yet (tomd/facilities/base.py)")
def test_partial_completion_makes_the_data_due(db, sim):
    """A group of two requests: one COMPLETED while the group is still PENDING."""
    ((rid, gid),) = submitted(db, sim)
    (group,) = [g for g in sim.groups() if g["id"] == gid]
    poller = Poller(db.sessions, {"sim": client(sim)})
    poller.poll()
    sim.set_request_state(group["requests"][0]["id"], "COMPLETED")
    (p,) = poller.poll()
    assert p.changes == [] and row(db, rid).state == "pending" and row(db, rid).data_due_at is not None


def test_failed_cycles_reach_on_error_and_the_log_says_it_once_then_in_one_line(tmp_path, caplog):
    """A database without tables: every cycle and every open-request read fails. Each failure
    reaches ``on_error`` (tomd_database_errors_total{component="status"} in the daemon); the
    log holds one traceback per kind of failure, not one per cycle."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import sessionmaker

    engine = create_engine(f"sqlite:///{tmp_path}/empty.db")
    with SimObservatory(token=None) as sim:
        fac = LCOClient("sim", url=sim.url, proposal="SIM2026A-001")
        poller = Poller(sessionmaker(engine), {"sim": fac}, on_open=lambda counts: None)
        seen: list[BaseException] = []
        poller.on_error = seen.append
        caplog.set_level(logging.INFO, logger="tomd.status")
        for _ in range(10):
            (result,) = poller.poll()
            assert result.error and "no such table" in result.error
        fac.close()
    engine.dispose()
    assert len(seen) == 20 and all(isinstance(e, OperationalError) for e in seen)  # 10 cycles, 10 reads
    lines = [rec for rec in caplog.records if rec.name == "tomd.status"]
    assert len(lines) == 2 and all(rec.levelno == logging.ERROR and rec.exc_info for rec in lines), [
        rec.getMessage() for rec in lines]
