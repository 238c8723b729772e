"""tomd rule explain and backtest, on real ZTF packets."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from tests.alert_samples import encode, next_alert, read_ztf, ztf_files
from tomd.alerts.decode import decode_avro_ocf
from tomd.alerts.formats import ztf
from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
from tomd.config import Config
from tomd.rules.cli import backtest, cmd_rule_backtest, cmd_rule_explain
from tomd.rules.engine import RuleEngine, RuleSet
from tomd.rules.load import RuleEnv, parse_rule

ENV = RuleEnv({"sim": ("sim", {"1m-gri": {}})}, frozenset(), frozenset())


def rule(text):
    r, problems = parse_rule(text, "r.toml", ENV)
    assert not problems, problems
    return r


class App:
    def __init__(self, db=None, rules_dir=None):
        self.config = Config()
        if rules_dir is not None:
            from dataclasses import replace

            self.config = replace(self.config, rules=replace(self.config.rules, paths=[str(rules_dir)]))
        self.sessions = db.sessions if db else None


def series(n=3):
    schema, (rec,) = read_ztf(ztf_files()[0])
    out = [rec]
    for i in range(1, n):
        out.append(next_alert(schema, out[-1], new_candid=rec["candid"] + i, days_later=1.0, mag_change=-0.2))
    return schema, out


def n_det(schema, rec):
    (a,) = [a for r in decode_avro_ocf(encode(schema, [rec])) for a in ztf.parse(r)]
    return sum(1 for p in a.photometry if p.kind == "detection")


def test_explain_shows_each_rule_and_the_deciding_clause(db, shared_data, capsys):
    schema, (rec, *_) = series(1)
    rules = [rule('name = "bright"\nwhen = "alert.mag < 30 and alert.fields.real_bogus > 2"\nadd_tags = ["b"]'),
             rule('name = "any"\nwhen = "alert.mag > 0"\nadd_tags = ["a"]')]
    eng = RuleEngine(RuleSet.of(rules), clock=lambda st: st.alert.time)
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"),
                   lambda d: [a for r in decode_avro_ocf(d) for a in ztf.parse(r)], sinks=[eng])
    res = ing.handle([FileMessage("x", 0, encode(schema, [rec]))])
    alert_id = res.alert_ids[0]
    assert cmd_rule_explain(App(db), argparse.Namespace(alert_id=alert_id, json=False)) == 0
    out = capsys.readouterr().out
    assert "bright  not_fired     alert.fields.real_bogus > 2 is false (alert.fields.real_bogus = " in out
    assert "any     fired         all 1 clause true" in out
    assert cmd_rule_explain(App(db), argparse.Namespace(alert_id=alert_id, json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["rule"]: d["outcome"] for d in data["decisions"]} == {"bright": "not_fired", "any": "fired"}
    from tomd.errors import NotFoundError

    with pytest.raises(NotFoundError):
        cmd_rule_explain(App(db), argparse.Namespace(alert_id=alert_id + 100, json=False))


def test_backtest_never_sees_the_future(shared_data, tmp_path):
    schema, recs = series(3)
    first = n_det(schema, recs[0])
    files = []
    for i, r in enumerate(recs):
        p = tmp_path / f"a{i}.avro"
        p.write_bytes(encode(schema, [r]))
        files.append(p)
    random.Random(1).shuffle(files)  # the replay orders by alert time, not by file order
    from tomd.rules.cli import _alerts_from_files

    alerts, bad = _alerts_from_files([str(f) for f in files], "auto")
    assert not bad
    # Fires once the stored history holds more detections than the first packet brought.
    grows = rule(f'name = "grows"\nwhen = "target.n_detections > {first}"\nadd_tags = ["g"]')
    young = rule('name = "young"\nmode = "test"\nwhen = "target.age_days < 1e6"\nadd_tags = ["y"]\n'
                 '[limits]\ncooldown = "36h"')
    report = backtest(alerts, [grows, young])
    assert report["alerts"] == 3
    g = report["rules"]["grows"]
    assert g["outcomes"] == {"not_fired": 1, "fired": 2} and g["targets"] == 1
    # Test mode with a 36 h cooldown, alerts a day apart: would fire, limited, would fire.
    y = report["rules"]["young"]
    assert y["outcomes"] == {"test": 3} and y["firings"] == 2
    assert sum(g["per_night"].values()) == 2
    assert any("grows fires on 66.7%" in w for w in report["warnings"])


def test_backtest_command_from_the_database(db, shared_data, tmp_path, capsys):
    files = ztf_files()[:6]
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"),
                   lambda d: [a for r in decode_avro_ocf(d) for a in ztf.parse(r)])
    ing.handle([FileMessage(str(f), 0, f.read_bytes()) for f in files])
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "a.toml").write_text('name = "bright"\nwhen = "alert.mag < 17"\n'
                                      '[observe]\nfacility = "sim"\ntemplate = "1m-gri"\n')
    app = App(db, rules_dir)
    args = argparse.Namespace(rules=None, alerts=None, since="2000-01-01", until=None, format="auto", json=True)
    assert cmd_rule_backtest(app, args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["alerts"] == 6
    r = report["rules"]["bright"]
    assert r["evaluated"] == 6 and r["firings"] == sum(r["per_night"].values())
    # The simulator's 1m-gri: 3 filters x (300 s + 20 s readout) + 120 s setup + 2 filter changes of 10 s.
    assert r["estimated_hours"] == pytest.approx(r["firings"] * 1100 / 3600, abs=1e-3)


def _store_swift_burst(db, shared_data):
    """Swift BAT (3' error circle) then XRT (5") notices of GRB 240511: the notices row ends with the XRT's."""
    from tomd.alerts.parse import parse_message

    ing = Ingestor(db.sessions, IngestSettings(stream="gcn", format="auto"), lambda b: parse_message("auto", b))
    for n in ("SWIFT_BAT_GRB_POS_ACK", "SWIFT_XRT_POSITION"):
        p = shared_data / "gcn" / "gcn-classic-binary" / f"{n}.bin"
        ing.handle([FileMessage(str(p), 0, p.read_bytes())])


def test_backtest_from_the_database_sees_each_notice_as_it_was(db, shared_data, tmp_path, capsys):
    """The BAT alert is replayed with its own 0.05° circle and notice type, not the later XRT refinement."""
    _store_swift_burst(db, shared_data)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "xrt.toml").write_text('name = "xrt"\nwhen = "alert.error_deg < 0.01"\nadd_tags = ["grb"]\n')
    (rules_dir / "bat.toml").write_text('name = "bat"\nwhen = "alert.notice_type == \'SWIFT_BAT_GRB_POS_ACK\' '
                                        'and alert.error_deg == 0.05"\nadd_tags = ["grb"]\n')
    app = App(db, rules_dir)
    args = argparse.Namespace(rules=None, alerts=None, since="2024-05-01", until=None, format="auto", json=True)
    assert cmd_rule_backtest(app, args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["alerts"] == 2
    assert report["rules"]["xrt"]["outcomes"] == {"not_fired": 1, "fired": 1}
    assert report["rules"]["bat"]["outcomes"] == {"fired": 1, "not_fired": 1}
    x = report["rules"]["xrt"]
    assert x["target_names"] == ["GCN swift 1227767"]
    assert x["nights"] == {"2024-05-11": {"firings": 1, "targets": ["GCN swift 1227767"], "estimated_hours": 0.0}}
    assert any("target.extras keys from when they were last set" in n for n in report["notes"])
    assert not any("without an error circle" in n for n in report["notes"])


def test_backtest_without_the_notice_events_flags_the_unknown_circles(db, shared_data, tmp_path):
    """Outbox events pruned: the earlier notice alert gets no error circle (flagged), never the later one's."""
    from sqlalchemy import delete

    from tomd.db.models import OutboxEvent
    from tomd.rules.cli import _alerts_from_db
    from datetime import datetime, timezone

    _store_swift_burst(db, shared_data)
    with db.sessions.begin() as s:
        s.execute(delete(OutboxEvent))
    notes: list[str] = []
    bat, xrt = _alerts_from_db(App(db), datetime(2024, 5, 1, tzinfo=timezone.utc), None, notes)
    assert bat.localization.error_deg is None and bat.notice_type is None
    assert xrt.localization.error_deg == pytest.approx(0.0013) and xrt.notice_type == "SWIFT_XRT_POSITION"
    assert notes and notes[0].startswith("1 notice alert(s) replayed without an error circle")


def test_backtest_report_names_targets_per_night_with_hours(shared_data, tmp_path, capsys):
    """Nights are the facility's (noon to noon at its first site), as the engine's limits count them."""
    schema, recs = series(3)
    files = []
    for i, r in enumerate(recs):
        p = tmp_path / f"a{i}.avro"
        p.write_bytes(encode(schema, [r]))
        files.append(str(p))
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    # Test mode: no request is made, so every alert would fire (no pending duplicate).
    (rules_dir / "a.toml").write_text('name = "all"\nmode = "test"\nwhen = "alert.mag > 0"\n'
                                      '[observe]\nfacility = "sim"\ntemplate = "1m-gri"\n[limits]\ncooldown = "1h"\n')
    config = Config()
    from dataclasses import replace

    from tomd.config import Facility

    config = replace(config, facilities={"sim": Facility(kind="sim")},
                     rules=replace(config.rules, paths=[str(rules_dir)]))
    app = App()
    app.config = config
    args = argparse.Namespace(rules=None, alerts=files, since=None, until=None, format="auto", json=True)
    assert cmd_rule_backtest(app, args) == 0
    r = json.loads(capsys.readouterr().out)["rules"]["all"]
    from tomd.rules.engine import night_of
    from tomd.rules.cli import _alerts_from_files

    alerts, _ = _alerts_from_files(files, "auto")
    expect = sorted({night_of(a.time, -156.2575)[1] for a in alerts})
    assert list(r["nights"]) == expect
    (name,) = r["target_names"]
    assert name.startswith("ZTF")
    assert all(n["targets"] == [name] for n in r["nights"].values())
    assert sum(n["estimated_hours"] for n in r["nights"].values()) == pytest.approx(r["estimated_hours"], abs=1e-3)
    args.json = False
    assert cmd_rule_backtest(app, args) == 0
    out = capsys.readouterr()
    assert f"night of {expect[0]}: 1, 0.31 h: {name}" in out.out and "note: targets start empty" in out.err


def _stored_series_with_tags(db, tmp_path):
    """Three packets of one object a day apart, stored; tag "hot" and list "watch" put on between the 1st and
    2nd, tag "old" and list "legacy" with no time (from before tomd kept it)."""

    from sqlalchemy import update

    from tomd.db import repository as repo
    from tomd.db.models import TargetListMember, TargetTag

    schema, recs = series(3)
    files = []
    for i, r in enumerate(recs):
        p = tmp_path / f"s{i}.avro"
        p.write_bytes(encode(schema, [r]))
        files.append(p)
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"),
                   lambda d: [a for r in decode_avro_ocf(d) for a in ztf.parse(r)])
    res = ing.handle([FileMessage(str(f), 0, f.read_bytes()) for f in files])
    with db.sessions.begin() as s:
        alerts = sorted((repo.get_alert(s, i) for i in res.alert_ids), key=lambda a: a.time)
        tid = alerts[0].target_id
        assert {a.target_id for a in alerts} == {tid}
        between = alerts[0].time + (alerts[1].time - alerts[0].time) / 2
        repo.add_tags_at(s, tid, ["hot"], between)
        repo.add_to_lists_at(s, tid, ["watch"], between)
        repo.add_tags(s, tid, ["old"])
        repo.add_to_lists(s, tid, ["legacy"])
        s.execute(update(TargetTag).where(TargetTag.tag == "old").values(added_at=None))
        s.execute(update(TargetListMember).where(TargetListMember.target_id == tid,
                                                 TargetListMember.added_at > between).values(added_at=None))
        # Today, every tag is on: a replay that read them as they are now would fire on all three.
        assert sorted(repo.tags_of(s, [tid])[tid]) == ["hot", "old"]
    return files, alerts, between


