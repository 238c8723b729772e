"""The rule engine inside the ingest transaction: verdicts, intents, limits, duplicates, atomicity."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from tests.alert_samples import encode, next_alert, read_ztf, ztf_files
from tomd.alerts.decode import decode_avro_ocf
from tomd.alerts.formats import ztf
from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
from tomd.db import repository as repo
from tomd.db.models import AlertRow, Decision, ObservationRequest, OutboxEvent, TargetTag
from tomd.rules.engine import RuleEngine, RuleSet, full_reason
from tomd.rules.load import RuleEnv, parse_rule

GRI = {"exposure_time": 300, "exposure_count": 1, "filters": ["gp", "rp", "ip"]}
ENV = RuleEnv({"lco": ("lco", {"1m-gri": GRI, "1m-gri-b": {**GRI, "proposal": "LCO2030A-002"},
                               "2m-spec": {"exposure_time": 1800, "exposure_count": 1}}),
               "sim": ("sim", {"1m-gri": {}})}, frozenset({"slack"}), frozenset(),
              proposals={"lco": "LCO2030A-001"})


def rule(text: str, name: str = "r.toml"):
    r, problems = parse_rule(text, name, ENV)
    assert not problems, problems
    return r


def ztf_parser(data: bytes):
    return [a for rec in decode_avro_ocf(data) for a in ztf.parse(rec)]


class Clock:
    """Alert time + offset: "now" a little after each alert, like a live daemon."""

    def __init__(self, offset=timedelta(minutes=5)):
        self.offset = offset

    def __call__(self, stored):
        return stored.alert.time + self.offset


def engine(*rules, **kw):
    kw.setdefault("clock", Clock())
    return RuleEngine(RuleSet.of(list(rules)), facility_kinds=ENV.facility_kinds, **kw)


def ingest(db, eng, records, schema, extra_sinks=()):
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), ztf_parser,
                   sinks=[eng, *extra_sinks])
    for r in records:
        ing.handle([FileMessage("copy", r["candid"], encode(schema, [r]))])
    return ing


def decisions(db):
    """Every verdict (decision rows and the not-fired ones kept per alert), by alert, then rule."""
    with db.sessions() as s:
        return [(d.rule, d.outcome, d.reason, d.alert_id)
                for d in sorted(repo.all_verdicts(s), key=lambda d: (d.alert_id or 0, d.rule))]


def count(db, model, *where):
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


OBSERVE = '''
[observe]
facility = "lco"
template = "1m-gri"
mode = "RAPID_RESPONSE"
window = "24h"
priority = {priority}
'''


@pytest.fixture
def sample(shared_data):
    schema, (rec,) = read_ztf(ztf_files()[0])
    return schema, rec


def test_verdicts_with_reasons_and_one_intent_per_fired_decision(db, sample):
    schema, rec = sample
    mag = rec["candidate"]["magpsf"]
    fires = rule(f'name = "bright"\nwhen = "alert.mag < {mag + 1} and alert.fields.real_bogus >= 0"\n'
                 + OBSERVE.format(priority=1.5))
    misses = rule(f'name = "faint"\nwhen = "alert.mag > {mag + 1} and alert.mag < 30"\nadd_tags = ["x"]')
    broken = rule('name = "broken"\nwhen = "alert.mag / (alert.mag - alert.mag) > 1"\nadd_tags = ["y"]')
    ingest(db, engine(fires, misses, broken), [rec], schema)
    got = {r: (o, why) for r, o, why, _ in decisions(db)}
    assert got["bright"][0] == "fired" and "all 2 clauses true" in got["bright"][1]
    assert got["faint"][0] == "not_fired"
    # The row keeps the clause; the values it read are in details, written out when read (explain).
    assert got["faint"][1] == f"alert.mag > {mag + 1} is false"
    with db.sessions() as s:
        (faint,) = [d for d in repo.all_verdicts(s) if d.rule == "faint"]
        assert faint.details["clause"] == 0 and faint.details["values"]["alert.mag"] == pytest.approx(mag)
        assert full_reason(faint.reason, faint.details) == f"alert.mag > {mag + 1} is false (alert.mag = {mag:.6g})"
    assert got["broken"][0] == "error"
    assert got["broken"][1].startswith("alert.mag / (alert.mag - alert.mag) > 1 raised ZeroDivisionError")
    with db.sessions() as s:
        req = s.scalars(select(ObservationRequest)).one()
        d = s.scalars(select(Decision).where(Decision.rule == "bright")).one()
        assert req.decision_id == d.id and req.state == "intent" and req.request == {}
        assert req.name.startswith(f"tomd-{d.id}-") and len(req.name.split("-")[-1]) == 8
        assert (req.facility, req.template, req.mode, req.priority) == ("lco", "1m-gri", "RAPID_RESPONSE", 1.5)
        assert req.window_end - req.window_start == timedelta(hours=24)
        assert req.estimated_hours == pytest.approx((3 * (300 + 20) + 120 + 20) / 3600)
        kinds = [e.kind for e in s.scalars(select(OutboxEvent).order_by(OutboxEvent.id))]
        assert kinds.count("submission.intent") == 1 and kinds.count("rule.fired") == 1
        intent = s.scalars(select(OutboxEvent).where(OutboxEvent.kind == "submission.intent")).one()
        assert intent.payload["request_id"] == req.id and intent.payload["name"] == req.name
    # The tag action of the erroring rule never ran.
    assert count(db, TargetTag) == 0


def test_crash_after_rules_leaves_neither_decision_nor_intent(db, sample):
    schema, rec = sample
    fires = rule('name = "all"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1))

    def crash(s, stored):
        raise RuntimeError("power cut before commit")

    with pytest.raises(RuntimeError):
        ingest(db, engine(fires), [rec], schema, extra_sinks=[crash])
    assert count(db, Decision) == 0 and count(db, ObservationRequest) == 0 and count(db, AlertRow) == 0
    assert count(db, OutboxEvent) == 0
    # The retry (no crash this time) records it exactly once; a replay adds nothing.
    ingest(db, engine(fires), [rec], schema)
    ingest(db, engine(fires), [rec], schema)
    assert count(db, Decision) == 1 and count(db, ObservationRequest) == 1


def test_duplicate_request_is_not_submitted_and_higher_priority_escalates(db, sample):
    schema, rec = sample
    low = rule('name = "low"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1.0))
    same = rule('name = "same"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1.0))
    high = rule('name = "high"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=3.0))
    ingest(db, engine(low, same, high), [rec], schema)
    got = {r: (o, why) for r, o, why, _ in decisions(db)}
    assert got["low"][0] == "fired"
    assert got["same"][0] == "deduplicated" and "nothing submitted" in got["same"][1]
    assert got["high"][0] == "deduplicated" and "priority raised 1.0 → 3.0" in got["high"][1]
    with db.sessions() as s:
        req = s.scalars(select(ObservationRequest)).one()
        assert req.priority == 3.0
        assert s.scalar(select(func.count()).select_from(OutboxEvent)
                        .where(OutboxEvent.kind == "submission.priority_raised")) == 1
    # A finished request is no longer a duplicate: the next alert asks again.
    with db.sessions.begin() as s:
        s.get(ObservationRequest, req.id).state = "completed"
    second = next_alert(schema, rec, new_candid=rec["candid"] + 1)
    ingest(db, engine(low), [second], schema)
    assert count(db, ObservationRequest) == 2


def test_a_submitted_duplicate_keeps_its_priority_and_says_why(db, sample):
    """LCO's portal cannot change a submitted request group's priority: tomd neither pretends (the row and the
    events stay) nor cancels and resubmits; the verdict says so."""
    schema, rec = sample
    low = rule('name = "low"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1.0))
    ingest(db, engine(low), [rec], schema)
    with db.sessions.begin() as s:
        req = s.scalars(select(ObservationRequest)).one()
        req.state = "pending"  # as the submitter leaves it once the facility took it
    high = rule('name = "high"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=3.0))
    probe = rule('name = "probe"\nmode = "test"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=3.0))
    second = next_alert(schema, rec, new_candid=rec["candid"] + 1)
    ingest(db, engine(high, probe), [second], schema)
    got = {r: (o, why) for r, o, why, _ in decisions(db)}
    assert got["high"][0] == "deduplicated"
    assert "wanted priority 3.0 > 1.0" in got["high"][1] and "already submitted" in got["high"][1]
    assert "Cancel and resubmit by hand" in got["high"][1]
    assert got["probe"][0] == "test" and "already submitted" in got["probe"][1]
    with db.sessions() as s:
        assert s.scalars(select(ObservationRequest)).one().priority == 1.0
        assert s.scalar(select(func.count()).select_from(OutboxEvent)
                        .where(OutboxEvent.kind == "submission.priority_raised")) == 0
    assert count(db, ObservationRequest) == 1


def test_test_mode_records_notifies_and_submits_nothing(db, sample):
    """A test rule records and notifies what it would have done (rule.tested → its channels), and submits nothing."""
    from tomd.config import Channel, Config, Notify
    from tomd.db.models import Notification
    from tomd.notify import notification_kinds, subscriber

    schema, rec = sample
    t = rule('name = "new-class"\nmode = "test"\nwhen = "alert.mag > 0"\nadd_tags = ["candidate"]\n'
             '[notify]\nchannels = ["slack"]\nmessage = "look at this one"\n' + OBSERVE.format(priority=1))
    ingest(db, engine(t), [rec], schema)
    (r, outcome, why, _), = decisions(db)
    assert outcome == "test" and why.startswith("would fire")
    assert count(db, ObservationRequest) == 0 and count(db, TargetTag) == 0
    config = Config(notify=Notify(channels={"slack": Channel(kind="log")}))
    assert "rule.tested" in notification_kinds(config)
    with db.sessions.begin() as s:
        ev, = s.scalars(select(OutboxEvent).where(OutboxEvent.kind.like("rule.%"))).all()
        d = s.scalars(select(Decision)).one()
        assert ev.kind == "rule.tested" and ev.payload["decision_id"] == d.id and ev.payload["channels"] == ["slack"]
        assert ev.payload["would"]["observe"]["template"] == "1m-gri" and ev.payload["would"]["add_tags"] == ["candidate"]
        assert ev.payload["request_id"] is None and ev.payload["tags_added"] == []
        subscriber(config)(s, ev)  # the hook runner's builtin, as the daemon wires it
    with db.sessions() as s:
        n, = s.scalars(select(Notification)).all()
    assert n.channel == "slack" and n.message["subject"].startswith("[test] Rule new-class would fire")
    assert "nothing was requested" in n.message["text"]


def test_test_mode_limits_count_within_one_batch(db, sample):
    """20 alerts in one batch, per_night = 1: one "would fire", 19 "would be limited" (as an active rule would)."""
    schema, rec = sample
    recs = [rec] + [next_alert(schema, rec, new_candid=rec["candid"] + i, days_later=0.001 * i) for i in range(1, 20)]
    t = rule('name = "t"\nmode = "test"\nwhen = "alert.mag > 0"\nadd_tags = ["x"]\n[limits]\nper_night = 1')
    c = rule('name = "c"\nmode = "test"\nwhen = "alert.mag > 0"\nadd_tags = ["x"]\n[limits]\ncooldown = "1d"')
    now = datetime(2030, 1, 1, 13, tzinfo=timezone.utc)
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), ztf_parser,
                   sinks=[engine(t, c, clock=lambda st: now)])
    ing.handle([FileMessage("copy", r["candid"], encode(schema, [r])) for r in recs])
    for name in ("t", "c"):
        why = [w for r, o, w, _ in decisions(db) if r == name]
        assert len(why) == 20 and sum(w.startswith("would fire") for w in why) == 1, name
        assert sum(w.startswith("would be limited: ") for w in why) == 19
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.kind == "rule.tested")) == 2


def alerts_series(schema, rec, n, days):
    out = [rec]
    for i in range(1, n):
        out.append(next_alert(schema, out[-1], new_candid=rec["candid"] + i, days_later=days, mag_change=-0.1))
    return out


def test_cooldown_boundary(db, sample):
    schema, rec = sample
    # Alerts 1 day apart; cooldown exactly 2 days: fire, limited, fire (exactly 2 d later), limited.
    r = rule('name = "cool"\nwhen = "alert.mag > 0"\nadd_tags = ["seen"]\n[limits]\ncooldown = "2d"')
    ingest(db, engine(r, clock=Clock(timedelta(0))), alerts_series(schema, rec, 4, 1.0), schema)
    outcomes = [o for _, o, _, _ in decisions(db)]
    assert outcomes == ["fired", "limited", "fired", "limited"]
    assert "cooldown: fired for this target 1d ago" in decisions(db)[1][2]


def test_per_night_boundary_across_targets(db, shared_data):
    files = ztf_files()[:4]
    recs = [read_ztf(f) for f in files]
    r = rule('name = "pn"\nwhen = "alert.mag > 0"\nadd_tags = ["seen"]\n[limits]\nper_night = 2')
    # All four alerts "now" at the same moment: the third and fourth exceed 2 this night (UTC noon to noon).
    now = datetime(2030, 1, 1, 11, 59, tzinfo=timezone.utc)
    eng = engine(r, clock=lambda st: now)
    for schema, (rec,) in recs:
        ingest(db, eng, [rec], schema)
    outcomes = [o for _, o, _, _ in decisions(db)]
    assert outcomes == ["fired", "fired", "limited", "limited"]
    assert "per_night: fired 2 times in the night of 2029-12-31 (limit 2)" in decisions(db)[2][2]
    # Two minutes later it is the next night (noon UTC passed), not 24 h later.
    schema, (rec,) = recs[0]
    nxt = next_alert(schema, rec, new_candid=rec["candid"] + 7)
    ingest(db, engine(r, clock=lambda st: now + timedelta(minutes=2)), [nxt], schema)
    assert decisions(db)[-1][1] == "fired"


def test_night_is_local_noon_to_noon_at_the_facilitys_first_site(db, shared_data):
    """LCO's first site is Haleakala (156.26° W): its local noon is 22:25 UTC, and its night starts there."""
    from tomd.rules.engine import night_of

    start, label = night_of(datetime(2030, 1, 1, 22, 0, tzinfo=timezone.utc), -156.2575)
    assert label == "2029-12-31" and start == datetime(2029, 12, 31, 22, 25, 1, 800000, tzinfo=timezone.utc)
    assert night_of(datetime(2030, 1, 1, 22, 30, tzinfo=timezone.utc), -156.2575)[1] == "2030-01-01"
    assert night_of(datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc))[1] == "2030-01-01"
    recs = [read_ztf(f) for f in ztf_files()[:3]]
    r = rule('name = "n"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1) + "\n[limits]\nper_night = 1\n")
    times = iter([datetime(2030, 1, 1, 22, 0, tzinfo=timezone.utc),  # night of 31 Dec at Haleakala
                  datetime(2030, 1, 1, 22, 40, tzinfo=timezone.utc),  # past local noon: night of 1 Jan
                  datetime(2030, 1, 1, 23, 30, tzinfo=timezone.utc)])  # the same night: limited
    eng = engine(r, clock=lambda st: next(times))
    for schema, (rec,) in recs:
        ingest(db, eng, [rec], schema)
    got = decisions(db)
    assert [o for _, o, _, _ in got] == ["fired", "fired", "limited"]
    assert "per_night: fired 1 times in the night of 2030-01-01" in got[2][2]


def test_hours_per_night_counts_every_rule_on_the_facility_and_proposal(db, shared_data):
    recs = [read_ztf(f) for f in ztf_files()[:4]]
    est = (3 * (300 + 20) + 120 + 2 * 10) / 3600  # 0.3056 h per request: 3 filters, setup, 2 filter changes
    r = rule('name = "h"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1)
             + f"\n[limits]\nhours_per_night = {2 * est + 1e-6}\n")
    # Another proposal's hours on the same facility are its own.
    other = rule('name = "other"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1).replace(
        '"1m-gri"', '"1m-gri-b"') + f"\n[limits]\nhours_per_night = {est + 1e-6}\n")
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    eng = engine(r, other, clock=lambda st: now)
    for schema, (rec,) in recs[:3]:
        ingest(db, eng, [rec], schema)
    got = [(n, o, w) for n, o, w, _ in decisions(db)]
    assert [o for n, o, _ in got if n == "h"] == ["fired", "fired", "limited"]
    assert [o for n, o, _ in got if n == "other"] == ["fired", "limited", "limited"]
    h3 = [w for n, o, w in got if n == "h"][2]
    assert "hours_per_night: 0.61 h requested from lco (proposal LCO2030A-001) in the night of 2029-12-31 + 0.31 h" \
        in h3
    with db.sessions() as s:
        assert sorted(q.proposal for q in s.scalars(select(ObservationRequest))) == \
            ["LCO2030A-001", "LCO2030A-001", "LCO2030A-002"]
    # Hours are full, but a duplicate with a higher priority still raises the pending request: no new hours.
    high = rule('name = "high"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=5)
                + f"\n[limits]\nhours_per_night = {2 * est + 1e-6}\n")
    schema, (rec,) = recs[0]
    ingest(db, engine(high, clock=lambda st: now), [next_alert(schema, rec, new_candid=rec["candid"] + 9)], schema)
    (_, o, w, _), = [d for d in decisions(db) if d[0] == "high"]
    assert o == "deduplicated" and "its priority raised 1.0 → 5.0" in w


