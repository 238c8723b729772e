"""The Gemini ToO trigger client against a loopback server speaking the ``/too`` interface (no mocks).

The server follows Gemini's description of the interface (urltoo_readme.txt):
form fields, 200 with the new observation id as plain text, 400 with a
message for a bad trigger. Credentials: our server answers 401 to a wrong
user key. Faults: 5xx, 429, a dropped connection, and an answer that never
comes after the observation was created.
"""

from __future__ import annotations

import random
import re
import socket
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from tests.loopback import LoopbackServer
from tomd.config import load_config
from tomd.db.models import ObservationRequest
from tomd.errors import PermanentError, RetryableError
from tomd.facilities import open_facilities
from tomd.facilities.base import Intent, TemplateError, TokenRefused, ValidationRejected
from tomd.facilities.gemini import (
    GeminiClient,
    LookupUnsupported,
    OutcomeUnknown,
    build_trigger,
    check_trigger,
    dec_dms,
    ra_hms,
)
from tomd.submit import SubmitSettings, Submitter, create_intent
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert

PROGRAM = "GS-2026A-Q-101"
EMAIL, KEY = "pi@example.org", "s3cret-user-key-9f"
TEMPLATES = {
    "gmos-r": {"obsnum": 12, "exptime": 300, "max_airmass": 1.8, "group": "tomd triggers"},
    "flamingos": {"obsnum": 13, "note": "Finder: https://example.org/chart.png"},
    "missing": {"obsnum": 99},  # no such template at the server
}
FAST = SubmitSettings(lease_s=30, max_attempts=8, backoff_base_s=0.01, backoff_cap_s=0.05, settle_s=0.05,
                      token_backoff_s=60, batch=50, sweep_interval_s=5)


# ------------------------------------------------------ the loopback server --


class GeminiODB(LoopbackServer):
    """A Gemini ODB's ToO servlet on loopback: one program with On Hold templates 12 and 13."""

    def __init__(self, hang_s: float = 600.0):  # an answer that never comes: the client's timeout ends it
        super().__init__(hang_s)
        self.observations: dict[str, dict[str, str]] = {}
        self.next_obs = 20
        self.requests: list[dict[str, str]] = []  # what arrived (URL query included) before any fault

    def notes(self) -> Counter:
        with self.lock:
            return Counter(o["noteTitle"] for o in self.observations.values())

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0)).decode()
        form = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        form.update({k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()})
        with self.lock:
            self.requests.append({"query": parts.query, **form})
        fault = self.next_fault()
        if fault == "500":
            return self.reply(h, 500, "Internal Server Error")
        if fault == "429":
            return self.reply(h, 429, "Too Many Requests", {"Retry-After": "0.05"})
        if fault == "drop":
            return self.drop(h)
        if parts.path != "/too":
            return self.reply(h, 404, "Not Found")
        status, text = self.route(form)
        if fault and fault.startswith("accept_then"):
            if fault == "accept_then_hang":
                return self.hang_then_drop(h)
            if fault == "accept_then_drop":
                return self.drop(h)
            return self.reply(h, 500, "<html><head><title>Error 500 Server Error</title></head></html>")
        self.reply(h, status, text)

    def route(self, f: dict[str, str]) -> tuple[int, str]:
        if f.get("email") != EMAIL or f.get("password") != KEY:
            return 401, "Invalid user key or password"
        if f.get("prog") != PROGRAM:
            return 400, f"Program {f.get('prog')} not found"
        for k in ("target", "ra", "dec"):
            if not f.get(k):
                return 400, k
        if f.get("obsnum") not in ("12", "13"):
            return 400, f"Observation {PROGRAM}-{f.get('obsnum')} is not an On Hold template"
        if not re.match(r"^\d{1,2}:\d{2}:\d{2}(\.\d+)?$", f["ra"]) or \
                not re.match(r"^[+-]?\d{1,2}:\d{2}:\d{2}(\.\d+)?$", f["dec"]):
            return 400, "Could not parse ra or dec"
        if any(f.get(k) for k in ("gstarget", "gsra", "gsdec", "gsmags", "gsprobe")) and \
                not all(f.get(k) for k in ("gsra", "gsdec", "gsprobe")):
            return 400, "guide star not completely specified"
        if f.get("exptime") and not 1 <= int(f["exptime"]) <= 1200:
            return 400, "exptime must be between 1 and 1200"
        with self.lock:
            self.next_obs += 1
            obsid = f"{PROGRAM}-{self.next_obs}"
            self.observations[obsid] = dict(f)
        return 200, obsid

    def reply(self, h, status: int, text: str, headers=None) -> None:
        self.send(h, status, text.encode(), "text/plain", headers)


