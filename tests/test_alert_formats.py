"""Every shared real/official sample packet → Alerts, checked for sense.

The samples live in ``shared/data`` beside the repository (see its README);
the tests skip when it is absent. Astronomy is checked against astropy.
"""

from __future__ import annotations

import io
import json
import math
import re
import sqlite3
import struct
from datetime import timezone
from pathlib import Path

import fastavro
import pytest
from astropy.time import Time

from tomd.alerts.model import payload_dict
from tomd.alerts import decode
from tomd.alerts.formats import rubin
from tomd.alerts.formats._tns import tns_designation
from tomd.alerts.parse import parse_message
from tomd.errors import ParseError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"sample data not found at {DATA}")

# Which format each sample folder is, as a stream would be configured.
SKIP_SUFFIXES = {".md", ".txt", ".avsc"}


def _format_for(rel: str) -> str | None:
    if rel.endswith(".schema.json") or "avro_schema_ftransfer" in rel:
        return None
    if rel.startswith("ztf/"):
        return "ztf-avro"
    if rel.startswith("other/fink/") or rel.startswith("lsst/fink-broker"):
        return "fink-avro"
    if rel.startswith("lsst/pittgoogle-confluent-wire/"):
        return "rubin-avro"
    if rel.startswith("other/lasair/"):
        return "lasair-json"
    if rel.endswith(".xml"):
        return "gcn-voevent"
    if rel.startswith("lvk/"):
        return "lvk-avro" if rel.endswith(".avro") else "lvk-json"
    if rel.endswith(".bin"):
        return "gcn-binary"
    if rel.startswith("gcn/") and rel.endswith(".json"):
        return "gcn-json"
    return None


def _samples() -> list[tuple[str, str]]:
    if not DATA.is_dir():
        return []
    out = []
    for p in sorted(DATA.rglob("*")):
        if not p.is_file() or p.suffix in SKIP_SUFFIXES:
            continue
        rel = p.relative_to(DATA).as_posix()
        fmt = _format_for(rel)
        if fmt:
            out.append((rel, fmt))
    return out


SAMPLES = _samples()
# Official examples that are not notices, or carry deliberately unusable values.
EXPECTED_ERRORS = {
    # gcn-schema "core" fragments: parts of a notice, no time at all.
    **{rel: "trigger_time" for rel, _ in SAMPLES if "/notices/core/" in rel},
    # lsst-alert-packet's v7 sample values put 1480360995.0 in midpointMjdTai.
    **{rel: "midpointMjdTai" for rel, _ in SAMPLES if "lsst.v7_" in rel},
}
YEARS = {  # plausible year range of each source's sample times
    "ztf": (2018, 2027), "fink": (2019, 2027), "rubin": (2024, 2027), "lasair": (2025, 2027),
    "gcn": (2010, 2027), "lvk": (2018, 2027),
}
BAND_PREFIX = {"ztf": "ztf", "rubin": "lsst", "lasair": "lsst"}


def _parse(rel: str, fmt: str, **kw):
    return parse_message(fmt, (DATA / rel).read_bytes(), include_test=True, **kw)


def _no_nan(*values) -> bool:
    return all(v is None or (isinstance(v, float) and math.isfinite(v)) or isinstance(v, int) for v in values)


@pytest.mark.parametrize(("rel", "fmt"), SAMPLES, ids=[r for r, _ in SAMPLES])
def test_every_sample_parses_sensibly(rel: str, fmt: str) -> None:
    if rel in EXPECTED_ERRORS:
        with pytest.raises(ParseError, match=EXPECTED_ERRORS[rel]):
            _parse(rel, fmt)
        return
    alerts = _parse(rel, fmt)
    if fmt == "gcn-binary" and not alerts:
        # Only non-event packet types (pointing, light curves, images) give nothing.
        words = struct.unpack(">40i", (DATA / rel).read_bytes())
        from tomd.alerts.formats.gcn_binary import TYPES

        assert TYPES[words[0]].mode == "ignore", rel
        return
    assert alerts, rel
    keys = [a.key for a in alerts]
    assert len(set(keys)) == len(keys), "keys must be unique within a message"
    for a in alerts:
        assert a.time.tzinfo is not None and a.time.utcoffset().total_seconds() == 0
        lo, hi = YEARS[a.source]
        assert lo <= a.time.year <= hi, (a.source, a.time)
        assert _no_nan(a.ra, a.dec, a.mag, a.mag_err, a.flux, a.flux_err)
        if a.ra is not None:
            assert 0.0 <= a.ra < 360.0 and -90.0 <= a.dec <= 90.0
        else:
            assert a.dec is None
        assert a.key and isinstance(a.key, str)
        if a.kind in ("transient", "solar_system") and a.source != "gcn":
            assert a.ra is not None
            # A known solar-system source may have no diaObject; a transient always has an id.
            assert a.object_id or a.kind == "solar_system"
        survey = a.fields.get("survey", a.source)
        prefix = BAND_PREFIX.get(survey)
        for p in a.photometry:
            assert _no_nan(p.mag, p.mag_err, p.flux, p.flux_err, p.limit, p.mjd)
            assert 40000 < p.mjd < 70000
            if prefix:
                assert p.band.startswith(prefix), p.band
            if p.kind == "upper_limit":
                assert p.limit is not None and p.mag is None and p.flux is None
            elif p.kind == "detection":
                assert p.mag is not None or p.flux is not None
        assert not any(isinstance(v, (bytes, bytearray)) for v in payload_dict(a.payload).values())
        json.dumps(payload_dict(a.payload), allow_nan=False)  # payload is storable as JSON


