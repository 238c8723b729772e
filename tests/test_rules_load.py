"""Rule files: every problem as FILE:LINE:COL, the example rules, hot reload that keeps the last good rules."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pytest

from tomd.config import load_config
from tomd.rules.engine import RuleSet
from tomd.rules.load import RuleEnv, estimate_hours, load_file, load_paths, parse_rule

REPO = Path(__file__).resolve().parents[1]
ENV = RuleEnv({"lco": ("lco", {"1m-gri": {"exposure_time": 300, "filters": ["gp", "rp", "ip"]}}),
               "sim": ("sim", {})}, frozenset({"slack-transients"}), frozenset({"kn_score"}))

BAD = '''name = "bad rule!"
mode = "sometimes"
sources = "ztf"
when = """
  alert.mag < 18.5
  and target.age_dayz < 3
"""
colour = "blue"

[observe]
facility = "keck"
template = "1m-gri"
window = "soon"
priority = "high"
visible = { max_airmass = 0.5, moon = 30 }

[limits]
cooldown = "2 days"
per_night = 0
hours_per_night = -1

[notify]
channels = ["slak-transients"]
'''


def test_every_problem_with_its_position():
    rule, problems = parse_rule(BAD, "rules/bad.toml", ENV)
    assert rule is None
    text = "\n".join(problems)
    expected = [
        'rules/bad.toml:1:1: name: expected letters, digits, - _ . (at most 200), got a string "bad rule!"',
        'rules/bad.toml:2:1: mode: expected "active" or "test", got a string "sometimes"',
        'rules/bad.toml:3:1: sources: expected a list of strings, got a string "ztf"',
        "rules/bad.toml:6:7: when: target has no field 'age_dayz' (did you mean 'age_days'?)",
        "rules/bad.toml:8:1: colour: unknown key",
        "rules/bad.toml:11:1: observe.facility: unknown facility 'keck'; configured: lco, sim",
        'rules/bad.toml:13:1: observe.window: expected a duration like "24h" or "3d", got a string "soon"',
        'rules/bad.toml:14:1: observe.priority: expected a number (higher is more urgent), got a string "high"',
        "rules/bad.toml:15:13: observe.visible.max_airmass: expected a number in [1, 10], got a number 0.5",
        "rules/bad.toml:15:32: observe.visible.moon: unknown key",
        'rules/bad.toml:18:1: limits.cooldown: expected a duration like "12h" or "2d", got a string "2 days"',
        "rules/bad.toml:19:1: limits.per_night: expected a whole number >= 1, got 0",
        "rules/bad.toml:20:1: limits.hours_per_night: expected a number of hours > 0, got -1",
        "rules/bad.toml:23:1: notify.channels: unknown channel 'slak-transients'; known: slack-transients",
    ]
    for e in expected:
        assert any(p.startswith(e) for p in problems), f"missing: {e}\n--- got:\n{text}"


def test_expression_positions_map_into_the_file():
    one_line = 'name = "x"\nadd_tags = ["t"]\nwhen = "alert.mag < 18 and targt.gal_b > 10"\n'
    _, problems = parse_rule(one_line, "f.toml", ENV)
    assert problems[0].startswith("f.toml:3:28: when: unknown name 'targt'")
    inline_ml = "name = 'x'\nadd_tags = ['t']\nwhen = '''alert.mag < 18\n   and foo(1)'''\n"
    _, problems = parse_rule(inline_ml, "f.toml", ENV)
    assert problems[0].startswith("f.toml:4:8: when: unknown function 'foo'")


def test_unknown_template_and_features():
    text = 'name = "x"\nwhen = "feature.kn_score > 0.5 and feature.nope > 1"\n[observe]\nfacility = "lco"\ntemplate = "2m"\n'
    _, problems = parse_rule(text, "f.toml", ENV)
    assert any("2:36: when: unknown feature 'nope'" in p for p in problems)
    assert any("5:1: observe.template: unknown template '2m' for facility 'lco'; its templates: 1m-gri" in p
               for p in problems)
    # The simulated facility without configured templates has its built-in ones.
    from tomd.config import Config

    env = RuleEnv.from_config(Config(), ["kn_score"])
    ok = 'name = "x"\nwhen = "feature.kn_score > 0.5"\n[observe]\nfacility = "sim"\ntemplate = "1m-gri"\n'
    rule, problems = parse_rule(ok, "f.toml", env)
    assert not problems and rule.observe.template_key == "1m-gri"
    assert rule.observe.estimated_hours == pytest.approx(1100 / 3600)
    _, problems = parse_rule(ok.replace("1m-gri", "anything"), "f.toml", env)
    assert "unknown template 'anything' for facility 'sim'" in problems[0]


def test_toml_syntax_error_position():
    _, problems = parse_rule('name = "x"\nwhen = "alert.mag < 1\n', "f.toml", ENV)
    assert problems[0].startswith("f.toml:2:") and "TOML syntax" in problems[0]


def test_a_rule_that_does_nothing_is_refused():
    _, problems = parse_rule('name = "x"\nwhen = "alert.mag < 1"\n', "f.toml", ENV)
    assert "does nothing" in problems[0]


def test_duplicate_rule_names_across_files(tmp_path):
    (tmp_path / "a.toml").write_text('name = "same"\nwhen = "alert.mag < 1"\nadd_tags = ["a"]\n')
    (tmp_path / "b.toml").write_text('name = "same"\nwhen = "alert.mag < 2"\nadd_tags = ["b"]\n')
    rules, problems = load_paths([tmp_path], ENV)
    assert len(rules) == 1 and "rule name 'same' is already used by" in problems[0]


def test_estimated_hours_from_templates():
    assert estimate_hours({"exposure_time": 300, "filters": ["gp", "rp", "ip"]}) == pytest.approx(1100 / 3600)
    assert estimate_hours({"configurations": [{"exposure_time": 60, "exposure_count": 2},
                                              {"exposure_time": 100, "exposure_count": 1}],
                           "overhead_s": 0}) == pytest.approx((2 * 80 + 120 + 10) / 3600)
    assert estimate_hours({"hours": 0.75}) == 0.75


def example_config():
    return load_config(REPO / "config.example.toml",
                       env={**os.environ, "LCO_API_TOKEN": "x", "GCN_CLIENT_ID": "x", "GCN_CLIENT_SECRET": "x"})


def test_example_rules_pass_check():
    from tomd.rules.cli import cmd_rule_check

    class App:
        config = example_config()

    assert cmd_rule_check(App(), argparse.Namespace(paths=[str(REPO / "rules")])) == 0
    rules, problems = load_paths([REPO / "rules"], RuleEnv.from_config(App.config))
    assert not problems and len(rules) >= 4
    assert {r.mode for r in rules} == {"active", "test"}
    assert any(r.observe and r.observe.mode == "RAPID_RESPONSE" for r in rules)
    assert any("gcn" in r.sources for r in rules)
    (mon,) = [r for r in rules if r.name == "monitor-cadence"]
    assert mon.observe.cadence["spec"] == {"every_s": 3 * 86400.0, "count": 10, "until_expr": "target.last_mag > 20"}
    assert mon.observe.proposal == App.config.facilities["lco"].proposal


def test_check_command_reports_and_exits_1(tmp_path, capsys):
    from tomd.rules.cli import cmd_rule_check

    (tmp_path / "bad.toml").write_text(BAD)

    class App:
        config = example_config()

    assert cmd_rule_check(App(), argparse.Namespace(paths=[str(tmp_path)])) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) >= 10 and all(line.startswith(f"{tmp_path}/bad.toml:") for line in err)


def test_register_adds_the_rule_commands():
    from tomd.rules.cli import cmd_rule_backtest, cmd_rule_check, cmd_rule_explain, register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    assert p.parse_args(["rule", "check", "rules"]).func is cmd_rule_check
    assert p.parse_args(["rule", "explain", "12"]).func is cmd_rule_explain
    a = p.parse_args(["rule", "backtest", "--since", "2025-01-01", "--json"])
    assert a.func is cmd_rule_backtest and a.json


def _touch(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a visibly newer mtime


def test_hot_reload_keeps_the_last_good_rule(tmp_path, caplog):
    f = tmp_path / "r.toml"
    f.write_text('name = "r"\nwhen = "alert.mag < 18"\nadd_tags = ["a"]\n')
    rs = RuleSet([tmp_path], ENV, check_every_s=0)
    assert [r.when.source for r in rs.current()] == ["alert.mag < 18"]
    _touch(f, 'name = "r"\nwhen = "alert.mag < 19"\nadd_tags = ["a"]\n')
    assert [r.when.source for r in rs.current()] == ["alert.mag < 19"]
    # An invalid edit: logged with its position, the last good version stays.
    _touch(f, 'name = "r"\nwhen = "alert.mag < < 19"\nadd_tags = ["a"]\n')
    assert [r.when.source for r in rs.current()] == ["alert.mag < 19"]
    assert any(f"{f}:2:" in rec.getMessage() for rec in caplog.records)
    # A new file is picked up; a removed one disappears.
    g = tmp_path / "s.toml"
    g.write_text('name = "s"\nwhen = "alert.mag < 20"\nadd_tags = ["b"]\n')
    assert sorted(r.name for r in rs.current()) == ["r", "s"]
    f.unlink()
    assert [r.name for r in rs.current()] == ["s"]


def test_reload_is_rate_limited(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('name = "r"\nwhen = "alert.mag < 18"\nadd_tags = ["a"]\n')
    rs = RuleSet([tmp_path], ENV, check_every_s=3600)
    _touch(f, 'name = "r"\nwhen = "alert.mag < 19"\nadd_tags = ["a"]\n')
    t0 = time.perf_counter()
    for _ in range(1000):
        rs.current()
    assert time.perf_counter() - t0 < 0.05
    assert rs.current()[0].when.source == "alert.mag < 18"
    rs.reload()
    assert rs.current()[0].when.source == "alert.mag < 19"


def kn_score(ctx):
    """A registered feature (referenced as "tests.test_rules_load:kn_score")."""
    return 0.9 if (ctx.alert.mag or 99) < 19 else 0.1


def test_from_config_with_features_and_kill_switch(tmp_path):
    """The config fields the integrator adds to [rules]: features, kill_switch, enabled."""
    from dataclasses import replace
    from types import SimpleNamespace

    from tomd.config import Config
    from tomd.errors import InputError
    from tomd.rules.engine import RuleEngine, load_features

    (tmp_path / "kn.toml").write_text('name = "kn"\nwhen = "feature.kn > 0.5"\nadd_tags = ["kn"]\n')
    rules_cfg = SimpleNamespace(paths=[str(tmp_path)], features={"kn": "tests.test_rules_load:kn_score"},
                                kill_switch=str(tmp_path / "STOP"), enabled=True)
    eng = RuleEngine.from_config(replace(Config(), rules=rules_cfg))
    assert [r.name for r in eng.ruleset.current()] == ["kn"]
    assert eng.features["kn"] is kn_score and eng.killed() is None
    (tmp_path / "STOP").write_text("")
    assert eng.killed().startswith("kill switch:")
    with pytest.raises(InputError, match="rules.features.bad"):
        load_features({"bad": "no_such_module_xyz:f"})


def test_gemini_program_narrows_visibility_to_its_site_and_swift_has_none(tmp_path):
    from tomd.config import load_config

    cfg = tmp_path / "tomd.toml"
    cfg.write_text("""
