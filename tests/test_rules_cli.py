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
