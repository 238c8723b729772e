"""``tomd obs``/``facility``/``sim`` commands against the simulated observatory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from tomd.cli import App
from tomd.errors import InputError, NotFoundError
from tomd.facilities.cli import register
from tomd.facilities.sim import SimObservatory
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert


@pytest.fixture
def sim():
    with SimObservatory(pending_s=3600) as s:
        yield s


@pytest.fixture
def run(db, sim, tmp_path, capsys):
    cfg = tmp_path / "tomd.toml"
    cfg.write_text(f'''
[database]
url = "{db.url}"

[facilities.lab]
kind = "sim"
url = "{sim.url}"
token = "sim-token"
proposal = "SIM2026A-001"
timeout = "30s"

[facilities.lab.templates.1m-gri]
instrument_type = "1M0-SCICAM-SINISTRO"
filters = ["gp", "rp", "ip"]
exposure_time = 300

[facilities.lab.templates.bad]
instrument_type = "1M0-SCICAM-SINISTRO"
filters = ["Halpha"]
exposure_time = 300

[facilities.locked]
kind = "lco"
url = "{sim.url}"
token = "not-the-token"

[facilities.broken]
kind = "lco"
url = "{sim.url}/nowhere"
token = "sim-token"
timeout = "30s"
''')
    with db.sessions.begin() as s:
        upsert(s, TargetSpec(name="SN 2026abc", ra=150.0, dec=-20.0), origin="test")

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


def test_submit_list_show_cancel(run, sim):
    code, out, err = run("obs", "submit", "SN 2026abc", "--facility", "lab", "--template", "1m-gri",
                         "--mode", "rapid_response", "--window", "now", "12h")
    assert code == 0, err
    assert "submitted to lab as" in out
    (group,) = sim.groups()
    assert group["observation_type"] == "RAPID_RESPONSE"
    code, out, _ = run("obs", "list", "--json")
    (row,) = json.loads(out)
    assert row["state"] == "pending" and row["facility_id"] == str(group["id"]) and row["target"] == "SN 2026abc"
    code, out, _ = run("obs", "show", str(row["id"]))
    assert "pending (PENDING)" in out and "accepted: lab request group" in out
    code, out, _ = run("obs", "cancel", row["name"])
    assert code == 0 and "cancelled by a person" in out
    assert sim.groups()[0]["state"] == "CANCELED"
    code, out, _ = run("obs", "show", str(row["id"]), "--json")
    assert [h["state"] for h in json.loads(out)["history"]] == ["pending", "cancelled"]
    with pytest.raises(InputError, match="already cancelled"):
        run("obs", "cancel", str(row["id"]))


def test_submit_rejected_in_the_facility_words(run, sim):
    code, _, err = run("obs", "submit", "SN 2026abc", "--facility", "lab", "--template", "bad")
    assert code == 1 and "rejected" in err and "Invalid filter 'Halpha'" in err
    code, out, _ = run("obs", "list", "--state", "rejected")
    assert "rejected" in out


def test_user_mistakes_are_clear(run):
    with pytest.raises(NotFoundError, match="no target named 'nope'"):
        run("obs", "submit", "nope", "--facility", "lab", "--template", "1m-gri")
    with pytest.raises(InputError, match="no facility 'x'"):
        run("obs", "submit", "SN 2026abc", "--facility", "x", "--template", "1m-gri")
    with pytest.raises(InputError, match="no template 'y'"):
        run("obs", "submit", "SN 2026abc", "--facility", "lab", "--template", "y")
    with pytest.raises(InputError, match="ISO-8601"):
        run("obs", "submit", "SN 2026abc", "--facility", "lab", "--template", "1m-gri", "--window", "soon", "1h")
    with pytest.raises(NotFoundError):
        run("obs", "show", "42")


def test_cancel_an_unsent_intent(run, db, sim):
    from tomd.submit import create_intent

    with db.sessions.begin() as s:
        create_intent(s, target_id=1, facility="lab", template="1m-gri", name="queued-1")
    code, out, _ = run("obs", "cancel", "queued-1")
    assert code == 0 and "before submission" in out and list(sim.received) == []


def test_facility_check(run):
    code, out, err = run("facility", "check", "--facility", "lab")
    assert code == 0 and "lab: OK" in out and "SIM2026A-001" in out
    code, out, err = run("facility", "check")
    assert code == 1 and "locked refused the API token (HTTP 403)" in err and "not-the-token" not in err


def test_facility_check_reports_a_404_and_goes_on_to_the_next_facility(run):
    # "broken" (a wrong URL: every path answers 404) sorts first: it must not stop the others' checks.
    code, out, err = run("facility", "check")
    assert code == 1
    assert "broken: broken: GET /nowhere/api/proposals/: not found at the facility (HTTP 404)" in err
    assert "lab: OK" in out and "locked refused the API token" in err


def _put(db, name, **values):
    from tomd.db import repository as repo
    from tomd.submit import create_intent

    with db.sessions.begin() as s:
        rid = create_intent(s, target_id=1, facility=values.pop("facility", "lab"), template="1m-gri", name=name)
        repo.update_observation(s, rid, values)
    return rid


def _row(db, rid):
    from tomd.db import repository as repo

    with db.sessions() as s:
        return repo.get_observation(s, rid)


def test_cancel_releases_its_claim_when_the_facility_answers_404(run, db):
    rid = _put(db, "lost-1", facility="broken", state="submitting", attempts=1)
    code, _, err = run("obs", "cancel", "lost-1")
    assert code == 1 and "not found at the facility (HTTP 404)" in err
    r = _row(db, rid)
    assert (r.state, r.claimed_by, r.claimed_until) == ("submitting", None, None)  # a submitter may take it again


def test_list_state_accepts_only_known_states(run):
    with pytest.raises(InputError, match="unknown state 'pendng'; did you mean pending"):
        run("obs", "list", "--state", "pendng")
    with pytest.raises(InputError, match="unknown state 'bogus'"):
        run("obs", "list", "--state", "bogus")
    code, _, err = run("obs", "list", "--state", "in-progress")
    assert code == 0 and "no observation requests" in err


def _events(db, kind):
    from sqlalchemy import select

    from tomd.db.models import OutboxEvent

    with db.sessions() as s:
        return [e.payload for e in s.scalars(select(OutboxEvent).where(OutboxEvent.kind == kind))]


def _history(db, rid):
    from tomd.db import repository as repo

    with db.sessions() as s:
        return [(h.state, h.message) for h in repo.observation_history(s, rid)]


UNKNOWN = ("gemini: outcome unknown after an interrupted submission, not resent: the ToO interface cannot be "
           "asked; check the program's observations and settle it with `tomd obs settle`")


def test_settle_an_unknown_outcome_that_exists(run, db, sim):
    rid = _put(db, "trig-1", state="rejected", last_error=UNKNOWN, attempts=1)
    code, out, _ = run("obs", "settle", "trig-1", "--facility-id", "GS-2026B-Q-1-7")
    assert code == 0 and "lab holds it as GS-2026B-Q-1-7" in out
    r = _row(db, rid)
    assert (r.state, r.facility_id, r.last_error) == ("pending", "GS-2026B-Q-1-7", None)
    assert r.submitted_at is not None
    assert _history(db, rid)[-1] == ("pending", "settled by a person: lab holds it as GS-2026B-Q-1-7")
    (ev,) = _events(db, "observation.submitted")
    assert ev["request_id"] == rid and ev["facility_id"] == "GS-2026B-Q-1-7" and ev["recovered"] is True
    with pytest.raises(InputError, match="is pending; only a request whose submission outcome is unknown"):
        run("obs", "settle", "trig-1", "--absent")


def test_settle_a_submitting_row_as_absent_fails_it_and_the_cadence_goes_on(run, db):
    from tomd.cadence import cadence_option

    rid = _put(db, "stuck-1", state="submitting", attempts=2, cadence=cadence_option("every 1d x3 retry 2 shift 6h"),
               last_error="lab: POST /api/requestgroups/: no answer within the timeout after sending")
    code, out, _ = run("obs", "settle", "stuck-1", "--absent")
    assert code == 0 and "lab holds no such request" in out and "cadence: next request #" in out
    r = _row(db, rid)
    assert (r.state, r.claimed_by, r.facility_id) == ("failed", None, None)
    assert _history(db, rid)[-1][0] == "failed"
    (ev,) = _events(db, "observation.failed")
    assert ev["request_id"] == rid and "settled by a person" in ev["reason"]
    assert len(_events(db, "observation.cadence_step")) == 1


def test_settle_refuses_what_is_not_unknown(run, db):
    _put(db, "plain-reject", state="rejected", last_error="lab rejected the request: filter: bad")
    with pytest.raises(InputError, match="is rejected; only a request"):
        run("obs", "settle", "plain-reject", "--absent")
    _put(db, "queued-2")
    with pytest.raises(InputError, match="was never sent"):
        run("obs", "settle", "queued-2", "--facility-id", "17")
    from datetime import datetime, timedelta, timezone

    _put(db, "busy-1", state="submitting", claimed_by="w1",
         claimed_until=datetime.now(timezone.utc) + timedelta(minutes=5))
    with pytest.raises(InputError, match="being submitted right now"):
        run("obs", "settle", "busy-1", "--absent")


def test_python_m_sim_serves_until_interrupted():
    import signal

    p = subprocess.Popen([sys.executable, "-m", "tomd.facilities.sim", "--port", "0", "--speed", "100"],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "simulated observatory at http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        import httpx

        r = httpx.get(url + "/api/proposals/", headers={"Authorization": "Token sim-token"}, timeout=30)
        assert r.json()["results"][0]["id"] == "SIM2026A-001"
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0