[facilities.gs]
kind = "gemini"
url = "http://127.0.0.1:9"
email = "pi@example.org"
token = "key"
proposal = "GS-2026B-Q-101"
[facilities.swift]
kind = "swift"
url = "http://127.0.0.1:9"
username = "me"
token = "secret"
""")
    env = RuleEnv.from_config(load_config(cfg))
    from tomd.visibility import FACILITY_SITES

    assert FACILITY_SITES[env.facility_kinds["gs"]] == ("gs",)
    rule = tmp_path / "r.toml"
    rule.write_text('name = "r"\nwhen = \'visible("swift")\'\n')
    problems = load_file(rule, env)[1]
    assert any("observes from orbit" in str(p) for p in problems)


DEEP = 'name = "deep"\nwhen = "' + "-" * 3000 + '1 > 0"\nadd_tags = ["a"]\n'


def test_deeply_nested_expression_is_a_check_error_not_a_traceback(tmp_path, capsys):
    from tomd.rules.cli import cmd_rule_check

    r, problems = parse_rule(DEEP, "deep.toml", ENV)
    assert r is None and problems == ["deep.toml:2:9: when: expression nested too deeply"]
    r, problems = parse_rule("name = \"t\"\nwhen = \"alert.mag < 1\"\nadd_tags = [\"a\"]\nx = " + "[" * 3000
                             + "]" * 3000 + "\n", "t.toml", ENV)
    assert r is None and problems == ["t.toml:1:1: TOML nested too deeply"]
    (tmp_path / "deep.toml").write_text(DEEP)

    class App:
        config = example_config()

    assert cmd_rule_check(App(), argparse.Namespace(paths=[str(tmp_path)])) == 1
    assert capsys.readouterr().err.strip() == f"{tmp_path}/deep.toml:2:9: when: expression nested too deeply"


def test_reload_keeps_a_files_last_good_version_when_it_turns_deep(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('name = "r"\nwhen = "alert.mag < 18"\nadd_tags = ["a"]\n')
    g = tmp_path / "s.toml"
    g.write_text('name = "s"\nwhen = "alert.mag < 20"\nadd_tags = ["b"]\n')
    rs = RuleSet([tmp_path], ENV, check_every_s=0)
    _touch(f, DEEP.replace('"deep"', '"r"'))
    _touch(g, 'name = "s"\nwhen = "alert.mag < 21"\nadd_tags = ["b"]\n')
    assert [(r.name, r.when.source) for r in rs.current()] == [("r", "alert.mag < 18"), ("s", "alert.mag < 21")]
    assert rs.problems == [f"{f}:2:9: when: expression nested too deeply"]


def test_missing_rules_path_is_reported_once_not_at_every_look(tmp_path):
    told = []
    missing = tmp_path / "rules"
    rs = RuleSet([missing], ENV, check_every_s=0)
    rs.observer = lambda n, problems: told.append(problems)
    for _ in range(5):
        rs.reload()
    assert told == [[]] * 5  # reported at construction, before the observer was attached
    missing.mkdir()
    rs.reload()
    missing.rmdir()
    rs.reload()
    rs.reload()
    assert told[-3:] == [[], [f"{missing}: no such file or directory"], []]


def test_every_unknown_name_and_source_is_reported():
    text = ('name = "typos"\nsources = ["ztff", "gcn"]\nwhen = """\nalert.magg < 18 and target.age_dayz < 3\n'
            '  and foo > 1 and feature.kn_scor > 0.5 and frob(alert.ra)\n"""\nadd_tags = ["a"]\n')
    r, problems = parse_rule(text, "t.toml", ENV)
    assert r is None
    assert problems == [
        "t.toml:2:1: sources: unknown alert source 'ztff' (did you mean 'ztf'?); known: alerce, antares, fink, gcn, "
        "hop, lasair, lvk, rubin, tns, ztf",
        "t.toml:4:1: when: alert has no field 'magg' (did you mean 'mag'?); survey fields are alert.fields.NAME, "
        "the raw packet alert.payload.NAME",
        "t.toml:4:21: when: target has no field 'age_dayz' (did you mean 'age_days'?); typed extras are "
        "target.extras.NAME",
        "t.toml:5:7: when: unknown name 'foo'; expressions read alert.*, target.*, feature.*, now",
        "t.toml:5:19: when: unknown feature 'kn_scor' (did you mean 'kn_score'?); known: kn_score",
        "t.toml:5:45: when: unknown function 'frob'; known: abs, airmass, color, galactic_latitude, in_circle, "
        "in_polygon, known, log10, max, min, moon_distance, separation, sqrt, visible",
    ]


