"""The LCO/SOAR portal client against the simulated observatory on loopback (no mocks)."""

from __future__ import annotations

import hashlib
import io
import json
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import httpx
import pytest

from tests.loopback import LoopbackServer
from tomd.errors import AmbiguousError, PermanentError, RetryableError
from tomd.facilities.base import Intent, TemplateError, TokenRefused, ValidationRejected
from tomd.facilities.lco import LCOClient, RateLimiter, build_request_group, flatten_errors
from tomd.facilities.sim import SimObservatory

TEMPLATES = {
    "1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"], "exposure_time": 120,
               "max_airmass": 2.0},
    "bad-filter": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["Halpha"], "exposure_time": 60},
}


def sidereal(name="SN 2026abc", ra=150.0, dec=-20.0, **kw):
    base = dict(name=name, ra=ra, dec=dec, epoch=None, pm_ra=None, pm_dec=None, parallax=None, scheme=None)
    base.update(kw)
    return SimpleNamespace(**base)


# A loaded machine may take a second or more to answer on loopback: every call must beat the
# client's timeout (30 s), except where a test makes the portal hang or answer late on purpose:
# there the client waits HANG_TIMEOUT, and the hang or delay lasts far longer (the hang until the
# fixture's end).
HANG_TIMEOUT = 2.0


@pytest.fixture
def sim():
    with SimObservatory(pending_s=3600, hang_s=600) as s:
        yield s


def client(sim, **kw):
    args = dict(url=sim.url, token=sim.token, proposal="SIM2026A-001", templates=TEMPLATES, timeout=30.0,
                max_attempts=3, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)
    args.update(kw)
    return LCOClient("sim", **args)


# ------------------------------------------------------------ pure building --


def test_build_request_group_icrs_with_intent_overrides():
    start = datetime(2026, 11, 24, 0, 0, tzinfo=timezone.utc)
    t = sidereal(pm_ra=12.5, pm_dec=-3.0, parallax=1.2, epoch=2016.0)
    rg = build_request_group({**TEMPLATES["1m-gri"], "ipp": 1.0}, t,
                             Intent(name="tomd-42", mode="RAPID_RESPONSE", priority=1.5, window_start=start,
                                    window_end=start + timedelta(hours=6)),
                             default_proposal="P1")
    assert rg["name"] == "tomd-42" and rg["proposal"] == "P1"
    assert rg["observation_type"] == "RAPID_RESPONSE" and rg["ipp_value"] == 1.5
    req = rg["requests"][0]
    assert req["windows"] == [{"start": "2026-11-24T00:00:00Z", "end": "2026-11-24T06:00:00Z"}]
    conf = req["configurations"][0]
    assert conf["instrument_type"] == "1M0-SCICAM-SINISTRO"
    assert conf["target"] == {"name": "SN 2026abc", "type": "ICRS", "ra": 150.0, "dec": -20.0, "epoch": 2016.0,
                              "proper_motion_ra": 12.5, "proper_motion_dec": -3.0, "parallax": 1.2}
    assert [ic["optical_elements"]["filter"] for ic in conf["instrument_configs"]] == ["gp", "rp", "ip"]
    assert all(ic["exposure_time"] == 120 and ic["exposure_count"] == 1 for ic in conf["instrument_configs"])
    assert conf["constraints"]["max_airmass"] == 2.0


def test_build_request_group_orbital_elements_and_template_defaults():
    t = SimpleNamespace(name="(433) Eros", ra=None, dec=None, scheme="MPC_MINOR_PLANET", epochofel=60600.0,
                        orbinc=10.83, longascnode=304.3, argofperih=178.9, meandist=1.458, eccentricity=0.2229,
                        meananom=310.5, perihdist=None, epochofperih=None, dailymot=None)
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    tpl = {**TEMPLATES["1m-gri"], "window": "2d", "observation_type": "TIME_CRITICAL", "ipp": 1.1,
           "proposal": "TPL"}
    rg = build_request_group(tpl, t, Intent(name="n"), default_proposal="P", now=now)
    target = rg["requests"][0]["configurations"][0]["target"]
    assert target["type"] == "ORBITAL_ELEMENTS" and target["scheme"] == "MPC_MINOR_PLANET"
    assert target["meananom"] == 310.5 and "ra" not in target
    assert rg["observation_type"] == "TIME_CRITICAL" and rg["ipp_value"] == 1.1 and rg["proposal"] == "TPL"
    assert rg["requests"][0]["windows"][0]["end"] == "2026-01-03T00:00:00Z"