@pytest.mark.parametrize("source", ["database", "files"])
def test_backtest_sees_tags_and_lists_only_from_when_they_were_added(db, shared_data, tmp_path, capsys, source):
    files, _, _ = _stored_series_with_tags(db, tmp_path)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "hot.toml").write_text('name = "hot"\nwhen = "\'hot\' in target.tags"\nadd_tags = ["h"]\n')
    (rules_dir / "watch.toml").write_text('name = "watch"\nwhen = "\'watch\' in target.lists"\nadd_tags = ["w"]\n')
    (rules_dir / "old.toml").write_text('name = "old"\nwhen = "\'old\' in target.tags or \'legacy\' in target.lists"\nadd_tags = ["o"]\n')
    app = App(db, rules_dir)

    def run(assume_old):
        args = argparse.Namespace(rules=None, alerts=[str(f) for f in files] if source == "files" else None,
                                  since=None if source == "files" else "2000-01-01", until=None, format="auto",
                                  json=True, assume_old_tags=assume_old)
        assert cmd_rule_backtest(app, args) == 0
        return json.loads(capsys.readouterr().out)

    report = run(False)
    assert report["alerts"] == 3
    # The tag and the list were added after the first alert: not there for it, there for the later two.
    for name in ("hot", "watch"):
        assert report["rules"][name]["outcomes"] == {"not_fired": 1, "fired": 2}, name
    # Unknown time: left out unless asked, and the report says which way.
    assert report["rules"]["old"]["outcomes"] == {"not_fired": 3}
    assert any("2 tag(s)/list membership(s)" in n and "left out" in n for n in report["notes"])
    report = run(True)
    assert report["rules"]["old"]["outcomes"] == {"fired": 3}
    assert report["rules"]["hot"]["outcomes"] == {"not_fired": 1, "fired": 2}
    assert any("counted as present" in n for n in report["notes"])
    assert any("target.extras keys from when they were last set" in n for n in report["notes"])


