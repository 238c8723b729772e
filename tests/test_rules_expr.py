"""The `when` language: semantics, missing values, safety, positions, speed."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tomd.alerts.model import Alert
from tomd.rules.context import AlertView, Context, Point, TargetView, color, lightcurve_features, mjd_of
from tomd.rules.expr import ExprError, compile_expression

NOW = datetime(2025, 3, 1, 6, 0, tzinfo=timezone.utc)


def ctx(alert_kw=None, target_row=None, points=(), tags=(), lists=(), features=None):
    a = Alert(source="ztf", key="1", time=NOW, **({"ra": 150.0, "dec": 2.2, "mag": 17.5, "band": "ztfg",
                                                     "fields": {"real_bogus": 0.93, "ndethist": 3},
                                                     "payload": {"candidate": {"magpsf": 17.5, "fid": 1}}}
                                                    | (alert_kw or {})))
    now = mjd_of(NOW)
    row = {"id": 7, "name": "ZTF25abc", "ra": 150.0, "dec": 2.2, "gal_l": 236.8, "gal_b": 42.1,
           "extras": {"redshift": 0.03}} if target_row is None else target_row
    t = TargetView(row, names=["ZTF25abc"], tags=tags, lists=lists, points=points, now_mjd=now)
    return Context(AlertView(a, 1), t, now, facility_kinds={"lco": "lco"}, features=features or {})


def ev(text, c=None, features=()):
    c = c or ctx()
    return compile_expression(text, features).first_false(*c.args()) == -1


@pytest.mark.parametrize("text,expected", [
    ("alert.mag < 18.5 and alert.fields.real_bogus > 0.8", True),
    ("alert.mag < 18.5 and alert.fields['real_bogus'] > 0.95", False),
    ("alert.payload.candidate.magpsf == alert.mag", True),
    ("alert.source in ['ztf', 'rubin'] and alert.source not in ('gcn',)", True),
    ("abs(target.gal_b) > 10 and 40 < target.gal_b < 45", True),
    ("min(alert.mag, 20) == 17.5 and max(1, 2, 3) == 3", True),
    ("log10(100) == 2 and sqrt(16) == 4", True),
    ("2 ** 3 == 8 and 7 % 4 == 3 and 7 // 2 == 3 and -alert.mag < 0", True),
    ("not (alert.mag > 18) or target.extras.redshift > 1", True),
    ("target.extras.redshift < 0.05", True),
    ("'ZTF25abc' in target.names", True),
    ("separation(alert.ra, alert.dec, 150.0, 2.2 + 1/3600) < 2/3600", True),
    ("in_circle(alert.ra, alert.dec, 150.5, 2.2, 1.0)", True),
    ("in_polygon(alert.ra, alert.dec, [(149, 1), (151, 1), (151, 3), (149, 3)])", True),
    ("in_polygon(alert.ra, alert.dec, [(152, 1), (153, 1), (153, 3), (152, 3)])", False),
    ("abs(galactic_latitude(alert.ra, alert.dec) - target.gal_b) < 1", True),
    ("1 if alert.mag < 18 else 0", True),
])
def test_semantics(text, expected):
    assert ev(text) is expected


def test_missing_values_are_false_not_errors():
    c = ctx({"mag": None, "fields": {}})
    assert not ev("alert.mag < 18.5", c)
    assert not ev("alert.mag + 1 < 18.5", c)
    assert not ev("alert.fields.real_bogus > 0.5", c)
    assert ev("not known(alert.mag) and known(alert.ra)", c)
    assert ev("alert.mag < 18 or alert.ra > 100", c)  # a missing value does not spoil an `or`
    assert not ev("abs(alert.mag) > 0", c)
    assert not ev("target.rise_rate > 0", c)  # no photometry: no features
    # No target at all (a GCN notice with a large error circle).
    nt = ctx(target_row={})
    assert not ev("target.gal_b > 10", nt) and not ev("'x' in target.tags", nt)


def test_reason_is_the_first_false_clause_with_its_values():
    c = ctx()
    comp = compile_expression("alert.mag < 18.5\n  and alert.fields.real_bogus > 0.95\n  and target.gal_b > 0")
    i = comp.first_false(*c.args())
    assert i == 1
    assert comp.clauses[1].source == "alert.fields.real_bogus > 0.95"
    assert comp.clauses[1].line == 2
    assert comp.values(1, *c.args()) == {"alert.fields.real_bogus": 0.93}


@pytest.mark.parametrize("text,line,col,words", [
    ("alert.mag < 18 and\n  alrt.mag > 1", 2, 3, "unknown name 'alrt' (did you mean 'alert'?)"),
    ("alert.__class__", 1, 1, "names starting with _"),
    ("alert.mag.__class__", 1, 1, "names starting with _"),
    ("target.foo > 1", 1, 1, "target has no field 'foo'"),
    ("[x for x in alert.payload]", 1, 1, "comprehensions"),
    ("(lambda: 1)()", 1, 1, "only the listed functions"),
    ("__import__('os')", 1, 1, "unknown function '__import__'"),
    ("open('/etc/passwd')", 1, 1, "unknown function 'open'"),
    ("alert.mag is None", 1, 1, "'is' / 'is not'"),
    ("f'{alert.mag}'", 1, 1, "f-strings"),
    ("(x := 1)", 1, 2, "assignments"),
    ("alert.mag <", 1, 12, "syntax error"),
    ("visible('keck')", 1, 1, None),
    ("abs(1, 2)", 1, 1, "abs() takes 1 argument"),
    ("visible('lco', hourz=3)", 1, 16, "no option 'hourz'"),
    ("feature.kilonova_score > 0.5", 1, 1, "unknown feature 'kilonova_score'"),
    ("alert.mag > 1" + " or now>1" * 300, 1, 1804, "too complex"),  # where the limit is reached
    ("alert.mag " + "+ 1 " * 700, 1, 1, "nested too deeply"),
])
def test_rejected_with_position(text, line, col, words):
    if words is None:  # unknown facility names are checked by the loader (it knows the config)
        compile_expression(text)
        return
    with pytest.raises(ExprError) as e:
        compile_expression(text)
    assert words in e.value.message
    assert (e.value.line, e.value.col) == (line, col)


def test_bounded_work():
    c = ctx({"fields": {"n": 10**6, "s": "x"}})
    # No huge integers or strings: * ** % take numbers only, ** works in floats.
    with pytest.raises(TypeError):
        compile_expression("alert.fields.s * alert.fields.n").first_false(*c.args())
    with pytest.raises(OverflowError):
        compile_expression("alert.fields.n ** alert.fields.n > 1").first_false(*c.args())
    with pytest.raises(ExprError):
        compile_expression("x" * 5000)


def test_compiled_code_has_no_builtins():
    comp = compile_expression("alert.mag > 1")
    assert comp.fast.__globals__["__builtins"+"__"] == {}


def test_features_registered_in_python():
    calls = []

    def score(c):
        calls.append(1)
        return 0.9 if c.alert.mag < 18 else 0.1

    c = ctx(features={"score": score})
    comp = compile_expression("feature.score > 0.5 and feature.score < 1", ["score"])
    assert comp.first_false(*c.args()) == -1
    assert len(calls) == 1  # computed once per alert


def test_light_curve_features():
    pts = [Point(60000.0, "ztfg", "upper_limit", limit=20.5),
           Point(60001.0, "ztfg", "detection", 19.0), Point(60002.0, "ztfg", "detection", 18.5),
           Point(60003.0, "ztfg", "detection", 18.0), Point(60003.1, "ztfr", "detection", 18.3),
           Point(60005.0, "ztfg", "detection", 18.6), Point(60005.05, "ztfr", "detection", 18.9)]
    f = lightcurve_features(pts, 60006.0)
    assert f["n_detections"] == 6 and f["n_upper_limits"] == 1
    assert f["first_detection"] == 60001.0 and f["age_days"] == pytest.approx(5.0)
    assert f["peak_mag"] == 18.0 and f["peak_band"] == "ztfg"
    assert f["rise_rates"]["g"] == pytest.approx(0.5)  # 19.0 → 18.0 in 2 days
    assert f["decline_rates"]["ztfg"] == pytest.approx(0.3)  # 18.0 → 18.6 in 2 days
    assert f["decline_rates"]["r"] == pytest.approx(0.6 / 1.95)
    assert color(pts, "g", "r") == pytest.approx(-0.3)
    assert color(pts, "g", "r", max_dt_days=0.01) is None


def test_visibility_in_expressions():
    c = ctx({"ra": 266.4, "dec": -29.0})
    c.target.ra, c.target.dec = 266.4, -29.0
    # 1 March, 06:00 UTC: the Galactic centre rises before dawn in Chile.
    assert ev("visible('lco', hours=24, max_airmass=2)", c)
    # No LCO site gets it nearer the zenith than Cerro Tololo (30.17° S): 1.17° off, airmass 1/cos(1.17°) = 1.0002.
    assert not ev("visible('lco', hours=24, max_airmass=1.0001)", c)
    assert ev("airmass('lco') < 1.2 and airmass('lco') >= 1.0002 and moon_distance() >= 0", c)


def test_an_erroring_feature_is_called_once_per_alert():
    """The engine reads a failing clause up to three times (verdict, failing clause, values): one call."""
    calls = []

    def broken(c):
        calls.append(1)
        raise ValueError("no host galaxy catalogue")

    c = ctx(features={"host": broken})
    comp = compile_expression("alert.mag > 0 and feature.host > 0.5", ["host"])
    with pytest.raises(ValueError, match="no host galaxy"):
        comp.first_false(*c.args())
    assert comp.failing_clause(*c.args()) == 1
    assert "ValueError: no host galaxy catalogue" in comp.values(1, *c.args())["feature.host"]
    assert len(calls) == 1


def test_missing_values_never_raise_where_the_plain_version_would():
    """first_false runs the None-tolerant version: a missing field reads as false, never as an error."""
    c = ctx({"mag": None})
    comp = compile_expression("alert.mag < 18.5 or alert.fields.nothing + 1 > 0")
    with pytest.raises(TypeError):
        comp.fast(*c.args())
    assert comp.first_false(*c.args()) == 0


# ---- the engine's one-call verdict path: Compiled.judge and the generated values functions ----

JUDGED = [
    "alert.mag > 18 and alert.fields.real_bogus > 0.5",  # a float read
    "alert.fields.nope < 1 and alert.mag > 0",  # a missing value: None
    "alert.fields.nan_field < 1",  # NaN: None, as json_leaves keeps it
    "alert.fields.inf_field < 1",  # infinity: None
    "'x' in target.tags and alert.mag > 0",  # a frozenset: a sorted list
    "target.names == ['other'] and alert.band == 'ztfg'",  # a tuple: a list
    "target.extras.redshift > 1",  # a nested value
    "alert.payload.candidate == 1",  # a dict value
    "target.rise_rates == 2",  # a per-band dict (empty here)
    "alert.mag > 0 and alert.mag + alert.mag > 100 and alert.mag > 3",  # a text read twice in a clause
    "alert.band + 'x' == 'ztfg\\\\t' and alert.mag > 0",  # a backslash in the clause's text
    "abs(target.gal_b) > 50 or alert.mag > 30",  # a top-level or: one clause, every leaf
    "visible('lco', hours=6) and alert.mag > 30",  # a context function's value
    "alert.mag > 0 and alert.ra > 0",  # every clause true: None
]


@pytest.mark.parametrize("text", JUDGED)
def test_judge_and_generated_values_match_the_leaf_by_leaf_path(text):
    """Compiled.judge (the rule engine's not-fired verdict in one call) and the generated values functions
    give what first_false + json_leaves give, value for value, in the same order."""
    from tomd.db.repository import decision_details
    from tomd.rules.expr import json_leaves

    c = ctx({"fields": {"real_bogus": 0.93, "nan_field": float("nan"), "inf_field": float("-inf")}},
            tags=("sn", "x"))
    comp = compile_expression(text)
    args = c.args()
    i = comp.first_false(*args)
    got = comp.judge(*args)
    if i < 0:
        assert got is None
    else:
        clause = comp.clauses[i]
        want = {"clause": i, "values": json_leaves(clause.leaves, *args), "line": clause.line}
        assert got[0] == clause.false_text
        details = decision_details((1, 2, "rule", "", "not_fired", None) + got)  # the engine's compact row
        assert details == want and list(details["values"]) == list(want["values"])
    for cl in comp.clauses:
        assert cl.json_fn(*args) == json_leaves(cl.leaves, *args)
        assert list(cl.json_fn(*args)) == list(json_leaves(cl.leaves, *args))
    assert comp.all_json_fn(*args) == json_leaves(comp.all_leaves, *args)


def test_a_value_that_raises_is_shown_as_its_error_not_raised():
    """A leaf whose reading raises (a feature function's error) makes judge raise; json_values says which."""
    def bad(_ctx):
        raise ValueError("no model")

    c = ctx(features={"score": bad})
    comp = compile_expression("alert.mag > 30 or feature.score > 1", ["score"])
    with pytest.raises(ValueError):
        comp.judge(*c.args())
    with pytest.raises(ValueError):
        comp.first_false(*c.args())
    ok = compile_expression("alert.mag > 30 and feature.score > 1", ["score"])
    assert ok.judge(*c.args())[4:] == (17.5,)  # the first clause decides: the feature is never read
    vals = ok.json_values(0, *c.args())
    assert vals == {"alert.mag": 17.5}
    # The clause is false without reading the feature (and short-circuits), but its values read it:
    # the engine's verdict is still "not fired", the feature's error shown as that value.
    from types import SimpleNamespace

    from tomd.rules.engine import RuleEngine
    from tomd.rules.load import Rule

    shy = compile_expression("alert.mag < 30 and (alert.mag > 30 and feature.score > 1)", ["score"])
    with pytest.raises(ValueError):
        shy.judge(*c.args())
    rule = Rule(name="shy", when=shy, add_tags=("x",))
    buffered: list = []
    v = RuleEngine([rule]).decide(None, rule, SimpleNamespace(alert_id=1, target_id=2), c, NOW, None, buffered)
    assert (v.outcome, v.reason) == ("not_fired", "alert.mag > 30 and feature.score > 1 is false")
    assert v.details == {"clause": 1, "values": {"alert.mag": 17.5, "feature.score": "<ValueError: no model>"},
                         "line": 1}
    assert len(buffered) == 1 and buffered[0][:5] == (1, 2, "shy", "", "not_fired")


def test_target_features_become_plain_attributes_at_their_first_read():
    """TargetView computes the light curve at the first feature read and sets every feature at once;
    photometry rows (tuples) become Points on first use."""
    rows = [(60000.0, "ztfg", "detection", 19.0, None), (60001.0, "ztfg", "detection", 18.0, None),
            (60001.5, "ztfr", "upper_limit", None, 20.5)]
    t = TargetView({"id": 1}, points=rows, now_mjd=60003.0)
    assert "age_days" not in vars(t)
    assert t.age_days == pytest.approx(3.0)
    want = lightcurve_features([Point(*r) for r in rows], 60003.0)
    assert {k: vars(t)[k] for k in want} == want  # all set by the first read
    assert t.rise_rates["g"] == pytest.approx(1.0) and t.n_upper_limits == 1
    assert all(type(p) is Point for p in t.points) and t.points[0].band == "ztfg"
    with pytest.raises(AttributeError):
        t.no_such_feature  # noqa: B018
    assert not hasattr(t, "no_such_feature")