@pytest.mark.parametrize("template, words", [
    ({"filters": ["gp"], "exposure_time": 1}, "needs instrument_type"),
    ({"instrument_type": "X", "filters": ["gp"], "exposure_time": 1, "colour": 1}, "unknown key 'colour'"),
    ({"instrument_type": "X", "exposure_time": 1}, "needs filters"),
    ({"instrument_type": "X", "filters": ["gp"]}, "needs exposure_time"),
    ({"instrument_type": "X", "filters": ["gp"], "exposure_time": 1, "observation_type": "SOON"}, "SOON"),
])
def test_template_mistakes_name_the_template(template, words):
    with pytest.raises(TemplateError, match=words) as exc:
        build_request_group(template, sidereal(), Intent(name="n"), default_proposal="P", template_name="t1")
    assert "templates.t1" in str(exc.value)


def test_flatten_errors_maps_field_paths():
    issues = flatten_errors({"proposal": ['Invalid pk "X" - object does not exist.'],
                             "requests": [{}, {"configurations": [{"target": {"ra": ["Too big."]}}],
                                               "non_field_errors": ["never visible"]}]})
    assert [str(i) for i in issues] == [
        'proposal: Invalid pk "X" - object does not exist.',
        "requests[1].configurations[0].target.ra: Too big.",
        "requests[1]: never visible",
    ]


# ------------------------------------------------------------- over HTTP --


def test_validate_reports_portal_words_at_field_path(sim):
    c = client(sim)
    v = c.validate(c.build_request("bad-filter", sidereal(), Intent(name="tomd-v")))
    assert not v.ok
    (issue,) = v.issues
    assert issue.path == "requests[0].configurations[0].instrument_configs[0].optical_elements.filter"
    assert "Invalid filter 'Halpha' for instrument type 1M0-SCICAM-SINISTRO" in issue.message
    ok = c.validate(c.build_request("1m-gri", sidereal(), Intent(name="tomd-v")))
    assert ok.ok and ok.duration_s > 0


def test_submit_rejection_and_never_visible(sim):
    c = client(sim)
    with pytest.raises(ValidationRejected) as exc:
        c.submit(c.build_request("1m-gri", sidereal(dec=89.0), Intent(name="tomd-north")))
    assert "never visible within the time window" in str(exc.value)
    assert exc.value.issues[0].path == "requests[0]"
    assert sim.groups() == []


def test_bad_token_is_a_clear_error_without_the_token(sim):
    c = client(sim, token="s3cr3t-wrong")
    with pytest.raises(TokenRefused) as exc:
        c.find_by_name("x")
    assert "refused the API token (HTTP 403)" in str(exc.value)
    assert "s3cr3t" not in str(exc.value)
    report = c.check()
    assert not report.ok and "refused the API token" in report.problems[0]


def test_check_lists_proposals_and_instruments(sim):
    c = client(sim, templates={**TEMPLATES, "odd": {"instrument_type": "9M0-NOPE", "filters": ["gp"],
                                                     "exposure_time": 1}})
    r = c.check()
    assert r.proposals == ("SIM2026A-001",) and "1M0-SCICAM-SINISTRO" in r.instruments
    assert r.problems == ("template odd: instrument type 9M0-NOPE is not offered",)


def test_429_retry_after_is_honoured(sim):
    c = client(sim)
    sim.inject("429", retry_after=0.4, method="GET")
    t0 = time.monotonic()
    assert c.find_by_name("nothing") == []
    assert time.monotonic() - t0 >= 0.4
    assert len([r for r in sim.received if r.method == "GET"]) == 2


def test_429_on_submit_is_retried_once_after_the_wait(sim):
    c = client(sim)
    sim.inject("429", retry_after=0.2, method="POST", path="/api/requestgroups/")
    sub = c.submit(c.build_request("1m-gri", sidereal(), Intent(name="tomd-429")))
    assert sim.names()["tomd-429"] == 1 and sub.facility_id


def test_long_retry_after_goes_back_to_the_caller(sim):
    c = client(sim)
    sim.inject("429", retry_after=120, method="GET")
    with pytest.raises(RetryableError) as exc:
        c.find_by_name("x")
    assert exc.value.retry_after == 120