def test_sighup_reports_a_missing_path_again(tmp_path):
    rs = RuleSet([tmp_path / "nope"], ENV, check_every_s=0)
    assert rs.reload() == []
    assert rs.reload_now() == [f"{tmp_path / 'nope'}: no such file or directory"]


def test_unknown_facility_in_visible_is_reported_beside_unknown_names():
    r, problems = parse_rule('name = "x"\nwhen = "foo > 1 and visible(\'keck\')"\nadd_tags = ["a"]\n', "x.toml", ENV)
    assert [p.split(": when: ")[1].split(";")[0].split(" (")[0] for p in problems] == \
        ["unknown name 'foo'", "visible(): unknown facility 'keck'"]
    assert [p.split(": when:")[0] for p in problems] == ["x.toml:2:9", "x.toml:2:29"]


# ---- streams: rules select alerts by the [[streams]] name they arrived on ----

STREAM_ENV = RuleEnv(ENV.facilities, ENV.channels, ENV.features, streams=frozenset({"ztf-public", "gcn"}))


def test_streams_are_parsed_and_unknown_names_reported_at_their_place():
    ok, problems = parse_rule('name = "s"\nstreams = ["ztf-public", "gcn"]\nwhen = "alert.mag < 18"\n'
                              'add_tags = ["a"]\n', "s.toml", STREAM_ENV)
    assert not problems and ok.streams == ("ztf-public", "gcn")
    text = 'name = "s"\nsources = ["ztf"]\nstreams = [\n  "gcn",\n  "ztf-pubic",\n  "lvk"]\nwhen = "alert.mag < 18"\n' \
           'add_tags = ["a"]\n'
    r, problems = parse_rule(text, "s.toml", STREAM_ENV)
    assert r is None
    assert problems == [
        "s.toml:5:3: streams: unknown stream 'ztf-pubic' (did you mean 'ztf-public'?); known: gcn, ztf-public "
        "([[streams]] names of the config)",
        "s.toml:6:3: streams: unknown stream 'lvk'; known: gcn, ztf-public ([[streams]] names of the config)",
    ]
    # Without a config (streams not known) the names cannot be checked, and are kept as written.
    r, problems = parse_rule(text, "s.toml", ENV)
    assert not problems and r.streams == ("gcn", "ztf-pubic", "lvk")