class Quoting(LoopbackServer):
    """A servlet that quotes the form it got back, password included, with ``status``."""

    def __init__(self, status: int):
        super().__init__()
        self.status = status

    def handle(self, h) -> None:
        form = parse_qs(h.rfile.read(int(h.headers.get("Content-Length") or 0)).decode())
        self.send(h, self.status, f"no {form['password'][0]} for {form['email'][0]}".encode(), "text/plain")


@pytest.fixture
def odb():
    with GeminiODB() as s:
        yield s


# A loaded machine may take a second or more to answer on loopback: every call must beat the
# client's timeout (30 s), except where a test makes the servlet hang on purpose: there the client
# waits HANG_TIMEOUT (the hang lasts until the server is left), or STORM_TIMEOUT in a storm of faults.
HANG_TIMEOUT = 2.0
STORM_TIMEOUT = 1.0


def client(odb, **kw) -> GeminiClient:
    args = dict(url=odb.url, email=EMAIL, token=KEY, proposal=PROGRAM, templates=TEMPLATES, timeout=30.0,
                max_attempts=3, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)
    args.update(kw)
    return GeminiClient("gemini", **args)


def target(name="SN 2026abc", ra=150.0, dec=-20.0):
    return SimpleNamespace(name=name, ra=ra, dec=dec)


# ------------------------------------------------------------ pure building --


def test_coordinates_are_sexagesimal_and_never_round_to_sixty():
    assert ra_hms(150.0) == "10:00:00.00"
    assert ra_hms(359.9999999) == "00:00:00.00"
    assert ra_hms(10.6847083) == "00:42:44.33"  # M31
    assert dec_dms(41.26875) == "+41:16:07.500"
    assert dec_dms(-0.5) == "-00:30:00.000"
    assert dec_dms(-29.99999999) == "-30:00:00.000"


def test_build_trigger_from_template_and_intent():
    start = datetime(2026, 11, 24, 3, 7, 30, tzinfo=timezone.utc)
    doc = build_trigger(TEMPLATES["gmos-r"], target(), Intent(name="tomd-42", window_start=start,
                                                                window_end=start + timedelta(hours=6)),
                        default_program=PROGRAM)
    assert doc["prog"] == PROGRAM and doc["obsnum"] == "12" and doc["target"] == "SN 2026abc"
    assert (doc["ra"], doc["dec"]) == ("10:00:00.00", "-20:00:00.000")
    assert (doc["windowDate"], doc["windowTime"], doc["windowDuration"]) == ("2026-11-24", "03:07", "6")
    assert (doc["elevationType"], doc["elevationMin"], doc["elevationMax"]) == ("airmass", "1.0", "1.8")
    assert doc["exptime"] == "300" and doc["group"] == "tomd triggers" and doc["ready"] == "true"
    assert doc["noteTitle"] == "tomd tomd-42" and doc["note"].startswith("tomd request tomd-42")
    assert "password" not in doc and "email" not in doc  # credentials join at send time only
    assert check_trigger(doc) == []


@pytest.mark.parametrize("template, words", [
    ({"exptime": 10}, "needs obsnum"),
    ({"obsnum": 12, "program": "LCO2026A-001"}, "not a Gemini program id"),
    ({"obsnum": 12, "filter": "r"}, "unknown key 'filter'"),
    ({"obsnum": 12, "window": "soon"}, "window"),
])
def test_template_errors_name_the_key(template, words):
    with pytest.raises(TemplateError, match=words):
        build_trigger(template, target(), Intent(name="t"), default_program=PROGRAM, template_name="gem.x")