def test_5xx_and_drops_on_reads_are_retried(sim):
    c = client(sim, timeout=HANG_TIMEOUT)
    sim.inject("status", status=502, method="GET")
    sim.inject("drop", method="GET")
    assert c.find_by_name("x") == []
    sim.inject("slow", delay=600, method="GET")  # far longer than the timeout (it ends when the sim stops)
    assert c.find_by_name("x") == []
    lists = [r for r in sim.received if r.method == "GET" and r.path == "/api/requestgroups/"]
    assert len(lists) == 3 + 2  # each failure asked again: 502, drop, then the answer; timeout, then the answer


def test_reads_give_up_after_bounded_attempts(sim):
    c = client(sim)
    sim.inject("status", status=503, method="GET", count=10)
    t0 = time.monotonic()
    with pytest.raises(RetryableError, match="HTTP 503"):
        c.find_by_name("x")
    # Backoff capped at 0.05 s: no wait worth the name (a loose bound, for a loaded machine).
    assert time.monotonic() - t0 < 30
    assert len(sim.received) == 3


@pytest.mark.parametrize("fault", ["accept_then_hang", "accept_then_drop", "accept_then_500"])
def test_submission_after_sending_is_ambiguous_and_the_group_exists(sim, fault):
    c = client(sim, timeout=HANG_TIMEOUT)
    sim.inject(fault, method="POST", path="/api/requestgroups/")
    with pytest.raises(AmbiguousError):
        c.submit(c.build_request("1m-gri", sidereal(), Intent(name="tomd-amb")))
    assert [g.name for g in c.find_by_name("tomd-amb")] == ["tomd-amb"]
    assert len(sim.submissions()) == 1  # the client never re-POSTs by itself


def test_drop_before_processing_is_ambiguous_and_nothing_exists(sim):
    c = client(sim)
    sim.inject("drop", method="POST", path="/api/requestgroups/")
    with pytest.raises(AmbiguousError):
        c.submit(c.build_request("1m-gri", sidereal(), Intent(name="tomd-drop")))
    assert c.find_by_name("tomd-drop") == []


def test_connection_refused_is_retryable_not_ambiguous():
    import socket

    with socket.socket() as s:  # bound, never listening: refused, and no other process can take the port
        s.bind(("127.0.0.1", 0))
        c = LCOClient("gone", url=f"http://127.0.0.1:{s.getsockname()[1]}", token="t", proposal="P",
                      templates=TEMPLATES, timeout=30.0, max_attempts=2, backoff_base=0.01, backoff_cap=0.02)
        with pytest.raises(RetryableError) as exc:
            c.submit(c.build_request("1m-gri", sidereal(), Intent(name="x")))
    assert not isinstance(exc.value, AmbiguousError)


class Quoting(LoopbackServer):
    """A server that quotes what it got back in its answer, the Authorization header included."""

    def __init__(self, status: int, ctype: str = "text/plain"):
        super().__init__()
        self.status, self.ctype = status, ctype

    def handle(self, h) -> None:
        h.rfile.read(int(h.headers.get("Content-Length") or 0))
        said = f"cannot accept {h.headers.get('Authorization')} here"
        body = json.dumps({"non_field_errors": [said]}) if self.ctype == "application/json" else said
        self.send(h, self.status, body.encode(), self.ctype)


@pytest.mark.parametrize("status,ctype", [(400, "text/plain"), (400, "application/json"), (409, "text/plain")])
def test_the_token_never_shows_even_when_the_portal_quotes_it(status, ctype):
    token = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    with Quoting(status, ctype) as q:
        c = LCOClient("lab", url=q.url, token=token, proposal="P", templates=TEMPLATES, timeout=30.0,
                      max_attempts=1)
        with pytest.raises(PermanentError) as exc:
            c.submit(c.build_request("1m-gri", sidereal(), Intent(name="x")))
    assert "cannot accept Token ***" in str(exc.value) and token not in str(exc.value)
    assert all(token not in str(i) for i in getattr(exc.value, "issues", ()))


def test_pagination_is_followed_and_name_match_is_exact(sim):
    c = client(sim, page_size=4)
    for i in range(11):
        c.submit(c.build_request("1m-gri", sidereal(), Intent(name=f"tomd-page-{i}")))
    assert [g.name for g in c.find_by_name("tomd-page-1")] == ["tomd-page-1"]  # not -10
    every = list(c._pages("/api/requestgroups/", {"name": "tomd-page"}))
    assert len(every) == 11 and len({g["id"] for g in every}) == 11
    lists = [r for r in sim.received if r.method == "GET" and r.path == "/api/requestgroups/"]
    assert len(lists) == 1 + 3  # "-1" matches -1 and -10 (one page); the listing of 11 takes 3 pages