def test_a_tag_added_by_a_replayed_rule_counts_from_that_alert_on(shared_data, tmp_path):
    """The replay stamps a rule's own tags with the alert's time, so the next alert sees them (not the wall clock)."""
    schema, recs = series(3)
    from tomd.rules.cli import _alerts_from_files

    files = []
    for i, r in enumerate(recs):
        p = tmp_path / f"t{i}.avro"
        p.write_bytes(encode(schema, [r]))
        files.append(str(p))
    alerts, _ = _alerts_from_files(files, "auto")
    first = rule('name = "first"\nwhen = "not (\'seen\' in target.tags)"\nadd_tags = ["seen"]')
    again = rule('name = "again"\nwhen = "\'seen\' in target.tags"\nadd_tags = ["a"]')
    report = backtest(alerts, [first, again])
    assert report["rules"]["first"]["outcomes"] == {"fired": 1, "not_fired": 2}
    assert report["rules"]["again"]["outcomes"] == {"not_fired": 1, "fired": 2}


# ---- streams: rules that select by the [[streams]] name an alert arrived on ----

STREAM_RULE = 'name = "public"\nsources = ["ztf"]\nstreams = ["ztf-public"]\nwhen = "alert.mag > 0"\nadd_tags = ["p"]\n'


def _with_streams(app, *names):
    from dataclasses import replace

    from tomd.config import Stream

    app.config = replace(app.config, streams=[Stream(name=n, topics=["t"], format="ztf-avro") for n in names])
    return app