def test_orbital_targets_are_refused():
    with pytest.raises(TemplateError, match="need ra/dec"):
        build_trigger(TEMPLATES["gmos-r"], SimpleNamespace(name="C/2026 A1", ra=None, dec=None), Intent(name="t"),
                      default_program=PROGRAM)


@pytest.mark.parametrize("change, path, words", [
    ({"gsra": "10:00:10.0"}, "gsra", "guide star not completely specified"),
    ({"gsra": "10:00:10.0", "gsdec": "-20:01:00", "gsprobe": "PWFS3"}, "gsprobe", "PWFS3"),
    ({"exptime": "0"}, "exptime", "1 to 1200"),
    ({"exptime": "1500"}, "exptime", "1 to 1200"),
    ({"elevationType": "airmass", "elevationMin": "1.0", "elevationMax": "3.0"}, "elevationMax", "2.5"),
    ({"elevationType": "hourAngle", "elevationMin": "-6", "elevationMax": "2"}, "elevationMax", "-5"),
    ({"mags": "18.5/r"}, "mags", "value/band/system"),
    ({"mags": "18.5/w/AB"}, "mags", "band 'w'"),
    ({"windowTime": ""}, "windowDate", "go together"),
    ({"ra": "25:00:00"}, "ra", "cannot parse"),
    ({"dec": "-95:00:00"}, "dec", "cannot parse"),
    ({"ready": "maybe"}, "ready", "true or false"),
    ({"prog": "GS-2026A"}, "prog", "program id"),
    ({"colour": "red"}, "colour", "not a parameter"),
])
def test_local_validation_follows_the_documented_rules(change, path, words):
    doc = build_trigger(TEMPLATES["gmos-r"], target(), Intent(name="t"), default_program=PROGRAM)
    issues = check_trigger({**doc, **change})
    assert any(i.path == path and words in i.message for i in issues), issues


def test_validate_checks_the_site_of_the_program(odb):
    c = client(odb)
    doc = c.build_request("gmos-r", target(), Intent(name="t"))
    assert c.validate(doc).ok
    v = c.validate({**doc, "prog": "GN-2026A-Q-7"})
    assert not v.ok and v.issues[0].path == "prog" and "GS" in v.issues[0].message
    assert odb.requests == []  # validation never calls the server: the interface has no such call
    c.close()


# ------------------------------------------------------------------ the wire --


def test_submit_creates_one_observation_with_the_key_in_its_note(odb):
    c = client(odb)
    doc = c.build_request("flamingos", target(), Intent(name="tomd-7"))
    sub = c.submit(doc)
    assert re.match(rf"^{PROGRAM}-\d+$", sub.facility_id)
    assert sub.name == "tomd-7" and (sub.state.common, sub.state.word) == ("pending", "READY")
    obs = odb.observations[sub.facility_id]
    assert obs["noteTitle"] == "tomd tomd-7" and "Finder: https://example.org/chart.png" in obs["note"]
    assert obs["target"] == "SN 2026abc" and obs["ready"] == "true"
    # the user key travels in the form body, never in the URL (URLs end up in logs)
    assert KEY not in odb.requests[-1]["query"] and odb.requests[-1]["password"] == KEY
    c.close()


def test_server_rejection_is_reported_in_its_words(odb):
    c = client(odb)
    with pytest.raises(ValidationRejected) as err:
        c.submit(c.build_request("missing", target(), Intent(name="t")))
    assert "is not an On Hold template" in str(err.value)
    doc = c.build_request("gmos-r", target(), Intent(name="t"))
    with pytest.raises(ValidationRejected) as err:
        c.submit({k: v for k, v in doc.items() if k != "ra"})  # the server names the missing parameter
    assert err.value.issues[0].path == "ra" and err.value.status == 400
    with pytest.raises(ValidationRejected, match="guide star not completely specified"):
        c.submit({**doc, "gstarget": "GS1"})
    assert odb.observations == {}
    c.close()