def test_statuses_many_at_once_and_state_mapping(sim):
    c = client(sim, page_size=2)
    ids = [c.submit(c.build_request("1m-gri", sidereal(name=n), Intent(name=f"tomd-{n}"))).facility_id
           for n in ("a", "b", "c-expire")]
    before = datetime.now(timezone.utc) - timedelta(minutes=10)  # before the submissions, however slow
    sim.set_state(ids[0], "COMPLETED")
    sim.set_state(ids[2], "WINDOW_EXPIRED")
    st = c.statuses(ids)
    assert {k: (v.state.common, v.state.word) for k, v in st.items()} == {
        ids[0]: ("completed", "COMPLETED"), ids[1]: ("pending", "PENDING"),
        ids[2]: ("expired", "WINDOW_EXPIRED")}
    assert set(c.statuses(ids[:2], since=before)) == set(ids[:2])
    assert c.statuses(ids, since=datetime.now(timezone.utc) + timedelta(hours=1)) == {}


def age(sim, facility_id, seconds: float) -> None:
    """The clock passing for one request group, without waiting: its creation moved ``seconds``
    into the past (the simulator's timeline counts from it)."""
    with sim._lock:
        g = sim._groups[int(facility_id)]
        g.created -= seconds
        g.created_wall -= timedelta(seconds=seconds)


def test_states_progress_with_time():
    with SimObservatory(pending_s=3600) as s:
        c = client(s)
        fid = c.submit(c.build_request("1m-gri", sidereal(name="will-fail"), Intent(name="tomd-f"))).facility_id
        assert c.statuses([fid])[fid].state.common == "pending"
        age(s, fid, 3000)
        assert c.statuses([fid])[fid].state.common == "pending"  # 10 min short of its end, however slow the calls
        age(s, fid, 700)
        assert c.statuses([fid])[fid].state.word == "FAILURE_LIMIT_REACHED"


def test_scheduled_and_in_progress_come_from_the_observations_api(sim):
    """The portal's request group says PENDING until it ends; its observation says scheduled / in progress."""
    c = client(sim)
    ids = [c.submit(c.build_request("1m-gri", sidereal(name=n), Intent(name=f"tomd-{n}"))).facility_id
           for n in ("a", "b", "c")]
    since = datetime.now(timezone.utc) - timedelta(minutes=10)  # before the submissions, however slow
    sim.set_state(ids[0], "SCHEDULED")
    sim.set_state(ids[1], "IN_PROGRESS")
    group = {g["id"]: g for g in sim.groups()}
    assert group[int(ids[0])]["state"] == group[int(ids[1])]["state"] == "PENDING"  # as at the portal
    for st in (c.statuses(ids, since=since), c.statuses(ids)):  # the batched listing and the per-group reads
        assert {k: (v.state.common, v.state.word) for k, v in st.items()} == {
            ids[0]: ("scheduled", "PENDING (scheduled)"), ids[1]: ("in_progress", "IN_PROGRESS"),
            ids[2]: ("pending", "PENDING")}
    # A group unchanged since the cursor is reported from its observations (the cursor may follow those).
    later = datetime.now(timezone.utc)
    assert c.statuses(ids, since=later) == {}
    sim.unschedule(ids[0])  # the scheduler dropped it: pending again
    st = c.statuses(ids, since=later)
    assert {k: (v.state.common, v.state.word) for k, v in st.items()} == {ids[0]: ("pending", "PENDING")}
    assert st[ids[0]].modified and st[ids[0]].name == "tomd-a"
    sim.set_state(ids[1], "COMPLETED")  # the group's own end wins
    assert c.statuses([ids[1]], since=later)[ids[1]].state.word == "COMPLETED"


def test_observation_listings_are_batched(sim):
    c = client(sim)
    docs = [c.build_request("1m-gri", sidereal(name=f"n{i}"), Intent(name=f"tomd-n{i}")) for i in range(1200)]
    ids = [str(i) for i in sim.add_groups(docs)]
    for gid in ids[:1100]:
        sim.set_state(gid, "SCHEDULED")
    before = len(sim.received)
    st = c.statuses(ids, since=datetime.now(timezone.utc) - timedelta(minutes=5))
    calls = [r.path for r in list(sim.received)[before:]]
    assert sum(v.state.common == "scheduled" for v in st.values()) == 1100
    # 1,200 groups: two pages of groups; two of observations changed since the cursor and, as some groups
    # changed while PENDING, two of the active ones; never one call per request. (A page that times out
    # on a loaded machine is asked again: the bound is the goal's, at most 1 call per 100 requests.)
    assert set(calls) <= {"/api/requestgroups/", "/api/observations/"}
    assert calls.count("/api/requestgroups/") >= 2 and calls.count("/api/observations/") >= 4
    assert len(calls) <= 12