@pytest.mark.parametrize(("rel", "fmt"), [s for s in SAMPLES if s[0] not in EXPECTED_ERRORS],
                         ids=[r for r, _ in SAMPLES if r not in EXPECTED_ERRORS])
def test_auto_agrees_with_configured_format(rel: str, fmt: str) -> None:
    explicit = _parse(rel, fmt)
    auto = _parse(rel, "auto")
    assert [a.key for a in auto] == [a.key for a in explicit]
    assert [a.time for a in auto] == [a.time for a in explicit]


def _ztf_samples() -> list[str]:
    return [r for r, f in SAMPLES if f == "ztf-avro"]


@pytest.mark.parametrize(("rel", "fmt"), [s for s in SAMPLES if s[1] in ("ztf-avro", "rubin-avro", "fink-avro")
                                           and s[0] not in EXPECTED_ERRORS],
                         ids=[r for r, f in SAMPLES if f in ("ztf-avro", "rubin-avro", "fink-avro")
                              and r not in EXPECTED_ERRORS])
def test_packet_json_is_what_clean_makes_of_the_packet(rel: str, fmt: str) -> None:
    """ZTF and Rubin payloads are written as JSON in one pass (formats.ztf.packet_json), not
    cleaned value by value: the JSON must read back as exactly what ``clean`` gives, NaNs as null."""
    from tomd.alerts.formats import FORMATS, NO_CONTEXT
    from tomd.alerts.formats.ztf import clean, packet_json

    records = FORMATS[fmt].decode((DATA / rel).read_bytes(), NO_CONTEXT)
    assert records
    for rec in records:
        drop = {k for k in rec if k.startswith("cutout")}
        expected = {k: clean(v) for k, v in rec.items() if k not in drop}
        got = payload_dict(packet_json(rec, drop))
        assert got == expected
        # NaN compares unequal to itself, so the comparison above would fail on one left in:
        json.dumps(got, allow_nan=False)


def test_keys_unique_across_each_sample_set() -> None:
    by_source: dict[str, list[str]] = {}
    for rel, fmt in SAMPLES:
        if rel in EXPECTED_ERRORS or fmt in ("gcn-json", "gcn-voevent", "gcn-binary"):
            continue
        if "lvk/" in rel or "confluent-wire" in rel:
            continue  # the same notice/sample values in several framings or schema versions
        for a in _parse(rel, fmt):
            by_source.setdefault(a.source, []).append(a.key)
    for source, keys in by_source.items():
        assert len(keys) == len(set(keys)), source
    gcn = [a.key for rel, fmt in SAMPLES if fmt == "gcn-json" and rel not in EXPECTED_ERRORS
           for a in _parse(rel, fmt)]
    assert len(gcn) == len(set(gcn))


# --- ZTF -------------------------------------------------------------------------

@pytest.mark.parametrize("rel", _ztf_samples())
def test_ztf_time_photometry_and_cutouts(rel: str) -> None:
    data = (DATA / rel).read_bytes()
    records = list(fastavro.reader(io.BytesIO(data)))
    alerts = parse_message("ztf-avro", data)
    assert len(alerts) == len(records)
    for rec, a in zip(records, alerts):
        cand = rec["candidate"]
        assert a.key == str(rec["candid"]) and a.object_id == rec["objectId"]
        expected = Time(cand["jd"], format="jd", scale="utc").to_datetime(timezone.utc)
        assert abs((a.time - expected).total_seconds()) < 1e-3
        assert a.band == {1: "ztfg", 2: "ztfr", 3: "ztfi"}[cand["fid"]]
        assert a.fields["rb"] == pytest.approx(cand["rb"]) and a.fields["magpsf"] == pytest.approx(cand["magpsf"])
        if cand["isdiffpos"] in ("f", "0"):  # a negative subtraction: fainter than the reference, no magnitude
            assert a.mag is None and a.flux < 0
        else:
            assert a.mag == pytest.approx(cand["magpsf"]) and a.flux > 0
        prv = rec.get("prv_candidates") or []
        forced_rows = [p for p in prv if "forcediffimflux" in p]
        det = [p for p in prv if p.get("candid") is not None and p.get("magpsf") is not None]
        ul = [p for p in prv if p not in forced_rows and p.get("magpsf") is None and p.get("diffmaglim") is not None]
        fp = [f for f in (rec.get("fp_hists") or []) if f.get("forcediffimflux") not in (None, -99999.0)]
        kinds = [p.kind for p in a.photometry]
        assert kinds.count("detection") == 1 + len(det)
        assert kinds.count("upper_limit") == len(ul)
        assert kinds.count("forced") == len(fp) + sum(
            1 for f in forced_rows if f.get("forcediffimflux") not in (None, -99999.0))
        assert a.photometry[0].measurement_id == str(rec["candid"])
        assert set(a.cutouts) == {"science", "template", "difference"}
        assert all(c[:2] == b"\x1f\x8b" for c in a.cutouts.values())  # gzipped FITS stamps
        assert not any(k.startswith("cutout") for k in payload_dict(a.payload))
        assert payload_dict(a.payload)["candidate"]["candid"] == rec["candid"]