@pytest.mark.parametrize("value, shown", [('"ztf-public"', 'a string "ztf-public"'), ("[1]", "a list [1]"),
                                          ('[""]', "a list ['']")])
def test_streams_type_errors_have_their_position(value, shown):
    _, problems = parse_rule(f'name = "s"\ndescription = "x"\nstreams = {value}\nwhen = "alert.mag < 18"\n'
                             'add_tags = ["a"]\n', "s.toml", STREAM_ENV)
    assert problems == [f"s.toml:3:1: streams: expected a list of strings, got {shown}"]


def test_stream_names_come_from_the_config_and_check_reports_them(tmp_path, capsys):
    from tomd.config import Config
    from tomd.rules.cli import cmd_rule_check

    assert RuleEnv.from_config(example_config()).streams == {"ztf", "gcn"}
    assert RuleEnv.from_config(Config()).streams is None  # no config file: nothing to check names against
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text('name = "r"\nstreams = ["ztf", "gnc"]\nwhen = "alert.mag < 18"\nadd_tags = ["a"]\n')

    class App:
        config = example_config()

    assert cmd_rule_check(App(), argparse.Namespace(paths=[str(rules)])) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{rules}/r.toml:2:19: streams: unknown stream 'gnc' (did you mean 'gcn'?); known: gcn, ztf "
        "([[streams]] names of the config)"]

    App.config = Config()
    assert cmd_rule_check(App(), argparse.Namespace(paths=[str(rules)])) == 0
    out = capsys.readouterr()
    assert "1 rule OK" in out.out and "stream names rules listen to were not checked" in out.err