def test_backtest_of_files_takes_the_stream_they_stand_for(shared_data, tmp_path, capsys):
    schema, recs = series(3)
    files = []
    for i, r in enumerate(recs):
        p = tmp_path / f"s{i}.avro"
        p.write_bytes(encode(schema, [r]))
        files.append(str(p))
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "public.toml").write_text(STREAM_RULE)
    (rules_dir / "all.toml").write_text('name = "all"\nwhen = "alert.mag > 0"\nadd_tags = ["a"]\n')
    app = _with_streams(App(rules_dir=rules_dir), "ztf-public", "ztf-private")

    def run(stream, json_=True):
        args = argparse.Namespace(rules=None, alerts=files, since=None, until=None, format="auto", json=json_,
                                  stream=stream)
        assert cmd_rule_backtest(app, args) == 0
        out = capsys.readouterr()
        return json.loads(out.out) if json_ else out

    report = run("ztf-public")
    assert report["rules"]["public"]["outcomes"] == {"fired": 3}
    assert report["streams"] == {"ztf-public": 3}
    assert not any("no known stream" in w for w in report["warnings"])
    report = run("ztf-private")  # the same source on another stream: not listened to, and nothing to warn of
    assert report["rules"]["public"]["evaluated"] == 0 and report["rules"]["all"]["evaluated"] == 3
    assert not any("no known stream" in w for w in report["warnings"])
    # No stream given: the stream rule judges nothing, and the report says why rather than look like a verdict.
    report = run(None)
    assert report["rules"]["public"]["evaluated"] == 0 and report["streams"] == {"(unknown)": 3}
    assert any(w.startswith("rule public listens only to stream ztf-public, and 3 alert(s) of its sources and kinds "
                            "came on no known stream") and "--stream NAME" in w for w in report["warnings"])
    out = run(None, json_=False)
    assert "warning: rule public listens only to stream ztf-public" in out.err
    from tomd.errors import InputError

    with pytest.raises(InputError, match="--stream: no stream named 'ztf-pubic' .streams: ztf-private, ztf-public."):
        run("ztf-pubic")