def test_ztf_upper_limits_present_in_samples() -> None:
    n = sum(p.kind == "upper_limit" for rel in _ztf_samples()
            for a in parse_message("ztf-avro", (DATA / rel).read_bytes()) for p in a.photometry)
    assert n > 10


def test_ztf_forced_photometry_flux_in_njy_and_negative_kept() -> None:
    rel = next(r for r in _ztf_samples() if "v4_02" in r)
    data = (DATA / rel).read_bytes()
    rec = next(iter(fastavro.reader(io.BytesIO(data))))
    (a,) = parse_message("ztf-avro", data)
    forced = [p for p in a.photometry if p.kind == "forced"]
    rows = [f for f in rec["fp_hists"] if f["forcediffimflux"] not in (None, -99999.0)]
    assert len(forced) == len(rows) > 0
    for p, f in zip(forced, rows):
        assert p.flux == pytest.approx(f["forcediffimflux"] * 10 ** (-0.4 * (f["magzpsci"] - 31.4)))
        assert p.mjd == pytest.approx(f["jd"] - 2400000.5)
        if p.flux <= 0:
            assert p.mag is None
        else:
            assert p.mag == pytest.approx(31.4 - 2.5 * math.log10(p.flux))
    assert any(p.flux < 0 for p in forced), "negative difference fluxes are kept"


def test_ztf_35_forced_history_rows_become_forced_points() -> None:
    data = (DATA / "ztf/ztf-avro-alert/1661382530015060001.avro").read_bytes()
    (a,) = parse_message("ztf-avro", data)
    assert sum(p.kind == "forced" for p in a.photometry) > 10


# ZTF writes -999 for "no counterpart" in its cross-match fields; these real
# packets carry it (sgscore2/distpsnr2: no second PS1 source within 30";
# neargaia/maggaia: no Gaia source within 90").
NO_PS2 = "ztf/fink-broker-local/1095578115915015025.avro"
NO_GAIA = "ztf/fink-broker-local/1095578116315015000.avro"


def _rule_passes(text: str, alert) -> bool:
    from tomd.rules.context import AlertView, Context, TargetView, mjd_of
    from tomd.rules.expr import compile_expression

    now = mjd_of(alert.time)
    c = Context(AlertView(alert, 1), TargetView(None, now_mjd=now), now)
    return compile_expression(text).first_false(*c.args()) == -1


def test_ztf_no_match_placeholders_are_unknown_in_fields_raw_in_payload() -> None:
    (rec,) = fastavro.reader(io.BytesIO((DATA / NO_PS2).read_bytes()))
    (a,) = parse_message("ztf-avro", (DATA / NO_PS2).read_bytes())
    cand = rec["candidate"]
    assert cand["sgscore2"] == cand["distpsnr2"] == cand["neargaiabright"] == cand["ssdistnr"] == -999.0
    for name in ("sgscore2", "distpsnr2", "neargaiabright", "maggaiabright", "ssdistnr", "ssmagnr"):
        assert a.fields[name] is None, name
        assert payload_dict(a.payload)["candidate"][name] == -999.0, name  # the survey's value, as sent
    # Real matches are kept as they are.
    assert a.fields["sgscore1"] == pytest.approx(cand["sgscore1"]) and 0 <= a.fields["sgscore1"] <= 1
    assert a.fields["distpsnr1"] == pytest.approx(cand["distpsnr1"]) and a.fields["distpsnr1"] > 0
    assert a.fields["neargaia"] == pytest.approx(cand["neargaia"]) and a.fields["neargaia"] > 0
    (g,) = parse_message("ztf-avro", (DATA / NO_GAIA).read_bytes())
    assert payload_dict(g.payload)["candidate"]["neargaia"] == payload_dict(g.payload)["candidate"]["maggaia"] == -999.0
    assert g.fields["neargaia"] is None and g.fields["maggaia"] is None
    # In every shared ZTF packet: no field left at a placeholder, none made None that was real.
    from tomd.alerts.formats.ztf import NO_MATCH_FIELDS

    for rel in _ztf_samples():
        for a in parse_message("ztf-avro", (DATA / rel).read_bytes()):
            for name in NO_MATCH_FIELDS & payload_dict(a.payload)["candidate"].keys():
                raw = payload_dict(a.payload)["candidate"][name]
                assert a.fields[name] == (None if raw in (-999, -99) else raw), (rel, name)


def test_ztf_rule_on_a_missing_ps1_match_is_false() -> None:
    """`alert.fields.sgscore1 < 0.5` ("near a PS1 galaxy") must not pass for "no PS1 source"."""
    data = (DATA / NO_PS2).read_bytes()
    (a,) = parse_message("ztf-avro", data)
    assert _rule_passes("alert.fields.sgscore1 < 0.5", a)  # its real closest source: 0.006
    assert not _rule_passes("alert.fields.sgscore2 < 0.5", a)  # -999: no second source
    assert not _rule_passes("alert.fields.distpsnr2 < 2", a)
    assert _rule_passes("not known(alert.fields.sgscore2)", a)
    assert _rule_passes("alert.payload.candidate.sgscore2 == -999", a)  # the raw value stays readable

    # The same packet with no PS1 source at all (sgscore1/distpsnr1 -999 as ZTF
    # writes them), written with the packet's own schema.
    with io.BytesIO(data) as fh:
        reader = fastavro.reader(fh)
        schema, (rec,) = reader.writer_schema, list(reader)
    rec["candidate"].update(sgscore1=-999.0, distpsnr1=-999.0, objectidps1=-999)
    out = io.BytesIO()
    fastavro.writer(out, schema, [rec])
    (b,) = parse_message("ztf-avro", out.getvalue())
    assert payload_dict(b.payload)["candidate"]["sgscore1"] == -999.0 and b.fields["sgscore1"] is None
    assert not _rule_passes("alert.fields.sgscore1 < 0.5", b)
    assert not _rule_passes("alert.fields.sgscore1 < 0.5 and alert.fields.distpsnr1 < 1", b)
    assert _rule_passes("alert.fields.sgscore1 < 0.5 or alert.mag < 30", b)


