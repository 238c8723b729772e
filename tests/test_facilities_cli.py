"""``tomd obs``/``facility``/``sim`` commands against the simulated observatory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

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
timeout = "1s"

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


def test_python_m_sim_serves_until_interrupted():
    import signal

    p = subprocess.Popen([sys.executable, "-m", "tomd.facilities.sim", "--port", "0", "--speed", "100"],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "simulated observatory at http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        import httpx

        r = httpx.get(url + "/api/proposals/", headers={"Authorization": "Token sim-token"})
        assert r.json()["results"][0]["id"] == "SIM2026A-001"
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