def test_wrong_user_key_is_refused_without_showing_it(odb):
    c = client(odb, token="wrong-key-123")
    with pytest.raises(TokenRefused) as err:
        c.submit(c.build_request("gmos-r", target(), Intent(name="t")))
    assert "wrong-key-123" not in str(err.value) and KEY not in str(err.value)
    assert "facilities.gemini.email and token" in str(err.value)
    c.close()


def test_429_is_waited_out_and_submitted_once(odb):
    odb.faults = ["429", "429"]
    c = client(odb)
    sub = c.submit(c.build_request("gmos-r", target(), Intent(name="tomd-429")))
    assert list(odb.observations) == [sub.facility_id] and len(odb.requests) == 3
    c.close()


@pytest.mark.parametrize("fault", ["accept_then_hang", "accept_then_drop", "accept_then_500", "500", "drop"])
def test_unknown_outcome_is_never_resent(odb, fault):
    odb.faults = [fault]
    c = client(odb, timeout=HANG_TIMEOUT)
    with pytest.raises(OutcomeUnknown) as err:
        c.submit(c.build_request("gmos-r", target(), Intent(name="tomd-amb")))
    assert isinstance(err.value, PermanentError)
    msg = str(err.value)
    assert "not resent" in msg and "tomd tomd-amb" in msg and KEY not in msg and EMAIL not in msg
    assert len(odb.requests) == 1  # one POST, whatever happened to it
    with pytest.raises(LookupUnsupported, match="tomd tomd-amb"):
        c.find_by_name("tomd-amb")
    c.close()


def test_connection_refused_is_retryable():
    with socket.socket() as s:  # bound, never listening: refused, and no other process can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        c = GeminiClient("gemini", url=f"http://127.0.0.1:{port}", email=EMAIL, token=KEY, proposal=PROGRAM,
                         templates=TEMPLATES, timeout=30.0, max_attempts=2, backoff_base=0.01, backoff_cap=0.02)
        with pytest.raises(RetryableError, match="cannot connect") as err:
            c.submit(c.build_request("gmos-r", target(), Intent(name="t")))
    assert not isinstance(err.value, PermanentError)
    c.close()


def test_what_the_interface_cannot_do_is_said(odb):
    c = client(odb)
    assert c.statuses([f"{PROGRAM}-21"]) == {}
    with pytest.raises(PermanentError, match="cannot cancel"):
        c.cancel(f"{PROGRAM}-21")
    assert c.data_products(f"{PROGRAM}-21") == []
    assert [s.code for s in c.sites()] == ["cpo"]
    rep = c.check()
    assert rep.ok and rep.proposals == (PROGRAM,)
    bad = GeminiClient("g2", url=odb.url, proposal="GN-2026A-Q-7", templates={"x": {"obsnum": 1,
                                                                                     "program": PROGRAM}})
    rep = bad.check()
    assert not rep.ok and any("email" in p for p in rep.problems) and any("not at GN" in p for p in rep.problems)
    assert odb.requests == []
    c.close()
    bad.close()


# ------------------------------------------------------ exactly-once, end to end --


def _target_id(db) -> int:
    with db.sessions.begin() as s:
        return upsert(s, TargetSpec(name="SN 2026gem", ra=150.0, dec=-20.0), origin="test").target_id


@pytest.mark.parametrize("status,error", [(200, OutcomeUnknown), (400, ValidationRejected)])
def test_the_password_never_shows_even_when_the_server_quotes_it(status, error):
    with Quoting(status) as q:
        c = client(q)
        with pytest.raises(error) as exc:
            c.submit(c.build_request("gmos-r", target(), Intent(name="tomd-q")))
    assert f"no *** for {EMAIL}" in str(exc.value) and KEY not in str(exc.value)


