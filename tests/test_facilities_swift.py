"""The Swift TOO client against a loopback server speaking the TOO API (no mocks).

The server follows what swifttools' ``swift_too`` sends and reads: one POST
endpoint taking a form field ``jwt`` (HS256, signed with the user's shared
secret); ``Swift_TOO_Request`` queues a job answered by a ``Swift_TOO_Status``
(Queued → Accepted with ``too_id`` / Rejected with ``errors``), polled by
``Swift_TOO_Status`` with ``jobnumber``; ``Swift_TOO_Requests`` lists the
user's TOOs. A TOO becomes visible only once its job is processed. Faults:
5xx, 429, dropped connections, an answer that never comes after the job was
queued, and a wrong shared secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import socket
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace
from urllib.parse import parse_qs

import pytest
from sqlalchemy import select

from tests.loopback import LoopbackServer
from tomd.db.models import ObservationRequest
from tomd.errors import AmbiguousError, PermanentError, RetryableError
from tomd.facilities.base import Intent, TemplateError, TokenRefused, ValidationRejected
from tomd.facilities.swift import SwiftClient, build_too, check_too, encode_jwt, entry_state
from tomd.submit import SubmitSettings, Submitter, create_intent
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert

USER, SECRET = "tomduser", "swift-shared-secret-77"
TEMPLATES = {
    "xrt": {"source_type": "Supernova", "obs_type": "Light Curve", "exposure": 2000, "opt_mag": 17.5,
            "opt_filt": "r", "science_just": "Early X-ray emission constrains the progenitor.",
            "exp_time_just": "2 ks reaches the expected flux.", "immediate_objective": "Detect X-rays"},
    "monitor": {"source_type": "TDE", "obs_type": "Light Curve", "exp_time_per_visit": 1000, "num_of_visits": 5,
                "monitoring_freq": "2 days", "xrt_countrate": 0.05, "science_just": "TDE evolution.",
                "exp_time_just": "1 ks per visit.", "urgency": 3},
    "too-long": {"source_type": "AGN", "obs_type": "Spectroscopy", "exposure": 90000, "opt_mag": 15.0,
                 "opt_filt": "V", "science_just": "x", "exp_time_just": "y"},  # the server refuses > 20 ks
}
FAST = SubmitSettings(lease_s=30, max_attempts=8, backoff_base_s=0.01, backoff_cap_s=0.05, settle_s=0.05,
                      token_backoff_s=60, batch=50, sweep_interval_s=5)


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# ------------------------------------------------------ the loopback server --


class SwiftTOOServer(LoopbackServer):
    """The TOO API on loopback: jobs processed ``process_s`` after they are queued."""

    path = "/toop/submit_json.php"

    def __init__(self, process_s: float = 0.02, hang_s: float = 600.0):  # a hang: the client's timeout ends it
        super().__init__(hang_s)
        self.process_s = process_s
        self.jobs: dict[int, dict] = {}
        self.toos: dict[int, dict] = {}
        self.next_job, self.next_too = 100, 20000
        self.calls: list[tuple[str, dict]] = []
        self.raw_forms: list[str] = []

    # -- controls ---------------------------------------------------------------

    def decide(self, too_id: int, decision: str | None = None, done: int = 0) -> None:
        with self.lock:
            self.toos[too_id].update(decision=decision, done=done)

    def tags(self) -> Counter:
        with self.lock:
            return Counter(t["immediate_objective"].rsplit("[tomd ", 1)[-1] for t in self.toos.values())

    def submissions(self) -> list[dict]:
        return [d for name, d in self.calls if name == "Swift_TOO_Request" and not d.get("validate_only")]

    # -- behaviour --------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0)).decode()
        with self.lock:
            self.raw_forms.append(raw)
        token = (parse_qs(raw).get("jwt") or [""])[-1]
        try:
            head, body, sig = token.split(".")
            payload = json.loads(_unb64(body))
            user = payload["api_data"].get("username")
        except (ValueError, KeyError):
            return self.status(h, {"status": "Rejected", "errors": ["Could not decode the JWT."]})
        good = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        if user != USER or not hmac.compare_digest(_unb64(sig), good):
            return self.status(h, {"status": "Rejected",
                                   "errors": [f"JWT signature verification failed for user {user}: check the "
                                              f"username and shared secret."]})
        api_name, data = payload["api_name"], dict(payload["api_data"])
        with self.lock:
            self.calls.append((api_name, data))
        fault = self.next_fault(after_effect=api_name == "Swift_TOO_Request")
        if fault == "500":
            return self.send(h, 500, b"<html>Internal Server Error</html>", "text/html")
        if fault == "429":
            return self.send(h, 429, b"Too many requests", "text/plain", {"Retry-After": "0.05"})
        if fault == "drop":
            return self.drop(h)
        answer = self.route(api_name, data)
        if fault == "accept_then_hang":
            return self.hang_then_drop(h)
        if fault == "accept_then_drop":
            return self.drop(h)
        if fault == "accept_then_500":
            return self.send(h, 500, b"<html>Internal Server Error</html>", "text/html")
        self.send(h, 200, json.dumps(answer).encode())

    def route(self, api_name: str, d: dict) -> dict:
        if api_name == "Swift_TOO_Request":
            errors = self.check(d)
            with self.lock:
                self.next_job += 1
                job = {"jobnumber": self.next_job, "queued": time.monotonic(), "errors": errors, "too_id": None,
                       "request": d}
                self.jobs[job["jobnumber"]] = job
            return self.wrap({"status": "Queued", "jobnumber": job["jobnumber"], "errors": [], "warnings": []})
        if api_name == "Swift_TOO_Status":
            with self.lock:
                job = self.jobs.get(int(d.get("jobnumber", -1)))
                if job is None:
                    return self.wrap({"status": "Rejected", "errors": ["No such job."]})
                return self.wrap(self.job_status(job))
        if api_name == "Swift_TOO_Requests":
            with self.lock:
                for job in self.jobs.values():
                    self.job_status(job)  # process what is due
                entries = sorted(self.toos.values(), key=lambda t: -t["too_id"])
                if d.get("too_id") is not None:
                    entries = [t for t in entries if t["too_id"] == int(d["too_id"])]
                entries = entries[: int(d.get("limit") or 10)]
                return {"api_name": "Swift_TOO_Requests", "api_version": "1.2", "api_data": {
                    "entries": [{"api_name": "Swift_TOO_Request", "api_data": t} for t in entries],
                    "status": {"api_name": "Swift_TOO_Status", "api_data": {"status": "Accepted", "errors": []}}}}
        return self.wrap({"status": "Rejected", "errors": [f"Unknown api_name {api_name}"]})

    def job_status(self, job: dict) -> dict:
        """(lock held) Queued until due; then processed once: a TOO stored, or the errors."""
        if time.monotonic() - job["queued"] < self.process_s:
            return {"status": "Queued", "jobnumber": job["jobnumber"], "errors": [], "warnings": []}
        if job["errors"]:
            return {"status": "Rejected", "jobnumber": job["jobnumber"], "errors": job["errors"]}
        d = job["request"]
        if not d.get("validate_only") and not d.get("debug") and job["too_id"] is None:
            self.next_too += 1
            job["too_id"] = self.next_too
            self.toos[self.next_too] = {**{k: v for k, v in d.items() if k != "validate_only"},
                                        "too_id": self.next_too, "l_name": "Tom D", "decision": None, "done": 0,
                                        "timestamp": "2026-11-28 23:00:00"}
        return {"status": "Accepted", "jobnumber": job["jobnumber"], "too_id": job["too_id"], "errors": [],
                "warnings": []}

    @staticmethod
    def check(d: dict) -> list[str]:
        errors = []
        for k in ("ra", "dec", "num_of_visits", "exp_time_just", "source_type", "source_name", "science_just",
                  "username", "obs_type"):
            if d.get(k) is None:
                errors.append(f"Missing key: {k}")
        if d.get("obs_type") not in ("Spectroscopy", "Light Curve", "Position", "Timing"):
            errors.append("obs_type: Observation Type needs to be one of Spectroscopy, Light Curve, Position, Timing")
        if int(d.get("exposure") or 0) > 20000:
            errors.append("exposure: Requested exposure exceeds the 20 ks allowed for a TOO.")
        return errors

    @staticmethod
    def wrap(status: dict) -> dict:
        return {"api_name": "Swift_TOO_Status", "api_version": "1.2", "api_data": status}

    def status(self, h, st: dict) -> None:
        self.send(h, 200, json.dumps(self.wrap(st)).encode())


@pytest.fixture
def api():
    with SwiftTOOServer() as s:
        yield s


# A loaded machine may take a second or more to answer on loopback: every call must beat the
# client's timeout (30 s), and every job be processed within job_wait (60 s; polled every 10 ms,
# so the wait ends as soon as it is), except where a test makes the API hang on purpose: there the
# client waits HANG_TIMEOUT (the hang lasts until the server is left), or STORM_TIMEOUT in a storm.
HANG_TIMEOUT = 2.0
STORM_TIMEOUT = 1.0


def client(api, **kw) -> SwiftClient:
    args = dict(url=api.url, username=USER, token=SECRET, templates=TEMPLATES, timeout=30.0, max_attempts=3,
                backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0, job_wait=60.0, poll_s=0.01)
    args.update(kw)
    return SwiftClient("swift", **args)


def target(name="SN 2026abc", ra=150.0, dec=-20.0):
    return SimpleNamespace(name=name, ra=ra, dec=dec)


# ------------------------------------------------------------ pure building --


def test_jwt_is_hs256_and_deterministic():
    a = encode_jwt({"api_name": "x", "api_data": {"b": 1, "a": 2}}, "k")
    assert a == encode_jwt({"api_data": {"a": 2, "b": 1}, "api_name": "x"}, "k")
    head, body, sig = a.split(".")
    assert json.loads(_unb64(head)) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(_unb64(body))["api_data"] == {"a": 2, "b": 1}
    assert _unb64(sig) == hmac.new(b"k", f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert "k" not in a.split(".")[1]


def test_build_too_from_template_and_intent():
    doc = build_too(TEMPLATES["xrt"], target(), Intent(name="tomd-5", mode="RAPID_RESPONSE"))
    assert doc["source_name"] == "SN 2026abc" and (doc["ra"], doc["dec"]) == (150.0, -20.0)
    assert doc["urgency"] == 2 and doc["instrument"] == "XRT" and doc["xrt_mode"] == "PC"
    assert doc["uvot_mode"] == "0x9999" and doc["exposure"] == 2000 and doc["num_of_visits"] == 1
    assert doc["immediate_objective"] == "Detect X-rays [tomd tomd-5]"
    assert "username" not in doc and "shared_secret" not in doc
    assert check_too(doc) == []
    assert build_too(TEMPLATES["xrt"], target(), Intent(name="t", mode="TIME_CRITICAL"))["urgency"] == 1
    assert build_too(TEMPLATES["xrt"], target(), Intent(name="t", mode="4"))["urgency"] == 4
    assert build_too(TEMPLATES["xrt"], target(), Intent(name="t", mode="NORMAL"))["urgency"] == 3
    mon = build_too(TEMPLATES["monitor"], target(), Intent(name="t"))
    assert mon["exposure"] == 5000 and check_too(mon) == []


@pytest.mark.parametrize("template, words", [
    ({**TEMPLATES["xrt"], "source_type": None}, "needs source_type"),
    ({k: v for k, v in TEMPLATES["xrt"].items() if k != "exposure"}, "needs exposure"),
    ({**TEMPLATES["xrt"], "filter": "u"}, "unknown key 'filter'"),
])
def test_template_errors_name_the_key(template, words):
    with pytest.raises(TemplateError, match=words):
        build_too(template, target(), Intent(name="t"), template_name="sw.x")


@pytest.mark.parametrize("change, path", [
    ({"opt_mag": None}, "opt_mag"),
    ({"num_of_visits": 3, "exp_time_per_visit": 600}, "monitoring_freq"),
    ({"source_type": "GRB"}, "grb_triggertime"),
    ({"uvot_mode": "0x30ed"}, "uvot_just"),
    ({"obs_type": "Imaging"}, "obs_type"),
    ({"urgency": 7}, "urgency"),
    ({"instrument": "NuSTAR"}, "instrument"),
    ({"proposal": True}, "proposal_id"),
    ({"ra": 400.0}, "ra"),
])
def test_local_checks_follow_the_form_rules(change, path):
    doc = {**build_too(TEMPLATES["xrt"], target(), Intent(name="t")), **change}
    assert any(i.path == path for i in check_too(doc)), check_too(doc)


def test_entry_states_keep_swifts_words():
    assert (entry_state({"decision": None}).common, entry_state({}).word) == ("pending", "Awaiting decision")
    assert entry_state({"decision": "Approved"}).common == "scheduled"
    assert (entry_state({"decision": "Approved", "done": 1}).common,
            entry_state({"decision": "Approved", "done": 1}).word) == ("completed", "Done")
    assert entry_state({"decision": "Rejected"}).common == "failed"


# ------------------------------------------------------------------ the wire --


def test_validate_asks_the_server_without_submitting(api):
    c = client(api)
    assert c.validate(c.build_request("xrt", target(), Intent(name="v1"))).ok
    v = c.validate(c.build_request("too-long", target(), Intent(name="v2")))
    assert not v.ok and v.issues[0].path == "exposure" and "20 ks" in v.issues[0].message
    local = c.validate({**c.build_request("xrt", target(), Intent(name="v3")), "opt_mag": None})
    assert not local.ok and local.issues[0].path == "opt_mag"
    assert api.toos == {} and [d.get("validate_only") for _, d in api.calls if _ == "Swift_TOO_Request"] == [
        True, True]
    c.close()


def test_submit_queues_polls_and_returns_the_too_id(api):
    c = client(api)
    sub = c.submit(c.build_request("xrt", target(), Intent(name="tomd-1")))
    too = api.toos[int(sub.facility_id)]
    assert sub.name == "tomd-1" and (sub.state.common, sub.state.word) == ("pending", "Accepted")
    assert too["source_name"] == "SN 2026abc" and too["immediate_objective"].endswith("[tomd tomd-1]")
    assert [n for n, _ in api.calls].count("Swift_TOO_Status") >= 1  # the job was polled
    # the shared secret never travels: only a token signed with it
    assert all(SECRET not in f for f in api.raw_forms)
    found = c.find_by_name("tomd-1")
    assert [f.facility_id for f in found] == [sub.facility_id] and found[0].name == "tomd-1"
    assert c.find_by_name("tomd-") == []  # exact tag, not a prefix
    c.close()


def test_server_rejection_is_final_in_its_words(api):
    c = client(api)
    with pytest.raises(ValidationRejected) as err:
        c.submit(c.build_request("too-long", target(), Intent(name="t")))
    assert err.value.issues[0].path == "exposure" and "20 ks" in str(err.value)
    assert api.toos == {}
    c.close()


def test_wrong_secret_is_refused_without_showing_it(api):
    c = client(api, token="not-the-secret-42")
    for call in (lambda: c.submit(c.build_request("xrt", target(), Intent(name="t"))),
                 lambda: c.find_by_name("t"), lambda: c.validate(c.build_request("xrt", target(), Intent(name="t")))):
        with pytest.raises(TokenRefused) as err:
            call()
        assert "not-the-secret-42" not in str(err.value) and SECRET not in str(err.value)
    rep = c.check()
    assert not rep.ok and "username and token" in rep.problems[0]
    assert client(api).check().ok
    c.close()


def test_429_and_5xx_on_reads_are_retried(api):
    c = client(api)
    api.faults = ["429", "500"]
    assert c.find_by_name("nobody") == []
    api.faults = ["429"]
    sub = c.submit(c.build_request("xrt", target(), Intent(name="tomd-429")))
    assert len(api.toos) == 1 and api.tags()["tomd-429]"] == 1 and sub.facility_id
    c.close()


@pytest.mark.parametrize("fault", ["accept_then_hang", "accept_then_drop", "accept_then_500", "500", "drop"])
def test_unknown_outcome_is_ambiguous_and_the_name_finds_it(api, fault):
    api.faults = [fault]
    c = client(api, timeout=HANG_TIMEOUT)
    with pytest.raises(AmbiguousError) as err:
        c.submit(c.build_request("xrt", target(), Intent(name="tomd-amb")))
    assert SECRET not in str(err.value)
    time.sleep(0.05)  # the queued job is processed (process_s 0.02: a slow machine only adds to the wait)
    found = c.find_by_name("tomd-amb")
    assert len(found) == (1 if fault.startswith("accept") else 0)
    c.close()


def test_a_job_not_processed_in_time_is_ambiguous(api):
    api.process_s = 3600  # not processed while the client waits, however slow the machine
    c = client(api, job_wait=0.1)
    with pytest.raises(AmbiguousError, match="Queued after 0.1s"):
        c.submit(c.build_request("xrt", target(), Intent(name="tomd-slow")))
    assert c.find_by_name("tomd-slow") == []  # still queued: invisible (the residual window, said in swift.py)
    api.process_s = 0  # the Swift team's queue catches up
    assert len(c.find_by_name("tomd-slow")) == 1
    c.close()


def test_statuses_follow_the_swift_teams_decision(api):
    c = client(api)
    a = c.submit(c.build_request("xrt", target(), Intent(name="s1"))).facility_id
    b = c.submit(c.build_request("monitor", target("AT 2026x"), Intent(name="s2"))).facility_id
    api.decide(int(a), "Approved")
    api.decide(int(b), "Approved", done=1)
    st = c.statuses([a, b, "999999"])
    assert (st[a].state.common, st[a].state.word) == ("scheduled", "Approved")
    assert (st[b].state.common, st[b].state.word) == ("completed", "Done") and "999999" not in st
    api.decide(int(a), "Rejected")
    assert c.statuses([a])[a].state.common == "failed"
    with pytest.raises(PermanentError, match="cannot withdraw"):
        c.cancel(a)
    assert c.data_products(a) == [] and c.sites() == ()
    c.close()


def test_connection_refused_is_retryable():
    with socket.socket() as s:  # bound, never listening: refused, and no other process can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        c = SwiftClient("swift", url=f"http://127.0.0.1:{port}/toop/submit_json.php", username=USER, token=SECRET,
                        templates=TEMPLATES, timeout=30.0, max_attempts=2, backoff_base=0.01, backoff_cap=0.02)
        with pytest.raises(RetryableError, match="cannot connect") as err:
            c.submit(c.build_request("xrt", target(), Intent(name="t")))
    assert not isinstance(err.value, (AmbiguousError, PermanentError))
    c.close()


# ------------------------------------------------------ exactly-once, end to end --


def test_storm_of_faults_no_too_twice_every_intent_settles(db, api):
    with db.sessions.begin() as s:
        tid = upsert(s, TargetSpec(name="SN 2026swf", ra=210.0, dec=12.0), origin="test").target_id
    n = 20
    with db.sessions.begin() as s:
        for i in range(n):
            create_intent(s, target_id=tid, facility="swift", template="too-long" if i < 2 else "xrt",
                          name=f"tomd-s-{i}")
    api.chaos = (0.35, random.Random(5))
    sub = Submitter(db.sessions, {"swift": client(api, timeout=STORM_TIMEOUT)}, FAST)
    sub.run_until_settled(timeout_s=300)
    api.chaos = None
    tags = api.tags()
    assert all(c == 1 for c in tags.values()), tags
    with db.sessions() as s:
        final = list(s.scalars(select(ObservationRequest).order_by(ObservationRequest.id)))
    assert len(final) == n
    by_tag = {t["immediate_objective"].rsplit("[tomd ", 1)[-1][:-1]: str(k) for k, t in api.toos.items()}
    for r in final:
        assert r.state in ("pending", "rejected", "failed"), (r.name, r.state, r.last_error)
        if r.state == "pending":
            assert by_tag[r.name] == r.facility_id
        else:
            assert r.last_error and SECRET not in r.last_error and r.name not in by_tag
    assert {r.name for r in final if r.state == "rejected"} >= {"tomd-s-0", "tomd-s-1"} - {
        r.name for r in final if r.state == "failed"}
    assert sum(r.state == "pending" for r in final) >= n - 2 - 1


def test_status_poller_follows_the_swift_teams_decision(db, api):
    """Submitted through the Submitter, followed by the status Poller: Swift's decision becomes tomd's state."""
    from tomd.status import Poller

    with db.sessions.begin() as s:
        tid = upsert(s, TargetSpec(name="SN 2026pol", ra=33.0, dec=-5.0), origin="test").target_id
        create_intent(s, target_id=tid, facility="swift", template="xrt", name="tomd-p-1")
    facs = {"swift": client(api)}
    Submitter(db.sessions, facs, FAST).run_until_settled(timeout_s=120)
    with db.sessions() as s:
        row = s.scalars(select(ObservationRequest)).one()
    assert (row.state, row.facility_state) == ("pending", "Accepted")
    api.decide(int(row.facility_id), "Approved")
    Poller(db.sessions, facs).poll()
    with db.sessions() as s:
        row = s.scalars(select(ObservationRequest)).one()
    assert (row.state, row.facility_state) == ("scheduled", "Approved")
    api.decide(int(row.facility_id), "Approved", done=1)
    Poller(db.sessions, facs).poll()
    with db.sessions() as s:
        row = s.scalars(select(ObservationRequest)).one()
    assert (row.state, row.facility_state) == ("completed", "Done")