# ---- bounded work: the visibility window has a maximum (tomd.visibility.MAX_WINDOW_HOURS) ----

def test_visibility_windows_above_the_maximum_are_check_errors_at_their_place():
    from tomd.visibility import MAX_WINDOW_HOURS

    assert MAX_WINDOW_HOURS == 14 * 24
    text = ('name = "far"\nadd_tags = ["a"]\nwhen = """\n  visible("lco", hours=1e6)\n'
            '  and airmass("lco", hours=24 * 30) < 2\n  and visible("lco", hours=-1)\n'
            '  and visible("lco", hours="2d")\n  and visible("lco", hours=336)\n"""\n')
    rule, problems = parse_rule(text, "far.toml", ENV)
    assert rule is None
    assert problems == [
        "far.toml:4:24: when: visible(): hours=1e+06 is beyond the visibility window's maximum, 336 h (14 days)",
        "far.toml:5:28: when: airmass(): hours=720 is beyond the visibility window's maximum, 336 h (14 days)",
        "far.toml:6:28: when: visible(): hours must be a number of hours > 0, got -1",
        "far.toml:7:28: when: visible(): hours must be a number of hours > 0, got '2d'",
    ]
    # Within the maximum, or computed at run time (clamped there): fine.
    ok, problems = parse_rule('name = "ok"\nadd_tags = ["a"]\nwhen = "visible(\'lco\', hours=14 * 24) '
                              'and visible(\'lco\', hours=target.age_days * 24)"\n', "ok.toml", ENV)
    assert problems == [] and ok is not None