def test_sim_running_s_is_seen_through_the_observations_api():
    # Scheduled from the start, observed from 3,000 s to 9,000 s, then completed: the clock is moved
    # by age(), short of and past each step (by 50 s or more: the calls themselves take real time).
    with SimObservatory(pending_s=3000, running_s=6000, scheduled_s=3000) as s:
        c = client(s)
        fid = c.submit(c.build_request("1m-gri", sidereal(), Intent(name="tomd-r"))).facility_id
        seen = []
        for step in (0, 1500, 1400, 150, 3000, 2900, 150, 6000):  # ages 0 1500 2900 3050 6050 8950 9100 15100
            age(s, fid, step)
            common = c.statuses([fid])[fid].state.common
            if not seen or seen[-1] != common:
                seen.append(common)
            assert s.groups()[0]["state"] in ("PENDING", "COMPLETED")  # never IN_PROGRESS at group level
        assert seen == ["scheduled", "in_progress", "completed"]


def test_an_unknown_portal_word_stays_pending_logged_once(caplog):
    from tomd.facilities.lco import map_state

    with caplog.at_level("WARNING", logger="tomd.facilities.lco"):
        first, again = map_state("ON_HOLD_SOMEWHERE"), map_state("ON_HOLD_SOMEWHERE")
    assert first == again and first.common == "pending"
    assert first.word == "ON_HOLD_SOMEWHERE (unknown to tomd)"  # what the status history shows
    assert [r.getMessage() for r in caplog.records].count(
        "LCO portal state 'ON_HOLD_SOMEWHERE' is unknown to tomd: followed as pending") == 1
    assert map_state("PENDING (scheduled)").common == "scheduled" and map_state("IN_PROGRESS").common == "in_progress"


def test_cancel(sim):
    c = client(sim)
    fid = c.submit(c.build_request("1m-gri", sidereal(), Intent(name="tomd-c"))).facility_id
    assert c.cancel(fid).state.common == "cancelled"
    with pytest.raises(ValidationRejected, match="CANCELED"):
        c.cancel(fid)


def test_data_products_are_real_fits_with_md5(sim):
    from astropy.io import fits

    c = client(sim)
    fid = c.submit(c.build_request("1m-gri", sidereal(), Intent(name="tomd-d"))).facility_id
    assert c.data_products(fid) == []
    sim.set_state(fid, "COMPLETED")
    products = c.data_products(fid)
    assert [p.meta["FILTER"] for p in products] == ["gp", "rp", "ip"]
    data = httpx.get(products[0].url, timeout=30).content
    assert hashlib.md5(data).hexdigest() == products[0].md5
    with fits.open(io.BytesIO(data)) as hdul:
        assert hdul[0].header["OBJECT"] == "SN 2026abc" and hdul[0].data.shape == (16, 16)


def test_paths_need_trailing_slashes(sim):
    r = httpx.get(sim.url + "/api/proposals", headers={"Authorization": f"Token {sim.token}"}, timeout=30)
    assert r.status_code == 404 and "end with '/'" in r.json()["detail"]


def test_rate_limiter_spaces_calls():
    now = [0.0]
    slept = []

    def sleep(d):
        slept.append(d)
        now[0] += d

    lim = RateLimiter(5.0, burst=1, clock=lambda: now[0], sleep=sleep)
    for _ in range(6):
        lim.acquire()
    assert now[0] == pytest.approx(1.0)  # 6 calls at 5/s: 5 gaps of 0.2 s
    lim.pause(3.0)
    lim.acquire()
    assert now[0] == pytest.approx(4.0)


def test_rate_limit_is_enforced_over_http(sim):
    c = client(sim, rate_limit=20.0)
    c.limiter.burst = 1.0
    c.limiter._tokens = 1.0
    t0 = time.monotonic()
    for _ in range(6):
        c.find_by_name("x")
    assert time.monotonic() - t0 >= 0.24