def test_kill_switch_file_limits_everything_but_still_records(db, sample, tmp_path):
    schema, rec = sample
    stop = tmp_path / "STOP"
    stop.write_text("")
    r = rule('name = "k"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1))
    ingest(db, engine(r, kill_switch=stop), [rec], schema)
    (_, outcome, why, _), = decisions(db)
    assert outcome == "limited" and why.startswith(f"kill switch: {stop} exists")
    assert count(db, ObservationRequest) == 0


def test_rule_listening_to_other_sources_records_nothing(db, sample):
    schema, rec = sample
    r = rule('name = "gcn-only"\nsources = ["gcn"]\nwhen = "alert.mag > 0"\nadd_tags = ["x"]')
    ingest(db, engine(r), [rec], schema)
    assert decisions(db) == []


def test_light_curve_features_see_the_stored_history(db, sample):
    schema, rec = sample
    series = alerts_series(schema, rec, 3, 1.0)  # brightening 0.1 mag/day in the alert band
    r = rule('name = "rising"\nwhen = "target.n_detections >= 3 and target.rise_rate > 0.05"\nadd_tags = ["rising"]')
    ingest(db, engine(r), series, schema)
    outcomes = [o for _, o, _, _ in decisions(db)]
    assert outcomes[-1] == "fired"
    assert outcomes[0] == "not_fired"


def test_example_grb_rule_on_real_swift_notices(db, shared_data):
    """Swift BAT then XRT positions of the same burst: one time-critical request, checked against astropy."""
    import math
    import os
    from pathlib import Path

    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord, get_body
    from astropy.time import Time

    from tomd import visibility
    from tomd.alerts.parse import parse_message
    from tomd.config import load_config

    repo_dir = Path(__file__).resolve().parents[1]
    cfg = load_config(repo_dir / "config.example.toml",
                      env={**os.environ, "LCO_API_TOKEN": "x", "GCN_CLIENT_ID": "x", "GCN_CLIENT_SECRET": "x"})
    from dataclasses import replace

    cfg = replace(cfg, rules=replace(cfg.rules, paths=[str(repo_dir / "rules" / "grb-afterglow.toml")]))
    eng = RuleEngine.from_config(cfg, clock=lambda st: st.alert.time)
    ing = Ingestor(db.sessions, IngestSettings(stream="gcn", format="auto"), lambda b: parse_message("auto", b),
                   sinks=[eng])
    for n in ("SWIFT_BAT_GRB_POS_ACK", "SWIFT_XRT_POSITION"):
        p = shared_data / "gcn" / "gcn-classic-binary" / f"{n}.bin"
        ing.handle([FileMessage(str(p), 0, p.read_bytes())])
    got = decisions(db)
    assert [o for _, o, _, _ in got] == ["fired", "limited"]
    assert got[1][2].startswith("cooldown: fired for this target")
    with db.sessions() as s:
        req = s.scalars(select(ObservationRequest)).one()
        d = s.scalars(select(Decision).where(Decision.outcome == "fired")).one()
        assert req.mode == "TIME_CRITICAL" and req.template.startswith("inline:") and req.priority == 10
        assert d.details["observe"]["template_fields"]["filters"] == ["rp", "ip"]
        assert req.window_end - req.window_start == timedelta(hours=6)
    # The visibility the rule relied on, checked with astropy at the site and time it found.
    c = eng.last_verdicts  # the XRT batch's verdicts
    assert c and c[0].details["values"]['visible("lco", hours=6, max_airmass=2.5, min_moon_deg=10)'] is True
    vis = visibility.observability(visibility.FACILITY_SITES["lco"], 336.6645, 8.5135,
                                   d.created_at.timestamp() / 86400 + 40587.0, 6, max_airmass=2.5, min_moon_deg=10)
    site = visibility.SITES[vis.site]
    loc = EarthLocation.from_geodetic(site.lon * u.deg, site.lat * u.deg, site.height * u.m)
    t = Time(vis.mjd, format="mjd", scale="utc")
    frame = AltAz(obstime=t, location=loc)
    alt = SkyCoord(336.6645 * u.deg, 8.5135 * u.deg).transform_to(frame).alt.deg
    sun = get_body("sun", t).transform_to(frame).alt.deg
    assert alt >= math.degrees(math.asin(1 / 2.5)) - 0.1 and sun <= -12 + 0.1


def test_two_daemons_deciding_at_once_make_one_request(db, sample):
    """Two transactions judging alerts of the same target concurrently: one intent, one duplicate."""
    import threading
    import time as _time

    from tomd.alerts.ingest import Ingested

    schema, rec = sample
    second = next_alert(schema, rec, new_candid=rec["candid"] + 1)
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), ztf_parser)
    ids = [ing.handle([FileMessage("copy", r["candid"], encode(schema, [r]))]).alert_ids[0] for r in (rec, second)]
    with db.sessions() as s:
        rows = [s.get(AlertRow, i) for i in ids]
        stored = [Ingested(row.id, ztf_parser(encode(schema, [r]))[0], row.target_id, None, "copy")
                  for row, r in zip(rows, (rec, second))]
    r = rule('name = "both"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1))
    first_in = threading.Event()
    errors = []

    def judge(st, hold):
        try:
            with db.sessions.begin() as s:
                engine(r)(s, [st])
                if hold:
                    first_in.set()
                    _time.sleep(0.5)  # still uncommitted while the other one decides
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    a = threading.Thread(target=judge, args=(stored[0], True))
    a.start()
    first_in.wait(10)
    b = threading.Thread(target=judge, args=(stored[1], False))
    b.start()
    a.join()
    b.join()
    assert not errors, errors
    assert sorted(o for _, o, _, _ in decisions(db)) == ["deduplicated", "fired"]
    assert count(db, ObservationRequest) == 1


def test_manual_intents_record_proposal_and_hours_and_validation_duration_replaces_the_estimate(db):
    """create_intent fills the proposal (template's, else the facility's) and the template's hours; the
    facility's validated duration then replaces the estimate, so hours_per_night counts what it said."""
    from dataclasses import replace

    from tests.test_submit import FAST, TEMPLATES, client, make_target
    from tomd.config import Config, Facility
    from tomd.facilities.sim import SimObservatory
    from tomd.submit import Submitter, create_intent

    templates = {**TEMPLATES, "1m-gri-b": {**TEMPLATES["1m-gri"], "proposal": "SIM2026A-002"}}
    config = replace(Config(), facilities={"sim": Facility(kind="sim", proposal="SIM2026A-001", templates=templates)})
    tid = make_target(db)
    with db.sessions.begin() as s:
        a = create_intent(s, target_id=tid, facility="sim", template="1m-gri", name="m-1", config=config)
        b = create_intent(s, target_id=tid, facility="sim", template="1m-gri-b", name="m-2", config=config)
        c = create_intent(s, target_id=tid, facility="sim", template="1m-gri", name="m-3")  # no config: as before
    with db.sessions() as s:
        got = {r.id: (r.proposal, r.estimated_hours) for r in s.scalars(select(ObservationRequest))}
    est = (3 * (120 + 20) + 120 + 2 * 10) / 3600
    assert got[a] == ("SIM2026A-001", pytest.approx(est)) and got[b] == ("SIM2026A-002", pytest.approx(est))
    assert got[c] == (None, None)
    with SimObservatory(pending_s=3600, proposals=("SIM2026A-001", "SIM2026A-002")) as sim:
        outs = Submitter(db.sessions, {"sim": client(sim, templates=templates)}, FAST, worker_id="w1").run_once()
        assert sorted(o.state for o in outs) == ["pending"] * 3
        groups = {g["name"]: g for g in sim.groups()}
    with db.sessions() as s:
        rows = {r.name: r for r in s.scalars(select(ObservationRequest))}
    for name in ("m-1", "m-2", "m-3"):
        # The simulator's own duration (its overheads, not ours): the request now carries the facility's figure.
        assert rows[name].estimated_hours != pytest.approx(est)
        assert rows[name].estimated_hours > 0
    assert rows["m-1"].estimated_hours == pytest.approx(rows["m-3"].estimated_hours)
    assert groups["m-2"]["proposal"] == "SIM2026A-002"
    with db.sessions() as s:
        from tomd.db import repository as repo

        assert repo.requested_hours_from(s, "sim", "SIM2026A-002", datetime(2000, 1, 1, tzinfo=timezone.utc)) == \
            pytest.approx(rows["m-2"].estimated_hours)


def test_compact_all_true_reasons_are_spelled_out_when_read():
    """Verdicts that stop after every clause held keep "all N clauses true" and the values in details; people
    read them with the values (full_reason: tomd rule explain), a firing's already spelled-out reason stays."""
    from tomd.rules.engine import full_reason

    d = {"values": {"alert.mag": 17.2, "target.n_detections": 3}}
    assert full_reason("all 2 clauses true, but the alert has no target (localisation too large?) to act on", d) == (
        "all 2 clauses true (alert.mag = 17.2, target.n_detections = 3), but the alert has no target "
        "(localisation too large?) to act on")
    assert full_reason("per_night: fired 3 times in the night of 2026-03-01 (limit 3); all 1 clause true",
                       {"values": {"alert.mag": 17.2}}).endswith("; all 1 clause true (alert.mag = 17.2)")
    fired = "all 2 clauses true (alert.mag = 17.2, target.n_detections = 3)"
    assert full_reason(fired, d) == fired
    assert full_reason("all 2 clauses true", {}) == "all 2 clauses true"
    many = {"values": {f"v{i}": i for i in range(12)}}
    assert full_reason("all 12 clauses true", many).count(" = ") == 8


def test_not_fired_rows_keep_the_values_as_read_and_explain_spells_them_out(db, sample):
    """The compact not-fired path (one generated call, the row a tuple) stores what json_leaves reads,
    on both databases: floats, None, tags as a sorted list, text with a backslash, a tab and a quote; the
    batch's verdicts (Verdicts) give the same details as the rows; other outcomes are kept as they were."""
    from tomd.rules.engine import Verdict, Verdicts
    from tomd.rules.expr import describe_values

    schema, rec = sample
    mag = rec["candidate"]["magpsf"]
    texts = {
        "float": f"alert.mag > {mag + 1} and alert.mag < 30",
        "missing": "alert.fields.no_such_field > 1",
        "tags": "'sn' in target.tags and alert.mag > 0",
        "text": "alert.band == 'a\\\\b\\t\"c' and alert.mag > 0",
        "error": "alert.mag / (alert.mag - alert.mag) > 1",
    }
    rules = [rule(f'name = "{n}"\nwhen = {chr(39) * 3}{w}{chr(39) * 3}\nadd_tags = ["x"]')  # TOML: literal
             for n, w in texts.items()]
    eng = engine(*rules)
    ingest(db, eng, [rec], schema)
    with db.sessions() as s:
        rows = {d.rule: d for d in repo.all_verdicts(s)}
    assert {r: d.outcome for r, d in rows.items()} == {"float": "not_fired", "missing": "not_fired",
                                                       "tags": "not_fired", "text": "not_fired", "error": "error"}
    assert rows["float"].details == {"clause": 0, "values": {"alert.mag": pytest.approx(mag)}, "line": 1}
    assert rows["missing"].details["values"] == {"alert.fields.no_such_field": None}
    assert rows["tags"].details["values"] == {"target.tags": []}
    assert rows["text"].reason == rules[3].when.clauses[0].false_text == "alert.band == 'a\\\\b\\t\"c' is false"
    assert rows["text"].details["values"] == {"alert.band": "ztf" + "gri"[rec["candidate"]["fid"] - 1]}
    for r in ("float", "missing", "tags", "text"):
        d = rows[r]
        assert full_reason(d.reason, d.details) == f"{d.reason} ({describe_values(d.details['values'])})"
    got = eng.last_verdicts
    assert isinstance(got, Verdicts) and len(got) == 5
    assert sorted(type(v).__name__ for v in got) == ["RowVerdict"] * 4 + ["Verdict"]
    by_rule = {v.rule: v for v in got}
    for r in ("float", "missing", "tags", "text"):
        assert (by_rule[r].outcome, by_rule[r].reason) == (rows[r].outcome, rows[r].reason)
        assert by_rule[r].details == rows[r].details
    assert by_rule["error"].outcome == "error" and got[-1].rule == "error" and got[0:2][0].rule == "float"
    assert eng.counts == {"not_fired": 4, "error": 1}
    v = Verdict.of_row(got.items[0])  # what decide() returns for the same row
    assert (v.rule, v.outcome, v.reason, v.details) == (got[0].rule, got[0].outcome, got[0].reason, got[0].details)
    assert got[0].decision_id is None and got[0].request_id is None


def test_rule_context_rows_equal_the_separate_queries(db, sample):
    """rule_context_rows (one statement each, the ids as an array on PostgreSQL) gives what target_rows,
    names_for_rules, tags_of / tag_times, lists_of / list_times and photometry_for_rules give."""
    from tomd.db import repository as repo

    schema, rec = sample
    second = next_alert(schema, rec, new_candid=rec["candid"] + 1)
    second["objectId"] = "ZTF99zzzzzzz"
    second["candidate"]["ra"] += 1.0
    ingest(db, engine(), [rec, second], schema)
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    with db.sessions() as s:
        ids = sorted(s.scalars(select(AlertRow.target_id)).all())
        assert len(set(ids)) == 2
        repo.add_tags_at(s, ids[0], ["sn", "bright"], t0)
        repo.add_to_lists_at(s, ids[0], ["tonight", "a-list"], t0 + timedelta(hours=1))
        repo.add_to_lists_at(s, ids[1], ["tonight"], t0)
        s.commit()
        ids = sorted(set(ids)) + [10**9]  # and one that does not exist
        for timed in (False, True):
            rows, names, tags, lists, phot = repo.rule_context_rows(s, ids, timed=timed)
            assert {k: dict(v) for k, v in rows.items()} == {  # all but extras_set_at (backtests read it apart)
                k: {c: x for c, x in v.items() if c != "extras_set_at"} for k, v in repo.target_rows(s, ids).items()}
            assert names == repo.names_for_rules(s, ids)
            if timed:
                assert tags == repo.tag_times(s, ids) and lists == repo.list_times(s, ids)
            else:
                assert tags == repo.tags_of(s, ids) and lists == repo.lists_of(s, ids)
            want = repo.photometry_for_rules(s, ids)
            assert {k: sorted(v) for k, v in phot.items()} == {k: sorted(v) for k, v in want.items()}
            assert all(len(phot[i]) > 1 for i in ids[:2]) and phot[10**9] == []
        assert repo.rule_context_rows(s, []) == ({}, {}, {}, {}, {})


def test_priority_rises_at_the_observatory_only_before_submission(db, sample):
    """Against the simulated LCO portal: a raise while the request is an intent is what gets submitted
    (ipp_value); once the portal holds it, a higher priority changes nothing there and nothing is resubmitted."""
    from tomd.facilities.lco import LCOClient
    from tomd.facilities.sim import SimObservatory
    from tomd.submit import SubmitSettings, Submitter

    schema, rec = sample
    recs = [rec]
    for i in (1, 2):
        recs.append(next_alert(schema, recs[-1], new_candid=rec["candid"] + i))
    low = rule('name = "low"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1.0))
    mid = rule('name = "mid"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1.5))
    high = rule('name = "high"\nwhen = "alert.mag > 0"\n' + OBSERVE.format(priority=1.8))
    with SimObservatory(pending_s=3600, proposals=("LCO2030A-001",)) as sim:
        lco = LCOClient("lco", url=sim.url, token=sim.token, proposal="LCO2030A-001", timeout=2.0,
                        templates={"1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"],
                                              "exposure_time": 120}},
                        max_attempts=3, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)
        sub = Submitter(db.sessions, {"lco": lco}, SubmitSettings(lease_s=30, max_attempts=3, backoff_base_s=0.01,
                                                                  backoff_cap_s=0.05, settle_s=0.05))
        wall = {"clock": lambda st: datetime.now(timezone.utc)}  # the window must be open to submit
        ingest(db, engine(low, **wall), recs[:1], schema)
        ingest(db, engine(mid, **wall), recs[1:2], schema)  # still an intent: raised 1.0 → 1.5
        (out,) = sub.run_once()
        assert out.state == "pending"
        (group,) = sim.groups()
        assert group["ipp_value"] == 1.5
        ingest(db, engine(high, **wall), recs[2:], schema)  # submitted: the portal cannot take 1.8
        assert sub.run_once() == []
        (group,) = sim.groups()
        assert group["ipp_value"] == 1.5 and len(sim.submissions()) == 1
    got = {r: (o, why) for r, o, why, _ in decisions(db)}
    assert got["mid"][0] == "deduplicated" and "priority raised 1.0 → 1.5 (before submission)" in got["mid"][1]
    assert got["high"][0] == "deduplicated" and "already submitted" in got["high"][1]
    with db.sessions() as s:
        (req,) = s.scalars(select(ObservationRequest)).all()
        assert (req.state, req.priority) == ("pending", 1.5)


# ---- streams: a rule selects alerts by the [[streams]] name they arrived on (issue 4 §1) ----

def test_a_rule_with_streams_judges_only_alerts_of_its_streams(db, sample):
    """Same source (ztf), two streams: the stream rule records a verdict on its own stream's alert only."""
    schema, rec = sample
    second = next_alert(schema, rec, new_candid=rec["candid"] + 1)
    public = rule('name = "public"\nsources = ["ztf"]\nstreams = ["ztf-public"]\nwhen = "alert.mag > 0"\n'
                  'add_tags = ["pub"]\n')
    anywhere = rule('name = "anywhere"\nwhen = "alert.mag > 0"\nadd_tags = ["any"]\n')
    eng = engine(public, anywhere)
    ids = []
    for stream, r in (("ztf-public", rec), ("ztf-private", second)):
        ing = Ingestor(db.sessions, IngestSettings(stream=stream, format="ztf-avro"), ztf_parser, sinks=[eng])
        ids.append(ing.handle([FileMessage("copy", r["candid"], encode(schema, [r]))]).alert_ids[0])
    got = [(r, o, a) for r, o, _, a in decisions(db)]
    assert ("public", "fired", ids[0]) in got
    assert [g for g in got if g[2] == ids[1]] == [("anywhere", "fired", ids[1])]  # nothing from "public"
    assert sorted(g[0] for g in got) == ["anywhere", "anywhere", "public"]


def test_listens_to_needs_every_selector_and_a_known_stream():
    r = rule('name = "s"\nsources = ["ztf"]\nkinds = ["transient"]\nstreams = ["a", "b"]\nwhen = "alert.mag > 0"\n'
             'add_tags = ["t"]\n')
    assert r.streams == ("a", "b")
    assert r.listens_to("ztf", "transient", "b")
    assert not r.listens_to("ztf", "transient", "c")
    assert not r.listens_to("ztf", "transient")  # unknown stream: cannot tell it is one of its own
    assert not r.listens_to("rubin", "transient", "a") and not r.listens_to("ztf", "localization", "a")
    plain = rule('name = "p"\nwhen = "alert.mag > 0"\nadd_tags = ["t"]\n')
    assert plain.listens_to("ztf", "transient") and plain.listens_to("ztf", "transient", "c")
