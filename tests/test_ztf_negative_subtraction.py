"""ZTF negative subtractions (isdiffpos 'f'/'0'): a fading source, not a bright one.

``magpsf`` is the magnitude of |difference flux|. With ``isdiffpos`` 'f' the
source is fainter than in the reference image, so the point keeps its flux
with a minus sign and has no magnitude, in the ZTF parser and in every
broker format that relays ZTF points; ``fields.magpsf`` and the payload keep
ZTF's numbers. Checked on the real packets in ../shared/data, and through the
rules: a negative subtraction neither passes ``alert.mag < 20`` nor sets
``target.peak_mag``.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from datetime import timedelta

import fastavro
import pytest
from sqlalchemy import select

from tests.conftest import SHARED_DATA
from tomd.alerts.model import payload_dict
from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
from tomd.alerts.parse import parse_message
from tomd.db import repository as repo
from tomd.db.models import Photometry
from tomd.rules.engine import RuleEngine, RuleSet
from tomd.rules.load import RuleEnv, parse_rule

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"sample data not found at {SHARED_DATA}")

NEGATIVE = ("f", "0")
# A real variable (ZTF17aaacxxf, ZTF's own sample of 2019-01-10): three positive
# g detections near 19.0-19.3, then 19 negative subtractions ('f', one '0')
# whose magpsf (15.26-18.31) is the size of its fading below the reference,
# and the trigger too (r, isdiffpos 'f', magpsf 15.37). Read as magnitudes they made it a 15th-mag
# transient that brightened by 4 mag in a month.
VARIABLE = "ztf/ztf-avro-alert/2019_01_10_739260766315010006.avro"
# A real positive subtraction (ZTF19acxxwrs, isdiffpos 't', magpsf 17.79, drb 1.0).
POSITIVE = "ztf/fink-client/ZTF19acxxwrs.avro"
# Fink's output, ZTF packets inside: ZTF18aabjigr's trigger is 'f' (16.15), its history 't' (16.47-17.47).
FINK = "other/fink/ztf/avro_multi_alerts.avro"


def _records(rel: str) -> list[dict]:
    with open(SHARED_DATA / rel, "rb") as fh:
        return list(fastavro.reader(fh))


def _nJy(mag: float) -> float:
    return 10 ** (-0.4 * (mag - 31.4))  # AB: 31.4 mag is 1 nJy


def _ztf_packets() -> list[str]:
    return sorted(str(p.relative_to(SHARED_DATA)) for p in (SHARED_DATA / "ztf").rglob("*.avro"))


def _check_point(p, row: dict, where: str) -> None:
    """One parsed detection against ZTF's row (candidate or prv_candidate)."""
    negative = str(row["isdiffpos"]).lower() in NEGATIVE
    assert p.kind == "detection", where
    if negative:
        assert p.mag is None and p.mag_err is None, where
        assert p.flux == pytest.approx(-_nJy(row["magpsf"]), rel=1e-9) and p.flux < 0, where
    else:
        assert p.mag == pytest.approx(row["magpsf"]) and p.mag_err == pytest.approx(row["sigmapsf"]), where
        assert p.flux == pytest.approx(_nJy(row["magpsf"]), rel=1e-9), where
    # |flux| error from the magnitude error either way.
    assert p.flux_err == pytest.approx(abs(p.flux) * row["sigmapsf"] * math.log(10) / 2.5, rel=1e-9), where