# --- Rubin ---------------------------------------------------------------------------

def _confluent(version: str) -> bytes:
    return (DATA / f"lsst/pittgoogle-confluent-wire/lsst.v{version}.avro").read_bytes()


@pytest.mark.parametrize("version", ["8_0", "9_0", "10_0", "11_0", "11_1"])
def test_rubin_tai_to_utc_is_37_s_per_astropy(version: str) -> None:
    data = _confluent(version)
    (rec,) = decode.decode_confluent(data)
    (a,) = parse_message("rubin-avro", data)
    mjd_tai = rec["diaSource"]["midpointMjdTai"]
    t = Time(mjd_tai, format="mjd", scale="tai")
    assert abs((a.time - t.utc.to_datetime(timezone.utc)).total_seconds()) < 1e-3
    naive_tai = Time(mjd_tai, format="mjd", scale="utc").to_datetime(timezone.utc)  # TAI digits read as UTC
    assert (naive_tai - a.time).total_seconds() == pytest.approx(37.0, abs=1e-3)
    assert a.key == str(rec["diaSource"]["diaSourceId"])
    assert a.object_id == str(rec["diaSource"]["diaObjectId"] or rec["diaObject"]["diaObjectId"])
    assert a.band == "lsst" + rec["diaSource"]["band"]
    assert a.flux == pytest.approx(rec["diaSource"]["psfFlux"])
    assert a.fields["real_bogus"] == pytest.approx(rec["diaSource"]["reliability"])
    n_prv = len(rec.get("prvDiaSources") or [])
    n_forced = len(rec.get("prvDiaForcedSources") or [])
    kinds = [p.kind for p in a.photometry]
    assert kinds.count("forced") == n_forced
    assert kinds.count("detection") <= 1 + n_prv
    for p in a.photometry:
        assert abs(p.mjd - Time(p.mjd, format="mjd", scale="utc").mjd) < 1e-9


@pytest.mark.parametrize("version", ["7_0", "7_1", "7_2", "7_3", "7_4"])
def test_rubin_v7_parses_once_the_sample_time_is_real(version: str) -> None:
    (rec,) = decode.decode_confluent(_confluent(version))
    rec["diaSource"]["midpointMjdTai"] = 60500.25
    for row in rec.get("prvDiaSources") or []:
        row["midpointMjdTai"] = 60490.1
    for row in rec.get("prvDiaForcedSources") or []:
        row["midpointMjdTai"] = 60480.1
    (a,) = rubin.parse(rec)
    assert a.key == str(rec["diaSource"]["diaSourceId"])
    assert a.time.year == 2024 and a.band and a.band.startswith("lsst")


def test_rubin_negative_flux_is_kept_without_magnitude() -> None:
    (rec,) = decode.decode_confluent(_confluent("11_1"))
    rec["diaSource"]["psfFlux"] = -1234.5
    (a,) = rubin.parse(rec)
    assert a.flux == -1234.5 and a.mag is None
    assert a.photometry[0].flux == -1234.5 and a.photometry[0].mag is None


def test_rubin_solar_system_source_kind() -> None:
    hits = [a for rel, fmt in SAMPLES if rel.startswith("lsst/fink-broker")
            for a in _parse(rel, fmt) if a.kind == "solar_system"]
    assert hits and all(a.fields.get("ssObjectId") for a in hits)


def test_rubin_container_written_by_broker() -> None:
    rel = next(r for r, _ in SAMPLES if r.startswith("lsst/fink-broker"))
    (a,) = _parse(rel, "rubin-avro-file")
    (f,) = _parse(rel, "fink-avro")
    assert a.source == "rubin" and f.source == "fink" and a.key == f.key
    assert "brokerIngestMjd" in f.fields and f.fields["survey"] == "rubin"
    assert set(a.cutouts) == {"science", "template", "difference"}
    # Rubin's points relayed by Fink are Rubin's: the same points, the same source.
    assert f.photometry == a.photometry and {p.source for p in f.photometry} == {"rubin"}


# --- Fink ---------------------------------------------------------------------------

@pytest.mark.parametrize("rel", ["other/fink/ztf/part-3-305711.avro", "other/fink/ztf/avro_multi_alerts.avro"])
def test_fink_columns_land_in_fields(rel: str) -> None:
    data = (DATA / rel).read_bytes()
    alerts = parse_message("fink-avro", data)
    assert len(alerts) == len(list(fastavro.reader(io.BytesIO(data))))
    for a in alerts:
        assert a.source == "fink" and a.fields["survey"] == "ztf"
        assert "cdsxmatch" in a.fields
        assert a.band in ("ztfg", "ztfr", "ztfi")
    if "part-3" in rel:
        assert all("finkclass" in a.fields for a in alerts)