def test_backtest_from_the_database_replays_each_alert_on_its_stream(db, shared_data, tmp_path, capsys):
    files = ztf_files()[:6]
    for stream, part in (("ztf-public", files[:4]), ("ztf-private", files[4:])):
        ing = Ingestor(db.sessions, IngestSettings(stream=stream, format="ztf-avro"),
                       lambda d: [a for r in decode_avro_ocf(d) for a in ztf.parse(r)])
        ing.handle([FileMessage(str(f), 0, f.read_bytes()) for f in part])
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "public.toml").write_text(STREAM_RULE)
    app = _with_streams(App(db, rules_dir), "ztf-public", "ztf-private")
    args = argparse.Namespace(rules=None, alerts=None, since="2000-01-01", until=None, format="auto", json=True)
    assert cmd_rule_backtest(app, args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["alerts"] == 6 and report["streams"] == {"ztf-public": 4, "ztf-private": 2}
    assert report["rules"]["public"]["outcomes"] == {"fired": 4}
    assert not any("no known stream" in w for w in report["warnings"])
    from tomd.errors import InputError

    args.stream = "ztf-public"  # stored alerts know their own
    with pytest.raises(InputError, match="--stream: only with --alerts"):
        cmd_rule_backtest(app, args)


def test_explain_names_the_stream_when_no_rule_listened(db, shared_data, capsys):
    schema, (rec, second) = series(2)
    eng = RuleEngine(RuleSet.of([rule(STREAM_RULE)]), clock=lambda st: st.alert.time)
    ids = []
    for stream, r in (("ztf-public", rec), ("ztf-private", second)):
        ing = Ingestor(db.sessions, IngestSettings(stream=stream, format="ztf-avro"),
                       lambda d: [a for r in decode_avro_ocf(d) for a in ztf.parse(r)], sinks=[eng])
        ids.append(ing.handle([FileMessage("x", 0, encode(schema, [r]))]).alert_ids[0])
    assert cmd_rule_explain(App(db), argparse.Namespace(alert_id=ids[0], json=False)) == 0
    out = capsys.readouterr().out
    assert "stream ztf-public)" in out and "public  fired" in out
    assert cmd_rule_explain(App(db), argparse.Namespace(alert_id=ids[1], json=False)) == 0
    out = capsys.readouterr().out
    assert "no verdicts recorded" in out and "none listens to source 'ztf', kind 'transient' on stream " \
                                              "'ztf-private'" in out
    assert cmd_rule_explain(App(db), argparse.Namespace(alert_id=ids[1], json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["alert"]["stream"] == "ztf-private" and data["decisions"] == []


def test_explain_says_no_target_for_an_alert_without_one(db, shared_data, capsys):
    """A GW notice with a skymap of tens of square degrees is an event, not a target."""
    from tomd.alerts.parse import parse_message

    data = (shared_data / "lvk/skyportal/igwn_gwalert_preliminary.json").read_bytes()
    eng = RuleEngine(RuleSet.of([rule('name = "gw"\nwhen = "alert.kind == \'localization\'"\nadd_tags = ["gw"]')]),
                     clock=lambda st: st.alert.time)
    ing = Ingestor(db.sessions, IngestSettings(stream="gcn", format="lvk-json", include_test=True),
                   lambda d: parse_message("lvk-json", d, include_test=True), sinks=[eng])
    (alert_id,) = ing.handle([FileMessage("gw", 0, data)]).alert_ids
    assert cmd_rule_explain(App(db), argparse.Namespace(alert_id=alert_id, json=False)) == 0
    head = capsys.readouterr().out.splitlines()[0]
    # (and one space before "at" when the alert names no object)
    assert head.endswith("Z at 2026-06-05T11:57:26.395000+00:00 (no target, stream gcn)"), head


# ---- target extras: replayed as they stood (targets.extras_set_at, schema 0009) ----


def _stored_series_with_extras(db, tmp_path):
    """The three stored packets of ``_stored_series_with_tags``; then extras set through the targets store
    (the writer every path uses): redshift, its time moved to between the 1st and 2nd alert as if set then;
    host, at today's time (after every alert); sn_type, its time removed (set before tomd kept it)."""
    from sqlalchemy import update

    from tomd.db import repository as repo
    from tomd.db.models import Target
    from tomd.targets import store
    from tomd.targets.model import TargetSpec

    files, alerts, between = _stored_series_with_tags(db, tmp_path)
    tid = alerts[0].target_id
    with db.sessions.begin() as s:
        t = repo.get_target(s, tid)
        store.upsert(s, TargetSpec(t.name, ra=t.ra, dec=t.dec,
                                   extras={"redshift": 0.05, "host": "NGC 1", "sn_type": "Ia"}))
    with db.sessions.begin() as s:
        stamped = repo.get_target(s, tid).extras_set_at
        assert set(stamped) == {"redshift", "host", "sn_type"}
        s.execute(update(Target).where(Target.id == tid)
                  .values(extras_set_at={"redshift": between.isoformat(), "host": stamped["host"]}))
    return files, alerts, between


@pytest.mark.parametrize("source", ["database", "files"])
def test_backtest_sees_extras_only_from_when_they_were_set(db, shared_data, tmp_path, capsys, source):
    files, _, _ = _stored_series_with_extras(db, tmp_path)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "z.toml").write_text('name = "z"\nwhen = "known(target.extras.redshift)"\nadd_tags = ["z"]\n')
    (rules_dir / "host.toml").write_text('name = "host"\nwhen = "known(target.extras.host)"\nadd_tags = ["h"]\n')
    (rules_dir / "typed.toml").write_text('name = "typed"\nwhen = "target.extras.sn_type == \'Ia\'"\nadd_tags = ["t"]\n')
    app = App(db, rules_dir)

    def run(*flags):
        from tomd.cli import build_parser

        argv = ["rule", "backtest", "--json", *flags]
        argv += ["--alerts", *map(str, files)] if source == "files" else ["--since", "2000-01-01"]
        args = build_parser().parse_args(argv)
        assert cmd_rule_backtest(app, args) == 0
        return json.loads(capsys.readouterr().out)

    report = run()
    assert report["alerts"] == 3
    # redshift was set after the first alert: unknown to that one's rules, known to the two after it.
    assert report["rules"]["z"]["outcomes"] == {"not_fired": 1, "fired": 2}
    # host was set today, after every alert: never seen (the daemon, today, sees it).
    assert report["rules"]["host"]["outcomes"] == {"not_fired": 3}
    # sn_type has no time: left out unless asked, and the report says which way.
    assert report["rules"]["typed"]["outcomes"] == {"not_fired": 3}
    assert any("1 target.extras key(s)" in n and "left out" in n for n in report["notes"])
    for flag in ("--assume-old", "--assume-old-tags"):  # the old name still works, and now covers extras
        report = run(flag)
        assert report["rules"]["typed"]["outcomes"] == {"fired": 3}, flag
        assert report["rules"]["z"]["outcomes"] == {"not_fired": 1, "fired": 2}, flag
        assert report["rules"]["host"]["outcomes"] == {"not_fired": 3}, flag
        assert any("1 target.extras key(s)" in n and "counted as present" in n for n in report["notes"])


def test_the_daemon_sees_every_extra_whatever_its_time(db, shared_data):
    """Not as_of (the daemon: "now" is the wall clock): extras are read as stored, their times not looked at,
    even one stamped later than the alert and one of unknown time."""
    from datetime import timedelta

    from sqlalchemy import update

    from tomd.db.models import Target
    from tomd.targets import store
    from tomd.targets.model import TargetSpec

    schema, (rec, *_) = series(1)
    (a,) = [a for r in decode_avro_ocf(encode(schema, [rec])) for a in ztf.parse(r)]
    with db.sessions.begin() as s:
        res = store.upsert(s, TargetSpec(a.object_id, ra=a.ra, dec=a.dec,
                                         extras={"redshift": 0.05, "host": "NGC 1", "sn_type": "Ia"}))
        later = (a.time + timedelta(days=400)).isoformat()
        s.execute(update(Target).where(Target.id == res.target_id)
                  .values(extras_set_at={"redshift": later, "host": later}))
    eng = RuleEngine(RuleSet.of([rule('name = "z"\nwhen = "known(target.extras.redshift) and '
                                      'known(target.extras.host) and target.extras.sn_type == \'Ia\'"\nadd_tags = ["z"]')]))
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"),
                   lambda d: [a for r in decode_avro_ocf(d) for a in ztf.parse(r)], sinks=[eng])
    ing.handle([FileMessage("x", 0, encode(schema, [rec]))])
    assert [(v.rule, v.outcome) for v in eng.last_verdicts] == [("z", "fired")]