def test_every_shared_ztf_packet_negative_points_have_flux_below_zero_and_no_mag() -> None:
    n_neg = n_pos = 0
    for rel in _ztf_packets():
        records = _records(rel)
        alerts = parse_message("ztf-avro", (SHARED_DATA / rel).read_bytes())
        for rec, a in zip(records, alerts, strict=True):
            cand = rec["candidate"]
            _check_point(a.photometry[0], cand, f"{rel} candidate")
            assert (a.mag, a.mag_err, a.flux, a.flux_err) == (
                a.photometry[0].mag, a.photometry[0].mag_err, a.photometry[0].flux, a.photometry[0].flux_err)
            # The survey's numbers stay readable.
            assert a.fields["magpsf"] == pytest.approx(cand["magpsf"])
            assert a.fields["sigmapsf"] == pytest.approx(cand["sigmapsf"])
            assert a.fields["isdiffpos"] is (str(cand["isdiffpos"]).lower() not in NEGATIVE)
            assert payload_dict(a.payload)["candidate"]["isdiffpos"] == cand["isdiffpos"]
            assert payload_dict(a.payload)["candidate"]["magpsf"] == pytest.approx(cand["magpsf"])
            by_id = {p.measurement_id: p for p in a.photometry if p.kind == "detection"}
            for i, row in enumerate(rec.get("prv_candidates") or ()):
                if row.get("candid") is None or row.get("magpsf") is None:
                    continue
                _check_point(by_id[str(row["candid"])], row, f"{rel} prv_candidates[{i}]")
                if str(row["isdiffpos"]).lower() in NEGATIVE:
                    n_neg += 1
                else:
                    n_pos += 1
            if str(cand["isdiffpos"]).lower() in NEGATIVE:
                n_neg += 1
            else:
                n_pos += 1
    assert n_neg > 50 and n_pos > 20, (n_neg, n_pos)  # both kinds are in the samples


def test_shipped_demo_packets_negative_ones_have_no_magnitude() -> None:
    """The packets `make demo` publishes: those with isdiffpos 'f' have no alert.mag."""
    from importlib import resources

    d = resources.files("tomd.data").joinpath("alerts").joinpath("ztf")
    seen = {"f": 0, "t": 0}
    for p in sorted(d.iterdir(), key=lambda p: p.name):
        if not p.name.endswith(".avro"):
            continue
        (rec,) = fastavro.reader(io.BytesIO(p.read_bytes()))
        (a,) = parse_message("ztf-avro", p.read_bytes())
        negative = rec["candidate"]["isdiffpos"] in NEGATIVE
        seen["f" if negative else "t"] += 1
        assert (a.mag is None and a.flux < 0) if negative else (a.mag == pytest.approx(rec["candidate"]["magpsf"]))
    assert seen["f"] >= 14 and seen["t"] >= 1, seen  # the demo has positive subtractions to fire on


def test_variable_star_light_curve_keeps_only_its_positive_detections() -> None:
    from tomd.rules.context import Point, color, lightcurve_features, mjd_of

    (rec,) = _records(VARIABLE)
    (a,) = parse_message("ztf-avro", (SHARED_DATA / VARIABLE).read_bytes())
    assert a.mag is None and a.flux == pytest.approx(-_nJy(rec["candidate"]["magpsf"]))
    points = [Point(p.mjd, p.band, p.kind, p.mag, p.limit) for p in a.photometry]
    f = lightcurve_features(points, mjd_of(a.time))
    positive = [p for p in rec["prv_candidates"] if p["isdiffpos"] == "t"]
    assert f["n_detections"] == len(positive) == 3
    assert f["peak_mag"] == pytest.approx(min(p["magpsf"] for p in positive))  # 19.03 (g), not 15.26
    assert f["peak_band"] == "ztfg" and "ztfr" not in f["peak_mags"]
    assert color(points, "g", "r", max_dt_days=30) is None  # no r magnitude to pair with


def _rule(text: str):
    r, problems = parse_rule(text, "r.toml", RuleEnv())
    assert not problems, problems
    return r


def _ingest_with_rules(db, fmt: str, data: bytes, rules: list) -> dict[str, str]:
    eng = RuleEngine(RuleSet.of(rules), clock=lambda stored: stored.alert.time + timedelta(minutes=5))
    ing = Ingestor(db.sessions, IngestSettings(stream="s", format=fmt),
                   lambda b: parse_message(fmt, b), sinks=[eng])
    assert ing.handle([FileMessage("f", 0, data)]).dead_letters == 0
    with db.sessions() as s:
        return {d.rule: d.outcome for d in repo.all_verdicts(s)}