FINK_ZTF = ["other/fink/ztf/part-3-305711.avro", "other/fink/ztf/avro_multi_alerts.avro"]
ZTF_ID = re.compile(r"^ZTF\d\d[a-z]{7}$")


def test_tns_designation_tells_names_from_classifications() -> None:
    assert tns_designation("SN 2025abc") == "SN 2025abc" and tns_designation(" at2024xyz ") == "AT 2024xyz"
    assert tns_designation("2023ixf") == "2023ixf" and tns_designation("SN 1987A") == "SN 1987A"
    assert tns_designation("FRB 20201124A") == "FRB 20201124A" and tns_designation("TDE 2019qiz") == "TDE 2019qiz"
    for not_a_name in ("SN Ia", "SN II", "SN Ia-91T", "TDE", "", "Unknown", "(TNS) SN Ia", "ZTF25abcdefg", None, 2025):
        assert tns_designation(not_a_name) is None, not_a_name


def test_fink_tns_column_is_a_classification_not_an_alias() -> None:
    """Fink's ``tns`` holds "SN Ia", "SN II": a class shared by many objects, never a name."""
    alerts = _parse(FINK_ZTF[0], "fink-avro")
    classified = [a for a in alerts if a.payload.get("tns") or a.fields.get("tns")]
    assert {a.fields["tns_class"] for a in classified} == {"SN Ia", "SN II"}
    for a in alerts:
        assert a.aliases == () and ZTF_ID.match(a.object_id), (a.object_id, a.aliases)
        assert a.fields["broker"] == "fink"
    # The Fink API row carries the same column as d:tns.
    row = {"i:candid": 1, "i:objectId": "ZTF26aaakzsi", "i:jd": 2461100.5, "i:ra": 191.6, "i:dec": 3.8,
           "i:fid": 1, "i:magpsf": 19.0, "i:sigmapsf": 0.1, "d:tns": "SN II"}
    (api,) = parse_message("fink-api", json.dumps(row).encode())
    assert api.aliases == () and api.fields["tns_class"] == "SN II"
    (named,) = parse_message("fink-api", json.dumps(row | {"d:tns": "SN 2026abc"}).encode())
    assert named.aliases == ("SN 2026abc",)


def _ingestor(db, stream: str, fmt: str):
    from tomd.alerts.ingest import IngestSettings, Ingestor

    return Ingestor(db.sessions, IngestSettings(stream=stream, format=fmt),
                    lambda data: parse_message(fmt, data))


def test_fink_replay_keeps_each_object_its_own_target(db) -> None:
    """Objects 100 degrees apart once merged through the shared alias "SN II"."""
    from sqlalchemy import select

    from tomd.alerts.ingest import FileMessage
    from tomd.db.models import AlertRow, TargetName

    msgs = [FileMessage(rel, 0, (DATA / rel).read_bytes()) for rel in FINK_ZTF]
    result = _ingestor(db, "fink", "fink-avro").handle(msgs)
    assert result.dead_letters == 0
    with db.sessions() as s:
        object_ids = set(s.scalars(select(AlertRow.object_id)))
        names: dict[int, list[str]] = {}
        for target_id, name in s.execute(select(TargetName.target_id, TargetName.name)):
            names.setdefault(target_id, []).append(name)
    assert len(names) == len(object_ids) == 42  # one target per object (the alias merged 5 into 2)
    for target_id, ns in names.items():
        assert len([n for n in ns if ZTF_ID.match(n)]) == 1, ns
        assert all(ZTF_ID.match(n) or tns_designation(n) for n in ns), ns


def test_a_ztf_point_relayed_by_brokers_is_stored_once(db) -> None:
    """The survey's own packet, Fink's copy of it and ALeRCE's light curve: one point each."""
    from sqlalchemy import func, select

    from tomd.alerts.ingest import FileMessage
    from tomd.alerts.formats import ztf
    from tomd.db.models import Photometry

    raw = (DATA / FINK_ZTF[0]).read_bytes()
    reader = fastavro.reader(io.BytesIO(raw))
    fink_schema, records = reader.writer_schema, list(reader)[:6]
    # What ZTF itself sent: the packet without Fink's columns, under ZTF's field set.
    ztf_schema = {**fink_schema, "fields": [f for f in fink_schema["fields"] if f["name"] in ztf.PACKET_KEYS]}
    ztf_records = [{k: v for k, v in r.items() if k in ztf.PACKET_KEYS} for r in records]
    ztf_bytes, fink_bytes = io.BytesIO(), io.BytesIO()
    fastavro.writer(ztf_bytes, fastavro.parse_schema(ztf_schema), ztf_records)
    fastavro.writer(fink_bytes, fastavro.parse_schema(fink_schema), records)
    alerce = [json.dumps({
        "object": {"oid": r["objectId"], "meanra": r["candidate"]["ra"], "meandec": r["candidate"]["dec"],
                   "lastmjd": r["candidate"]["jd"] - 2400000.5},
        "detections": [{"candid": r["candid"], "mjd": r["candidate"]["jd"] - 2400000.5, "fid": r["candidate"]["fid"],
                        "magpsf": r["candidate"]["magpsf"], "sigmapsf": r["candidate"]["sigmapsf"], "isdiffpos": 1}],
    }).encode() for r in records]

    _ingestor(db, "ztf", "ztf-avro").handle([FileMessage("ztf", 0, ztf_bytes.getvalue())])
    with db.sessions() as s:
        alone = s.scalar(select(func.count()).select_from(Photometry))
    assert alone > len(records)
    _ingestor(db, "fink", "fink-avro").handle([FileMessage("fink", 0, fink_bytes.getvalue())])
    _ingestor(db, "alerce", "alerce-api").handle([FileMessage("alerce", i, b) for i, b in enumerate(alerce)])
    with db.sessions() as s:
        rows = s.execute(select(Photometry.target_id, Photometry.band, Photometry.kind, Photometry.mjd,
                                Photometry.source)).all()
    keys = [(t, b, k, round(m, 6)) for t, b, k, m, _ in rows]
    assert len(keys) == len(set(keys)) == alone
    assert {r.source for r in rows} == {"ztf"}