def test_observe_window_above_the_maximum_is_an_error_only_when_visible_gates_it():
    base = 'name = "w"\nwhen = "alert.mag < 18"\n[observe]\nfacility = "lco"\ntemplate = "1m-gri"\nwindow = "{w}"\n'
    _, problems = parse_rule(base.format(w="3650d") + "visible = { max_airmass = 1.8 }\n", "w.toml", ENV)
    assert problems == ['w.toml:6:1: observe.window: with visible, at most 336 h (14 days), the visibility '
                        "window's maximum; got 87600 h"]
    rule, problems = parse_rule(base.format(w="14d") + "visible = { max_airmass = 1.8 }\n", "w.toml", ENV)
    assert problems == [] and rule.observe.window_hours == 336
    rule, problems = parse_rule(base.format(w="30d"), "w.toml", ENV)  # no visibility computed: a long request
    assert problems == [] and rule.observe.window_hours == 720


def test_an_observe_error_has_no_follow_on_messages():
    text = ('name = "k"\nwhen = "alert.mag < 18"\n[observe]\nfacility = "keck"\ntemplate = "1m-gri"\n'
            '[limits]\nhours_per_night = 2\n')
    _, problems = parse_rule(text, "k.toml", ENV)
    assert problems == ["k.toml:4:1: observe.facility: unknown facility 'keck'; configured: lco, sim"]
    _, problems = parse_rule('name = "k"\nwhen = "alert.mag < 18"\nobserve = 3\n', "k.toml", ENV)
    assert problems == ["k.toml:3:1: observe: expected a table [observe]"]
    # Without [observe] at all, they still say what is wrong.
    _, problems = parse_rule('name = "k"\nwhen = "alert.mag < 18"\n[limits]\nhours_per_night = 2\n', "k.toml", ENV)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "limits.hours_per_night: needs an [observe] action (hours are counted per facility)",
        "the rule does nothing when it fires: add [observe], [notify], add_tags or add_to_lists"]


def test_rule_check_reports_unbounded_visibility_and_a_lone_unknown_facility(tmp_path, capsys):
    from tomd.rules.cli import cmd_rule_check

    (tmp_path / "far.toml").write_text('name = "far"\nwhen = "visible(\'lco\', hours=1e6)"\n[observe]\n'
                                       'facility = "lco"\ntemplate = "1m-gri"\nwindow = "3650d"\n'
                                       'visible = { max_airmass = 2 }\n')
    (tmp_path / "keck.toml").write_text('name = "keck"\nwhen = "alert.mag < 18"\n[observe]\nfacility = "keck"\n'
                                        'template = "1m-gri"\n[limits]\nhours_per_night = 1\n')

    cfg = tmp_path / "tomd.toml"
    cfg.write_text('[facilities.lco]\nkind = "lco"\nurl = "https://observe.lco.global"\ntoken = "x"\n'
                   '[facilities.lco.templates.1m-gri]\nexposure_time = 300\n[facilities.sim]\nkind = "sim"\n')

    class App:
        config = load_config(cfg, env={})

    files = [str(tmp_path / "far.toml"), str(tmp_path / "keck.toml")]
    assert cmd_rule_check(App(), argparse.Namespace(paths=files)) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path}/far.toml:2:30: when: visible(): hours=1e+06 is beyond the visibility window's maximum, "
        "336 h (14 days)",
        f"{tmp_path}/far.toml:6:1: observe.window: with visible, at most 336 h (14 days), the visibility window's "
        "maximum; got 87600 h",
        f"{tmp_path}/keck.toml:4:1: observe.facility: unknown facility 'keck'; configured: lco, sim",
    ]