RULES = {
    "bright": 'name = "bright"\nwhen = "alert.mag < 20"\nadd_tags = ["b"]',
    "peak": 'name = "peak"\nwhen = "target.peak_mag < 18"\nadd_tags = ["p"]',
    "faint-peak": 'name = "faint-peak"\nwhen = "target.peak_mag > 19"\nadd_tags = ["q"]',
    "no-peak": 'name = "no-peak"\nwhen = "not known(target.peak_mag)"\nadd_tags = ["n"]',
    "survey": 'name = "survey"\nwhen = "alert.fields.magpsf < 20 and alert.flux < 0"\nadd_tags = ["s"]',
}


def test_rules_negative_subtraction_is_not_bright_and_sets_no_peak(db) -> None:
    """ZTF's own packet of a fading variable: `alert.mag < 20` is false, and the peak is its
    faintish positive detections' (19.03), not the 15th-mag |difference| of its fading."""
    data = (SHARED_DATA / VARIABLE).read_bytes()
    got = _ingest_with_rules(db, "ztf-avro", data, [_rule(t) for t in RULES.values()])
    assert got == {"bright": "not_fired", "peak": "not_fired", "faint-peak": "fired", "no-peak": "not_fired",
                   "survey": "fired"}
    with db.sessions() as s:
        rows = s.execute(select(Photometry.kind, Photometry.mag, Photometry.flux, Photometry.dedupe)
                         .where(Photometry.kind == "detection")).all()
    (rec,) = _records(VARIABLE)
    n_neg = 1 + sum(p["isdiffpos"] in NEGATIVE for p in rec["prv_candidates"] if p.get("candid") is not None)
    neg = [r for r in rows if r.flux < 0]
    assert len(neg) == n_neg == 20 and all(r.mag is None for r in neg)  # stored with mag NULL
    assert len(rows) == n_neg + 3
    # The dedupe key is survey|band|kind|mjd as before: a negative point is still a "detection".
    jd = rec["candidate"]["jd"]
    assert f"ztf|ztfr|detection|{jd - 2400000.5:.6f}" in {r.dedupe for r in rows}


def test_rules_alert_with_only_negative_photometry_has_no_peak(db) -> None:
    """A packet whose every detection is negative (the shipped pittgoogle 4.02 one): no peak at all."""
    data = (SHARED_DATA / "ztf/pittgoogle/ztf_20250302_programid1_ZTF17aaarzyp_2982177112815010003.v4_02.avro"
            ).read_bytes()
    got = _ingest_with_rules(db, "ztf-avro", data, [_rule(t) for t in RULES.values()])
    assert got == {"bright": "not_fired", "peak": "not_fired", "faint-peak": "not_fired", "no-peak": "fired",
                   "survey": "fired"}


def test_rules_positive_subtraction_still_fires(db) -> None:
    data = (SHARED_DATA / POSITIVE).read_bytes()
    got = _ingest_with_rules(db, "ztf-avro", data, [_rule(t) for t in RULES.values()])
    assert got["bright"] == "fired" and got["peak"] == "fired" and got["no-peak"] == "not_fired"
    assert got["survey"] == "not_fired"  # a positive flux


def test_fink_relays_negative_subtractions_as_ztf_gives_them() -> None:
    records = _records(FINK)
    alerts = parse_message("fink-avro", (SHARED_DATA / FINK).read_bytes())
    rec, a = next((r, a) for r, a in zip(records, alerts) if r["objectId"] == "ZTF18aabjigr")
    assert rec["candidate"]["isdiffpos"] == "f"
    assert a.mag is None and a.flux == pytest.approx(-_nJy(rec["candidate"]["magpsf"]))
    assert a.fields["magpsf"] == pytest.approx(rec["candidate"]["magpsf"]) and a.fields["broker"] == "fink"
    for r, al in zip(records, alerts):
        _check_point(al.photometry[0], r["candidate"], r["objectId"])