# --- Lasair ---------------------------------------------------------------------------

def test_lasair_lsst_messages() -> None:
    data = (DATA / "other/lasair/skyportal_lasair_lsst_stream_alerts.json").read_bytes()
    msgs = json.loads(data)
    alerts = parse_message("lasair-json", data)
    assert [a.object_id for a in alerts] == [str(m["diaObjectId"]) for m in msgs]
    for a, m in zip(alerts, msgs):
        t = Time(m["lastDiaSourceMjdTai"], format="mjd", scale="tai").utc.to_datetime(timezone.utc)
        assert abs((a.time - t).total_seconds()) < 1e-3
        assert a.fields["sherlock_classifications"] == m["sherlock_classifications"]
    full = alerts[1]
    lists = msgs[1]["alert"]
    kinds = [p.kind for p in full.photometry]
    assert kinds.count("detection") == len(lists["diaSourcesList"])
    assert kinds.count("forced") == len([r for r in lists.get("diaForcedSourcesList") or [] if r.get("psfFlux") is not None])
    neg = [p for p in full.photometry if p.flux is not None and p.flux < 0]
    assert neg and all(p.mag is None for p in neg), "negative difference flux kept, no magnitude"
    # Rubin's measurements relayed by Lasair: the survey is their source (one point however it came).
    assert {p.source for p in full.photometry} == {"rubin"} and full.source == "lasair"
    assert full.fields["broker"] == "lasair"
    # tns_name is an alias only when it is a designation.
    named = json.dumps(msgs[0] | {"tns_name": "2025abc"}).encode()
    assert parse_message("lasair-json", named)[0].aliases == ("2025abc",)
    for junk in ("SN Ia", "", " "):
        assert parse_message("lasair-json", json.dumps(msgs[0] | {"tns_name": junk}).encode())[0].aliases == ()


# --- GCN ------------------------------------------------------------------------------

GCN = "gcn/gcn-schema-v7.2.1/gcn/notices/"


def test_gcn_json_fermi_gbm_notice() -> None:
    (a,) = _parse(GCN + "fermi/gbm/trigger.ground1.example.json", "gcn-json")
    assert a.kind == "localization" and a.event_id == "fermi:745121685"  # trigger ids are per mission
    assert "bn240812094" in a.aliases and a.notice_type == "fermi/gbm/trigger"
    assert a.localization.error_deg == pytest.approx(1.34)
    assert (a.ra, a.dec) == (pytest.approx(92.17), pytest.approx(-66.98))
    assert a.time.isoformat() == "2024-08-24T02:14:40.430000+00:00"
    keys = {_parse(GCN + f"fermi/gbm/trigger.{n}.example.json", "gcn-json")[0].key
            for n in ("alert", "flight1", "flight2", "flight3", "ground1", "ground2", "final")}
    assert len(keys) == 7, "each notice of one trigger has its own key"


def test_gcn_json_test_and_retraction_flags() -> None:
    real = _parse(GCN + "superk/sn_alert.real.example.json", "gcn-json")[0]
    test = _parse(GCN + "superk/sn_alert.test.example.json", "gcn-json")[0]
    assert not real.test and test.test
    data = (DATA / GCN / "superk/sn_alert.test.example.json").read_bytes()
    assert parse_message("gcn-json", data) == []  # tests dropped by default
    assert _parse(GCN + "maxi/gsc.unknown.retraction.example.json", "gcn-json")[0].retraction
    (ell,) = _parse(GCN + "maxi/gsc.unknown.ellipse.example.json", "gcn-json")
    assert ell.localization.error_deg == pytest.approx(0.22)  # semi-major axis


EP_NO_ID = "gcn/skyportal-json/EP240508.json"  # an Einstein Probe WXT alert from before the schema's `id`