def test_storm_of_faults_no_trigger_twice_every_intent_settles(db, odb):
    tid = _target_id(db)
    n = 24
    with db.sessions.begin() as s:
        for i in range(n):
            create_intent(s, target_id=tid, facility="gemini", template="missing" if i < 2 else "gmos-r",
                          name=f"tomd-g-{i}")
    odb.chaos = (0.35, random.Random(11))
    sub = Submitter(db.sessions, {"gemini": client(odb, timeout=STORM_TIMEOUT)}, FAST)
    sub.run_until_settled(timeout_s=300)
    odb.chaos = None
    notes = odb.notes()
    assert all(c == 1 for c in notes.values()), notes
    with db.sessions() as s:
        final = list(s.scalars(select(ObservationRequest).order_by(ObservationRequest.id)))
    assert len(final) == n
    by_note = {o["noteTitle"]: obsid for obsid, o in odb.observations.items()}
    for r in final:
        assert r.state in ("pending", "rejected", "failed"), (r.name, r.state, r.last_error)
        if r.state == "pending":
            assert by_note[f"tomd {r.name}"] == r.facility_id
            assert "password" not in (r.request or {})
        else:
            assert r.last_error
            assert KEY not in r.last_error
            if "outcome unknown" not in r.last_error:
                assert f"tomd {r.name}" not in by_note
    assert {r.name for r in final if r.state == "rejected"} >= {"tomd-g-0", "tomd-g-1"} - {
        r.name for r in final if r.state == "failed"}
    assert sum(r.state == "pending" for r in final) >= 5  # chaos leaves most triggers through


def test_crash_mid_post_is_never_resent(db, odb):
    """A row left "submitting" (a worker died during the POST) cannot be looked up: it ends rejected (final, for a person),
    never resent."""
    tid = _target_id(db)
    with db.sessions.begin() as s:
        rid = create_intent(s, target_id=tid, facility="gemini", template="gmos-r", name="tomd-crash")
    with db.sessions.begin() as s:
        row = s.get(ObservationRequest, rid)
        row.state, row.attempts = "submitting", 1
    sub = Submitter(db.sessions, {"gemini": client(odb)}, FAST)
    out = sub.run_once()
    assert out[0].state == "rejected" and "not resent" in out[0].message and "cannot look a trigger up" in out[0].message
    assert sub.run_once() == []  # settled: nothing left to claim
    assert odb.requests == []


def test_open_facilities_builds_gemini_and_swift_clients(tmp_path):
    path = tmp_path / "tomd.toml"
    path.write_text(f"""
[facilities.gemini-south]
kind = "gemini"
url = "https://gsodb.gemini.edu:8443"
email = "{EMAIL}"
token = "{KEY}"
proposal = "{PROGRAM}"
tls_verify = false

[facilities.gemini-south.templates.gmos-r]
obsnum = 12
exptime = 300

[facilities.swift]
kind = "swift"
url = "https://www.swift.psu.edu/toop/submit_json.php"
username = "tomduser"
token = "swift-secret"
job_wait = "2m"
""")
    config = load_config(path, env={})
    assert config.facilities["swift"].job_wait == 120.0 and config.facilities["gemini-south"].tls_verify is False
    with open_facilities(config) as facs:
        gem, swift = facs["gemini-south"], facs["swift"]
        assert type(gem).__name__ == "GeminiClient" and gem.templates["gmos-r"]["obsnum"] == 12
        assert type(swift).__name__ == "SwiftClient" and swift.job_wait == 120.0


@pytest.mark.parametrize("body, words", [
    ('kind = "swift"\nurl = "https://s.example.org"\ntoken = "x"', "facilities.s.username: missing required key"),
    ('kind = "swift"\nurl = "https://s.example.org"\nusername = "u"', "facilities.s.token: missing required key"),
])
def test_config_names_the_missing_credential(tmp_path, body, words):
    from tomd.errors import ConfigError

    path = tmp_path / "tomd.toml"
    path.write_text(f"[facilities.s]\n{body}\n")
    with pytest.raises(ConfigError, match=words):
        load_config(path, env={})