def _fink_api_row(cand: dict, object_id: str, isdiffpos: str) -> dict:
    return {"i:candid": cand["candid"], "i:objectId": object_id, "i:ra": cand["ra"], "i:dec": cand["dec"],
            "i:jd": cand["jd"], "i:fid": cand["fid"], "i:magpsf": cand["magpsf"], "i:sigmapsf": cand["sigmapsf"],
            "i:isdiffpos": isdiffpos, "i:drb": cand.get("drb")}


def test_fink_api_row_negative_subtraction() -> None:
    (rec,) = _records(VARIABLE)
    cand = rec["candidate"]
    (neg,) = parse_message("fink-api", json.dumps(_fink_api_row(cand, rec["objectId"], "f")).encode())
    (pos,) = parse_message("fink-api", json.dumps(_fink_api_row(cand, rec["objectId"], "t")).encode())
    assert neg.mag is None and neg.mag_err is None and neg.flux == pytest.approx(-_nJy(cand["magpsf"]))
    assert neg.photometry[0].mag is None and neg.photometry[0].flux == neg.flux
    assert neg.fields["magpsf"] == pytest.approx(cand["magpsf"])
    assert pos.mag == pytest.approx(cand["magpsf"]) and pos.flux == pytest.approx(-neg.flux)


def test_alerce_light_curve_isdiffpos_minus_one() -> None:
    """ALeRCE's detections say the sign as 1 / -1; here ZTF17aaacxxf's real light curve."""
    (rec,) = _records(VARIABLE)
    rows = [p for p in rec["prv_candidates"] if p.get("candid") is not None] + [rec["candidate"]]
    det = [{"candid": p["candid"], "mjd": p["jd"] - 2400000.5, "fid": p["fid"], "magpsf": p["magpsf"],
            "sigmapsf": p["sigmapsf"], "isdiffpos": 1 if p["isdiffpos"] == "t" else -1,
            "diffmaglim": p["diffmaglim"]} for p in rows]
    c = rec["candidate"]
    obj = {"oid": rec["objectId"], "meanra": c["ra"], "meandec": c["dec"], "lastmjd": c["jd"] - 2400000.5}
    (a,) = parse_message("alerce-api", json.dumps({"object": obj, "detections": det}).encode())
    for p, row in zip(a.photometry, rows, strict=True):
        _check_point(p, row, str(row["candid"]))
    assert a.mag is None and a.flux < 0  # the latest detection is the negative trigger
    assert sum(p.mag is not None for p in a.photometry) == 3


def _antares_message(rows: list[dict], object_id: str, ra: float, dec: float) -> bytes:
    import bson

    included = [{"type": "alert", "id": f"ztf_candidate:{p['candid']}",
                 "attributes": {"mjd": p["jd"] - 2400000.5, "properties": {
                     "ant_mag": p["magpsf"], "ant_magerr": p["sigmapsf"], "ant_passband": "gRi"[p["fid"] - 1],
                     "ztf_isdiffpos": p["isdiffpos"], "ztf_candid": p["candid"]}}} for p in rows]
    newest = rows[-1]
    doc = {"data": {"type": "locus", "id": "ANT2019aaaaaa", "attributes": {
        "ra": ra, "dec": dec, "tags": [], "catalogs": [],
        "properties": {"newest_alert_id": f"ztf_candidate:{newest['candid']}",
                       "newest_alert_observation_time": newest["jd"] - 2400000.5,
                       "newest_alert_magnitude": newest["magpsf"], "ztf_object_id": object_id}}},
        "included": included}
    return zlib.compress(bson.encode(doc))


def test_antares_ztf_isdiffpos_f() -> None:
    (rec,) = _records(VARIABLE)
    rows = [p for p in rec["prv_candidates"] if p.get("candid") is not None] + [rec["candidate"]]
    c = rec["candidate"]
    (a,) = parse_message("antares", _antares_message(rows, rec["objectId"], c["ra"], c["dec"]))
    assert a.source == "antares" and a.key == f"ztf_candidate:{c['candid']}"
    for p, row in zip(a.photometry, rows, strict=True):
        _check_point(p, row, str(row["candid"]))
    assert a.mag is None and a.mag_err is None and a.flux == pytest.approx(-_nJy(c["magpsf"]))
    assert a.band == "ztfr"