def test_gcn_json_notice_without_id_is_named_by_mission_and_trigger_time() -> None:
    from tomd.alerts.formats._common import content_key

    record = json.loads((DATA / EP_NO_ID).read_bytes())
    assert "id" not in record and "mission" not in record and record["trigger_time"] == "2024-05-08T07:38:01.151Z"
    (a,) = _parse(EP_NO_ID, "gcn-json")
    assert a.event_id == "einstein_probe:2024-05-08T07:38:01.151"
    assert a.notice_type == "einstein_probe/wxt/alert" and a.fields["mission"] == "einstein_probe"
    # The key is the content hash, as before: a notice seen again is the same alert.
    assert a.key == content_key(record) and a.key.startswith("sha256:")
    assert _parse(EP_NO_ID, "gcn-json")[0].key == a.key
    # A later notice of the same trigger (a better position) is another alert of the same event.
    (b,) = parse_message("gcn-json", json.dumps(record | {"ra_dec_error": 0.02}).encode())
    assert b.key != a.key and b.event_id == a.event_id
    # Another trigger a second later is another event; a notice that has ids keeps them.
    (c,) = parse_message("gcn-json", json.dumps(record | {"trigger_time": "2024-05-08T07:38:02.151Z"}).encode())
    assert c.event_id == "einstein_probe:2024-05-08T07:38:02.151"
    (d,) = parse_message("gcn-json", json.dumps(record | {"id": ["01708973486"]}).encode())
    assert d.event_id == "einstein_probe:01708973486"
    # Without a mission (no $schema, no mission field) there is nothing to name it by: the key, as before.
    (e,) = _parse("gcn/gcn-classic-binary/SWIFT_BAT_GRB_POS_ACK.json", "gcn-json")
    assert e.event_id is None


def test_gcn_notice_without_id_makes_a_readable_target_once(db) -> None:
    from sqlalchemy import select

    from tomd.alerts.ingest import FileMessage
    from tomd.db.models import AlertRow, Notice, Target

    data = (DATA / EP_NO_ID).read_bytes()
    update = json.dumps(json.loads(data) | {"ra_dec_error": 0.02}).encode()
    ing = _ingestor(db, "gcn", "gcn-json")
    ing.handle([FileMessage("gcn", 0, data)])
    ing.handle([FileMessage("gcn", 1, data), FileMessage("gcn", 2, update)])  # seen twice, then refined
    with db.sessions() as s:
        assert [t.name for t in s.scalars(select(Target))] == ["GCN einstein_probe 2024-05-08T07:38:01.151"]
        (notice,) = s.scalars(select(Notice))
        assert notice.event_id == "einstein_probe:2024-05-08T07:38:01.151"
        assert notice.error_deg == pytest.approx(0.02)  # the refinement updated the one notice
        assert len(list(s.scalars(select(AlertRow)))) == 2  # the repeat was a no-op


def test_gcn_binary_matches_official_json_conversion() -> None:
    base = DATA / "gcn/gcn-classic-binary"
    for name in ("SWIFT_BAT_GRB_POS_ACK", "CALET_GBM_FLT_LC"):
        (a,) = parse_message("gcn-binary", (base / f"{name}.bin").read_bytes())
        ref = json.loads((base / f"{name}.json").read_text())
        assert a.ra == pytest.approx(ref["ra"], abs=1e-6) and a.dec == pytest.approx(ref["dec"], abs=1e-6)
        t = Time(ref["trigger_time"].rstrip("Z"), format="isot", scale="utc").to_datetime(timezone.utc)
        assert abs((a.time - t).total_seconds()) < 1e-3
        if "ra_dec_error" in ref:
            assert a.localization.error_deg == pytest.approx(ref["ra_dec_error"])


def test_gcn_binary_lvc_ids_and_test_bits() -> None:
    base = DATA / "gcn/gcn-classic-binary"
    pre = parse_message("gcn-binary", (base / "LVC_PRELIMINARY.bin").read_bytes(), include_test=True)[0]
    upd = parse_message("gcn-binary", (base / "LVC_UPDATE.bin").read_bytes())[0]
    ret = parse_message("gcn-binary", (base / "LVC_RETRACTION.bin").read_bytes(), include_test=True)[0]
    assert pre.event_id == "MS240510f" and pre.test
    assert upd.event_id == "S240514x" and not upd.test and upd.ra is None
    assert ret.retraction


def test_voevent_position_time_and_role() -> None:
    (a,) = _parse("gcn/voevent/skyportal/GRB180116A_Fermi_GBM_Gnd_Pos.xml", "gcn-voevent")
    assert a.key.startswith("ivo://nasa.gsfc.gcn/Fermi#GBM_Gnd_Pos_2018-01-16")
    assert a.ra == pytest.approx(214.74, abs=1e-4) and a.dec == pytest.approx(28.14, abs=1e-4)
    assert a.localization.error_deg == pytest.approx(11.19)
    assert a.time.isoformat() == "2018-01-16T00:36:52.810000+00:00"
    assert a.notice_type == "FERMI_GBM_GND_POS" and a.event_id == "fermi:537755817" and not a.test
    (t,) = _parse("gcn/voevent/voevent-parse/no_namespace_packet.xml", "gcn-voevent")
    assert t.test
    (g,) = _parse("gcn/voevent/voevent-parse/Gaia16aac.xml", "gcn-voevent")
    # Gaia gives TDB: UTC is ~69 s earlier in 2016.
    assert (Time("2016-01-16T07:52:27", scale="tdb").utc.to_datetime(timezone.utc) - g.time).total_seconds() == pytest.approx(0, abs=1e-3)


# --- LVK ------------------------------------------------------------------------------

LVK = "lvk/userguide-examples/"


@pytest.mark.parametrize("kind", ["earlywarning", "preliminary", "initial", "update", "retraction", "ext-update"])
def test_lvk_avro_and_json_agree(kind: str) -> None:
    (av,) = _parse(f"{LVK}MS181101ab-{kind}.avro", "lvk-avro")
    (js,) = _parse(f"{LVK}MS181101ab-{kind}.json", "lvk-json")
    assert av.key == js.key and av.time == js.time and av.event_id == js.event_id == "MS181101ab"
    assert av.test and js.test  # "MS" = mock superevent
    assert av.retraction == js.retraction == (kind == "retraction")
    if kind == "retraction":
        assert av.localization is None
    else:
        assert av.localization.skymap == js.localization.skymap
        assert av.localization.skymap[:6] == b"SIMPLE"
    assert parse_message("lvk-avro", (DATA / f"{LVK}MS181101ab-{kind}.avro").read_bytes()) == []


def test_lvk_placeholder_skymap_is_noted_not_fatal() -> None:
    (a,) = _parse(f"{LVK}MS181101ab-preliminary_displayexample.json", "lvk-json")
    assert a.localization is None and "base64" in a.fields["skymap_error"]
    assert a.fields["BNS"] == pytest.approx(0.95)


# --- tomd alert replay ------------------------------------------------------------------

KM3NET = "gcn/gcn-schema-v7.2.1/gcn/notices/km3net/alert.multiplet.example.json"  # error radius 0.41 deg


def test_replay_formats_are_the_registered_ones() -> None:
    import typing

    from tomd.alerts.formats import FORMATS
    from tomd.cli import REPLAY_FORMATS
    from tomd.config import POLL_FORMATS, StreamFormat

    assert sorted(REPLAY_FORMATS) == sorted(FORMATS) == sorted([*typing.get_args(StreamFormat), *POLL_FORMATS])


def _replay(tmp_path: Path, name: str, streams: str, *argv: str, capsys) -> tuple[int, str, str]:
    from tomd.cli import main

    work = tmp_path / name
    work.mkdir()
    config = work / "tomd.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{work}/tomd.db"\n[storage]\nurl = "file://{work}/data"\n'
                      f'[rules]\npaths = ["{work}/rules"]\n[hooks]\npaths = ["{work}/hooks"]\n'
                      f'[metrics]\nlisten = "127.0.0.1:0"\n{streams}')
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    capsys.readouterr()
    code = main(["--config", str(config), "alert", "replay", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_replay_rejects_an_unknown_format_before_reading_anything(tmp_path, capsys) -> None:
    from tomd.cli import main

    with pytest.raises(SystemExit) as info:
        main(["alert", "replay", str(DATA / KM3NET), "--format", "gcn"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gcn'" in err and "gcn-json" in err
    with pytest.raises(SystemExit):
        main(["alert", "replay", str(DATA / KM3NET), "--localization-max-deg", "-1"])
    assert "expected degrees in (0, 180]" in capsys.readouterr().err


def test_replay_localization_threshold_from_option_then_stream_then_default(tmp_path, capsys) -> None:
    """A 0.41-degree error circle becomes a target only where the threshold allows it."""
    stream = ('[[streams]]\nname = "gcn"\nkind = "file"\ntopics = ["/nowhere/*.json"]\nformat = "gcn-json"\n'
              'localization_max_deg = 0.5\n')
    f = str(DATA / KM3NET)
    cases = [
        ("default", "", ["--format", "gcn-json"], 0),  # 0.1
        ("stream", stream, ["--format", "gcn-json"], 1),  # the gcn-json stream's 0.5
        ("by-name", stream, ["--stream", "gcn"], 1),
        ("option", stream, ["--format", "gcn-json", "--localization-max-deg", "0.2"], 0),
        ("option-wide", "", ["--format", "gcn-json", "--localization-max-deg", "1"], 1),
    ]
    for name, streams, argv, targets in cases:
        code, out, err = _replay(tmp_path, name, streams, f, *argv, capsys=capsys)
        assert code == 0 and "1 notices" in out, (name, out, err)
        with sqlite3.connect(tmp_path / name / "tomd.db") as con:
            assert con.execute("select count(*) from targets").fetchone() == (targets,), name
    code, out, err = _replay(tmp_path, "unknown-stream", stream, f, "--stream", "nope", capsys=capsys)
    assert code != 0 and "no stream named 'nope' (streams: gcn)" in err


def test_replay_schemaless_fink_dump_with_the_streams_schema_file(tmp_path, capsys) -> None:
    avsc = DATA / "other/fink/schemas/distribution_schema_fink_ztf_2.7_3.10.1.avsc"
    schema = decode.load_schema_file(str(avsc))
    dump = tmp_path / "fink-1.avro"
    rec = next(iter(fastavro.reader(io.BytesIO((DATA / FINK_ZTF[0]).read_bytes()))))
    with open(dump, "wb") as fh:
        fastavro.schemaless_writer(fh, schema.schema, rec)
    stream = (f'[[streams]]\nname = "fink"\nbootstrap = "localhost:9092"\ntopics = ["fink_sn"]\n'
              f'format = "fink-avro"\nschema_file = "{avsc}"\n')
    code, out, _ = _replay(tmp_path, "with", stream, str(dump), "--stream", "fink", capsys=capsys)
    assert code == 0 and "1 alerts stored" in out and "0 dead letters" in out
    code, out, _ = _replay(tmp_path, "option", "", str(dump), "--format", "fink-avro", "--schema-file", str(avsc),
                           capsys=capsys)
    assert code == 0 and "1 alerts stored" in out
    code, out, _ = _replay(tmp_path, "without", "", str(dump), "--format", "fink-avro", capsys=capsys)
    assert code == 1 and "1 dead letters" in out
