"""Every public alert schema version, built from the real schema, through decode + parse.

ZTF: the writer schemas of versions 1.8 – 4.02 in tests/data/schemas/ztf/
(see SOURCE.md there). Rubin: every 7.x – 11.x schema shipped in the installed
lsst-alert-packet, and those tomd ships itself (tomd/alerts/schemas/lsst: 10.1). For each version a packet is generated *from the schema*:
field values come from the real packets in ../shared/data where the field
names match, every other field gets a type-correct value; the history holds
detections and upper limits (ZTF ``prv_candidates`` with ``candid``/``magpsf``
null), forced photometry (ZTF ``fp_hists``, Rubin ``prvDiaForcedSources``)
and cutouts where the schema has them. The packets are framed as the survey
frames them (ZTF: one Avro container per message, schema inside; Rubin: the
Confluent wire format with schema id 100*major+minor) and go through
``parse_message``; the normalised Alert is checked against the values put in,
with astropy as the reference for time scales.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import struct
import threading
from datetime import date, datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest
from astropy.time import Time
from fastavro.schema import expand_schema, load_schema
from fastavro.validation import validate

from tests.conftest import SHARED_DATA
from tomd.alerts.model import payload_dict
from tomd.alerts import decode
from tomd.alerts.parse import parse_message
from tomd.errors import DecodeError

SCHEMAS = Path(__file__).parent / "data" / "schemas" / "ztf"
ZTF_VERSIONS = sorted((p.name for p in SCHEMAS.iterdir() if (p / "alert.avsc").is_file()),
                      key=lambda v: tuple(int(x) for x in v.split(".")))
RUBIN_ROOT = resources.files("lsst.alert.packet") / "schema"
TOMD_RUBIN_ROOT = resources.files("tomd.alerts") / "schemas" / "lsst"  # versions the package lacks


def _rubin_versions(root: Any) -> set[tuple[int, int]]:
    return {(int(maj.name), int(mi.name))
            for maj in root.iterdir() if maj.name.isdigit() and 3 <= int(maj.name) <= 11
            for mi in maj.iterdir() if mi.name.isdigit()}


RUBIN_PACKAGE_VERSIONS = _rubin_versions(RUBIN_ROOT)
RUBIN_VERSIONS = sorted(RUBIN_PACKAGE_VERSIONS | _rubin_versions(TOMD_RUBIN_ROOT))

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


def test_every_version_is_here() -> None:
    """The versions this file covers (the README table lists the same)."""
    assert ZTF_VERSIONS == ["1.8", "2.0", "3.2", "3.3", "3.5", "4.01", "4.02"]
    # 7.x – 11.x are the versions asked for; 3.0 – 6.1 (midPointTai, filterName,
    # decl, psFlux) come along since lsst-alert-packet ships them.
    assert RUBIN_VERSIONS == [(3, 0), (4, 0), (5, 0), (6, 0), (6, 1), (7, 0), (7, 1), (7, 2), (7, 3), (7, 4),
                              (8, 0), (9, 0), (10, 0), (10, 1), (11, 0), (11, 1)]
    # 10.1 is in lsst/alert_packet's repository, not in lsst-alert-packet 30.2026.2700: tomd ships it.
    assert (10, 1) not in RUBIN_PACKAGE_VERSIONS


# --- a record from a schema -----------------------------------------------------

def _scalar(t: Any) -> Any:
    """A type-correct, non-null value for a (non-record) Avro type."""
    if isinstance(t, dict):
        lt = t.get("logicalType")
        if lt in ("timestamp-millis", "timestamp-micros"):
            return datetime(2025, 9, 6, 8, 0, tzinfo=timezone.utc)
        if lt == "date":
            return date(2025, 9, 6)
        if lt == "decimal":
            return Decimal("1.5")
        if lt == "uuid":
            return "00000000-0000-4000-8000-000000000000"
        kind = t["type"]
        if kind == "array":
            return []
        if kind == "map":
            return {}
        if kind == "enum":
            return t["symbols"][0]
        if kind == "fixed":
            return b"\x00" * t["size"]
        return _scalar(kind)
    return {"null": None, "boolean": False, "int": 1, "long": 1, "float": 0.5, "double": 0.5,
            "string": "x", "bytes": b"\x00"}[t]


def synth(schema: dict, pool: dict | None = None, **over: Any) -> dict:
    """A record of the (expanded) record ``schema``.

    Each field takes, in order: ``over[name]``; ``pool[name]`` when that value
    fits the field's type (a real packet's value); else a type-correct value
    (the non-null branch of a nullable union, so the parser sees values).
    """
    pool = pool or {}
    rec: dict[str, Any] = {}
    for f in schema["fields"]:
        name, t = f["name"], f["type"]
        if name in over:
            rec[name] = over[name]
            continue
        if name in pool and validate(pool[name], t, raise_errors=False):
            rec[name] = copy.deepcopy(pool[name])
            continue
        branches = t if isinstance(t, list) else [t]
        b = next((x for x in branches if x != "null"), "null")
        if isinstance(b, dict) and b.get("type") == "record":
            rec[name] = None if "null" in branches else synth(b, pool.get(name) if isinstance(pool.get(name), dict) else None)
        else:
            rec[name] = _scalar(b)
    return rec


def _field_type(schema: dict, name: str) -> Any:
    return next(f["type"] for f in schema["fields"] if f["name"] == name)


def _sub(schema: dict, name: str) -> dict | None:
    """The record schema of field ``name`` (through a nullable union and/or array)."""
    if not any(f["name"] == name for f in schema["fields"]):
        return None
    for t in (_field_type(schema, name) if isinstance(_field_type(schema, name), list) else [_field_type(schema, name)]):
        if isinstance(t, dict) and t.get("type") == "array":
            t = t["items"]
        if isinstance(t, dict) and t.get("type") == "record":
            return t
    return None


def _has(schema: dict | None, name: str) -> bool:
    return schema is not None and any(f["name"] == name for f in schema["fields"])


def _nullable(schema: dict, name: str) -> bool:
    t = _field_type(schema, name)
    return isinstance(t, list) and "null" in t


def _check_valid(schema: dict, rec: dict) -> None:
    validate(rec, schema, raise_errors=True)


def _approx_mag(flux_njy: float) -> float:
    return 31.4 - 2.5 * math.log10(flux_njy)


def _same_instant(dt: datetime, t: Time) -> bool:
    return abs((dt - t.to_datetime(timezone.utc)).total_seconds()) < 1e-3


# --- ZTF ----------------------------------------------------------------------------

def _read(path: Path) -> list[dict]:
    with open(path, "rb") as fh:
        return list(fastavro.reader(fh))


def ztf_parsed(version: str) -> Any:
    return fastavro.parse_schema(json.loads((SCHEMAS / version / "alert.avsc").read_text()))


def ztf_schema(version: str) -> dict:
    """The schema with every named type written out (for generating records)."""
    return expand_schema(ztf_parsed(version))


_ZTF_POOL: dict[str, dict] = {}


def ztf_pool() -> dict[str, dict]:
    """Rows of real ZTF packets to take field values from."""
    if not _ZTF_POOL:
        (p402,) = _read(next((SHARED_DATA / "ztf/pittgoogle").glob("*v4_02.avro")))
        (p35,) = _read(SHARED_DATA / "ztf/ztf-avro-alert/1661382530015060001.avro")
        prv = p402["prv_candidates"]
        _ZTF_POOL.update(
            candidate=p402["candidate"],
            detection=next(r for r in prv if r["candid"] is not None),
            limit=next(r for r in prv if r["candid"] is None),
            fp=p402["fp_hists"][0],
            forced35=p35["prv_candidates"][0],
            cutout=p402["cutoutScience"],
        )
    return _ZTF_POOL


JD0 = 2460736.6771181  # a real candidate jd (2025-03-02)
ZP = 26.27


def build_ztf(version: str, candid: int, *, object_id: str = "ZTF25aaaaaaa", ra: float = 97.8890196,
              dec: float = -2.798349, sso: bool = False) -> tuple[dict, dict, dict]:
    """(schema, record, expectations) for one ZTF packet of ``version``."""
    schema = ztf_schema(version)
    pool = ztf_pool()
    cand_s, prv_s, cut_s = _sub(schema, "candidate"), _sub(schema, "prv_candidates"), _sub(schema, "cutoutScience")
    fp_s = _sub(schema, "fp_hists")
    assert cand_s and prv_s and cut_s
    cand_over: dict[str, Any] = dict(candid=candid, jd=JD0, ra=ra, dec=dec, fid=2, magpsf=18.25, sigmapsf=0.05,
                                     isdiffpos="t", diffmaglim=20.5, programid=1)
    if sso:
        cand_over.update(ssnamenr="12345", ssdistnr=0.8, ssmagnr=19.9)
    else:
        cand_over.update(ssnamenr="null", ssdistnr=-999.0, ssmagnr=-999.0)  # what ZTF writes for "none"
    cand = synth(cand_s, pool["candidate"], **{k: v for k, v in cand_over.items() if _has(cand_s, k)})
    forced35 = _has(prv_s, "forcediffimflux") and not _has(prv_s, "magpsf")
    prv: list[dict] = []
    exp: dict[str, Any] = {"detections": 1, "limits": [], "forced": []}
    if forced35:
        # 3.5: the history is forced photometry on past difference images.
        for k, flux in enumerate((1500.0, -300.0, -99999.0)):
            prv.append(synth(prv_s, pool["forced35"], jd=JD0 - 1 - k, fid=1 + k % 2, forcediffimflux=flux,
                             forcediffimfluxunc=50.0, magzpsci=ZP, pid=7000 + k))
            if flux != -99999.0:
                exp["forced"].append((JD0 - 1 - k, flux * 10 ** (-0.4 * (ZP - 31.4))))
    else:
        for k in range(2):  # past detections
            prv.append(synth(prv_s, pool["detection"], candid=candid - 1000 - k, jd=JD0 - 1 - k, fid=1 + k % 2,
                             magpsf=18.6 + 0.1 * k, sigmapsf=0.07, isdiffpos="t", ra=ra, dec=dec, diffmaglim=20.3))
            exp["detections"] += 1
        for k in range(3):  # non-detections: candid, magpsf, ... null; diffmaglim set
            nulls = {n: None for n in ("candid", "isdiffpos", "ra", "dec", "magpsf", "sigmapsf", "ranr", "decnr")
                     if _has(prv_s, n) and _nullable(prv_s, n)}
            prv.append(synth(prv_s, pool["limit"], jd=JD0 - 5 - k, fid=2, diffmaglim=20.1 + 0.1 * k, **nulls))
            exp["limits"].append((JD0 - 5 - k, 20.1 + 0.1 * k))
    fp: list[dict] | None = None
    if fp_s is not None:
        fp = []
        for k, flux in enumerate((9088.5, -982.19, -99999.0)):  # -99999: no measurement
            fp.append(synth(fp_s, pool["fp"], jd=JD0 - 10 - k, fid=2, forcediffimflux=flux,
                            forcediffimfluxunc=40.0, magzpsci=ZP, pid=8000 + k))
            if flux != -99999.0:
                exp["forced"].append((JD0 - 10 - k, flux * 10 ** (-0.4 * (ZP - 31.4))))
    stamps = {k: gzip.compress(f"SIMPLE  = T {k} {candid}".encode()) for k in ("Science", "Template", "Difference")}
    top: dict[str, Any] = dict(objectId=object_id, candid=candid, candidate=cand, prv_candidates=prv,
                               schemavsn=version, publisher="ZTF (www.ztf.caltech.edu)")
    if fp is not None:
        top["fp_hists"] = fp
    for k, data in stamps.items():
        top[f"cutout{k}"] = synth(cut_s, None, fileName=f"candid{candid}_{k.lower()}.fits.gz", stampData=data)
    rec = synth(schema, None, **{k: v for k, v in top.items() if _has(schema, k)})
    _check_valid(schema, rec)
    exp["stamps"] = stamps
    return schema, rec, exp


def _zigzag(n: int) -> bytes:
    """An Avro long (zig-zag varint)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def ztf_message(version: str, rec: dict) -> bytes:
    """One Avro container holding one packet, as ZTF sends it.

    Written here rather than by ``fastavro.writer`` so the header carries the
    schema text itself: fastavro would write its own rendering and drop what
    it does not keep (4.01's ``tooflag`` default of 0, for one).
    """
    text = (SCHEMAS / version / "alert.avsc").read_bytes()
    body = io.BytesIO()
    fastavro.schemaless_writer(body, ztf_parsed(version), rec)
    data, sync = body.getvalue(), b"tomd-test-sync!!"
    meta = {b"avro.schema": text, b"avro.codec": b"null"}
    header = b"Obj\x01" + _zigzag(len(meta)) + b"".join(
        _zigzag(len(k)) + k + _zigzag(len(v)) + v for k, v in meta.items()) + _zigzag(0) + sync
    msg = header + _zigzag(1) + _zigzag(len(data)) + data + sync
    (back,) = fastavro.reader(io.BytesIO(msg))  # a well-formed container: fastavro reads it too
    assert back["candid"] == rec["candid"]
    return msg


@needs_data
@pytest.mark.parametrize("version", ZTF_VERSIONS)
def test_ztf_version_decodes_and_parses(version: str) -> None:
    schema, rec, exp = build_ztf(version, candid=2982177112815010003)
    data = ztf_message(version, rec)
    assert decode.sniff(data) == "avro-ocf"
    (a,) = parse_message("ztf-avro", data)
    (auto,) = parse_message("auto", data)
    assert auto.key == a.key and auto.source == "ztf"

    cand = rec["candidate"]
    assert a.source == "ztf" and a.kind == "transient"
    assert a.key == "2982177112815010003" and a.object_id == "ZTF25aaaaaaa"
    assert _same_instant(a.time, Time(JD0, format="jd", scale="utc"))
    assert a.time.tzinfo is not None and a.time.utcoffset().total_seconds() == 0
    assert (a.ra, a.dec) == (pytest.approx(97.8890196), pytest.approx(-2.798349))
    assert a.band == "ztfr"
    assert a.mag == pytest.approx(18.25) and a.mag_err == pytest.approx(0.05)
    # m_AB = 31.4 - 2.5 log10(f / nJy)
    assert _approx_mag(a.flux) == pytest.approx(a.mag, abs=1e-9)
    assert a.flux_err == pytest.approx(a.flux * 0.05 * math.log(10) / 2.5, rel=1e-6)
    assert a.fields["schemavsn"] == rec.get("schemavsn")  # None for 1.8, which has no schemavsn
    if _has(_sub(schema, "candidate"), "drb"):
        assert a.fields["real_bogus"] == pytest.approx(cand["drb"], rel=1e-6)
    else:
        assert a.fields["real_bogus"] == pytest.approx(cand["rb"], rel=1e-6)

    det = [p for p in a.photometry if p.kind == "detection"]
    lim = [p for p in a.photometry if p.kind == "upper_limit"]
    forced = [p for p in a.photometry if p.kind == "forced"]
    assert len(det) == exp["detections"]
    assert sorted((round(p.mjd, 6), round(p.limit, 4)) for p in lim) == sorted(
        (round(jd - 2400000.5, 6), round(m, 4)) for jd, m in exp["limits"])
    assert all(p.mag is None and p.flux is None for p in lim)
    # forcediffimflux and magzpsci are Avro floats (32 bit): compare to 1e-6.
    got = sorted((round(p.mjd, 6), p.flux) for p in forced)
    want = sorted((round(jd - 2400000.5, 6), f) for jd, f in exp["forced"])
    assert [m for m, _ in got] == [m for m, _ in want]
    assert [f for _, f in got] == pytest.approx([f for _, f in want], rel=1e-6)
    for p in forced:  # a negative forced flux is kept, without a magnitude
        assert (p.mag is None) == (p.flux <= 0)
        if p.mag is not None:
            assert p.mag == pytest.approx(_approx_mag(p.flux))
    assert {p.band for p in det} <= {"ztfg", "ztfr"}
    assert det[0].measurement_id == a.key
    assert {p.measurement_id for p in det[1:]} == {str(r["candid"]) for r in rec["prv_candidates"] or []
                                                     if r.get("candid") is not None}
    assert a.cutouts == {"science": exp["stamps"]["Science"], "template": exp["stamps"]["Template"],
                         "difference": exp["stamps"]["Difference"]}
    # The payload is kept (without cutout bytes) and is JSON-safe.
    json.dumps(payload_dict(a.payload))
    assert payload_dict(a.payload)["objectId"] == "ZTF25aaaaaaa"
    # "no known solar-system object" is written as 'null' / -999 by ZTF: not a linkage.
    assert a.fields.get("ssnamenr") is None and a.fields.get("ssdistnr") is None


@needs_data
@pytest.mark.parametrize("version", ZTF_VERSIONS)
def test_ztf_known_solar_system_object_fields(version: str) -> None:
    schema, rec, _ = build_ztf(version, candid=2982177112815010099, sso=True)
    (a,) = parse_message("ztf-avro", ztf_message(version, rec))
    assert a.fields["ssnamenr"] == "12345"
    assert a.fields["ssdistnr"] == pytest.approx(0.8)
    assert a.fields["ssmagnr"] == pytest.approx(19.9, rel=1e-6)


@pytest.mark.parametrize("version", ZTF_VERSIONS)
def test_ztf_fast_reader_reads_each_version_as_fastavro_does(version: str) -> None:
    """Records are read by cavro (decode.OcfSchema): every ZTF schema must be one it
    takes, and its values must be fastavro's, NaNs, nulls and cutout bytes included."""
    _, rec, _ = build_ztf(version, candid=2982177112815010123)
    data = ztf_message(version, rec)
    assert decode._parsed_schema(decode.read_ocf_header(data).schema_json).fast is not None
    assert repr(decode.decode_avro_ocf(data)) == repr(list(fastavro.reader(io.BytesIO(data))))


@needs_data
def test_ztf_each_writer_schema_parsed_once() -> None:
    """Many messages of many versions: one schema parse per distinct writer schema."""
    decode._parsed_schema.cache_clear()
    keys = set()
    for version in ZTF_VERSIONS:
        for i in range(5):
            _, rec, _ = build_ztf(version, candid=3000000000000000000 + 100 * i + ZTF_VERSIONS.index(version))
            for a in parse_message("ztf-avro", ztf_message(version, rec)):
                keys.add(a.key)
    info = decode._parsed_schema.cache_info()
    assert len(keys) == 5 * len(ZTF_VERSIONS)
    assert info.misses == len(ZTF_VERSIONS), info
    assert info.hits == 4 * len(ZTF_VERSIONS), info


# --- Rubin ----------------------------------------------------------------------------

def rubin_schema_path(major: int, minor: int) -> Any:
    """The alert schema file: lsst-alert-packet's, else tomd's own copy."""
    name = f"lsst.v{major}_{minor}.alert.avsc"
    root = RUBIN_ROOT if (major, minor) in RUBIN_PACKAGE_VERSIONS else TOMD_RUBIN_ROOT
    return root / str(major) / str(minor) / name


def rubin_schema(major: int, minor: int) -> tuple[Any, dict]:
    """(fastavro-parsed schema, expanded schema) from the schema files."""
    with resources.as_file(rubin_schema_path(major, minor)) as p:
        parsed = load_schema(str(p))
    return parsed, expand_schema(parsed)


_RUBIN_POOL: dict[str, dict] = {}


def rubin_pool() -> dict[str, dict]:
    """Rows of real Rubin packets (Fink's copy of visit 2025090500225, v9.0)."""
    if not _RUBIN_POOL:
        (r,) = _read(sorted((SHARED_DATA / "lsst/fink-broker-rubin_test_data_9_0").glob("*.avro"))[0])
        _RUBIN_POOL.update(diaSource=r["diaSource"], diaObject=r["diaObject"] or {})
    return _RUBIN_POOL


MJD_TAI = 60924.33041372549  # a real midpointMjdTai (2025-09-06)


def build_rubin(major: int, minor: int, dia_source_id: int, *, sso: bool = False) -> tuple[dict, dict]:
    """(record, expectations) for one Rubin alert of version major.minor."""
    _, schema = rubin_schema(major, minor)
    pool = rubin_pool()
    src_s = _sub(schema, "diaSource")
    fsrc_s, obj_s = _sub(schema, "prvDiaForcedSources"), _sub(schema, "diaObject")
    lim_s = _sub(schema, "prvDiaNondetectionLimits")
    assert src_s and fsrc_s and obj_s
    dia_object_id = dia_source_id + 7
    ss_object_id = 5012345678901234 if sso else None

    def source(sid: int, mjd: float, band: str, flux: float, **kw: Any) -> dict:
        over = _renamed(dict(diaSourceId=sid, midpointMjdTai=mjd, ra=10.371498535258743, dec=-45.24411476554913,
                             raErr=2.0e-5, decErr=3.0e-5, band=band, psfFlux=flux, psfFluxErr=abs(flux) * 0.05 + 10.0,
                             diaObjectId=None if sso else dia_object_id, ssObjectId=ss_object_id, reliability=0.92,
                             **kw))
        return synth(src_s, pool["diaSource"], **{k: v for k, v in over.items() if _has(src_s, k)})

    trigger = source(dia_source_id, MJD_TAI, "i", 3028.18701171875)
    prv = [source(dia_source_id - 10 - k, MJD_TAI - 3 - k, b, f)
           for k, (b, f) in enumerate((("g", 2100.0), ("r", 2500.0), ("i", 1900.0)))]
    forced = []
    for k, flux in enumerate((800.0, -250.0, 40.0, 0.0)):
        over = _renamed(dict(diaForcedSourceId=dia_source_id + 100 + k, diaObjectId=dia_object_id,
                             midpointMjdTai=MJD_TAI - 20 - k, band="r", psfFlux=flux, psfFluxErr=60.0,
                             ra=10.3715, dec=-45.2441))
        forced.append(synth(fsrc_s, None, **{k2: v for k2, v in over.items() if _has(fsrc_s, k2)}))
    top: dict[str, Any] = dict(diaSource=trigger, prvDiaSources=prv, prvDiaForcedSources=forced,
                               alertId=dia_source_id, diaSourceId=dia_source_id,
                               observation_reason="wfd", target_name="lowdust",
                               cutoutDifference=b"SIMPLE diff", cutoutScience=b"SIMPLE sci", cutoutTemplate=b"SIMPLE tmpl")
    exp: dict[str, Any] = {"limits": [], "designation": None}
    if lim_s is not None:  # v7: noise levels of past non-detections
        top["prvDiaNondetectionLimits"] = [
            synth(lim_s, None, **{n: v for n, v in _renamed(dict(midpointMjdTai=MJD_TAI - 40 - k, band="g",
                                                                  diaNoise=120.0 + k)).items() if _has(lim_s, n)})
            for k in range(2)]
        exp["limits"] = [(MJD_TAI - 40 - k, _approx_mag(5 * (120.0 + k))) for k in range(2)]
    if sso:
        designation = "2015 AB12"
        top["diaObject"] = None
        for name in ("ssObject", "ssSource", "MPCORB", "mpc_orbits"):
            sub = _sub(schema, name)
            if sub is None:
                continue
            over = {"ssObjectId": ss_object_id, "diaSourceId": dia_source_id, "designation": designation,
                    "mpcDesignation": "K15A12B" if name == "MPCORB" else None}
            top[name] = synth(sub, None, **{k: v for k, v in over.items() if _has(sub, k)})
        if any(_has(_sub(schema, n), "designation") for n in ("ssSource", "ssObject", "mpc_orbits")):
            exp["designation"] = designation
        elif _has(_sub(schema, "MPCORB"), "mpcDesignation"):
            exp["designation"] = "K15A12B"
    else:
        top["diaObject"] = synth(obj_s, pool["diaObject"], **{k: v for k, v in _renamed(dict(
            diaObjectId=dia_object_id, ra=10.3715, dec=-45.2441, nDiaSources=4)).items() if _has(obj_s, k)})
        for name in ("ssObject", "ssSource", "MPCORB", "mpc_orbits"):
            if _has(schema, name):
                top[name] = None
    rec = synth(schema, None, **{k: v for k, v in top.items() if _has(schema, k)})
    _check_valid(schema, rec)
    exp.update(dia_object_id=dia_object_id, ss_object_id=ss_object_id, n_prv=len(prv), forced=forced)
    return rec, exp


# Names before v5 (lsst.v3_0, v4_0) for the same quantities.
_OLD_NAMES = {"midpointMjdTai": "midPointTai", "band": "filterName", "dec": "decl", "decErr": "declErr",
              "psfFlux": "psFlux", "psfFluxErr": "psFluxErr"}


def _renamed(over: dict) -> dict:
    """``over`` plus the same values under the pre-v5 names (callers keep the ones the schema has)."""
    return {**over, **{_OLD_NAMES[k]: v for k, v in over.items() if k in _OLD_NAMES}}


def rubin_message(major: int, minor: int, rec: dict) -> bytes:
    parsed, _ = rubin_schema(major, minor)
    buf = io.BytesIO()
    buf.write(b"\x00" + struct.pack(">I", 100 * major + minor))
    fastavro.schemaless_writer(buf, parsed, rec)
    return buf.getvalue()


def _rubin_ids(v: tuple[int, int]) -> str:
    return f"v{v[0]}.{v[1]}"


@needs_data
@pytest.mark.parametrize("version", RUBIN_VERSIONS, ids=_rubin_ids)
def test_rubin_version_decodes_and_parses(version: tuple[int, int]) -> None:
    check_rubin_version(*version, None)


def check_rubin_version(major: int, minor: int, schema_source: Any) -> None:
    sid = 169298432598474793 + 1000 * major + minor
    rec, exp = build_rubin(major, minor, sid)
    data = rubin_message(major, minor, rec)
    assert decode.sniff(data) == "confluent-avro" and decode.confluent_schema_id(data) == 100 * major + minor
    (a,) = parse_message("rubin-avro", data, schema_source=schema_source)
    (auto,) = parse_message("auto", data, schema_source=schema_source)
    assert auto.key == a.key and auto.source == "rubin"

    assert a.source == "rubin" and a.kind == "transient"
    assert a.key == str(sid)
    assert a.object_id == str(exp["dia_object_id"])
    assert _same_instant(a.time, Time(MJD_TAI, format="mjd", scale="tai").utc)
    assert (a.ra, a.dec) == (pytest.approx(10.371498535258743), pytest.approx(-45.24411476554913))
    assert a.ra_err_arcsec == pytest.approx(2.0e-5 * 3600, rel=1e-5)
    assert a.dec_err_arcsec == pytest.approx(3.0e-5 * 3600, rel=1e-5)
    assert a.band == "lssti"
    assert a.flux == pytest.approx(3028.18701171875)
    assert a.mag == pytest.approx(_approx_mag(3028.18701171875), abs=1e-9)
    assert a.mag_err == pytest.approx(2.5 / math.log(10) * a.flux_err / a.flux)
    _, schema = rubin_schema(major, minor)
    if _has(_sub(schema, "diaSource"), "reliability"):
        assert a.fields["real_bogus"] == pytest.approx(0.92, rel=1e-6)
    assert a.fields.get("observation_reason", "wfd") == "wfd"
    assert "ssObjectId" not in a.fields

    det = [p for p in a.photometry if p.kind == "detection"]
    forced = [p for p in a.photometry if p.kind == "forced"]
    lim = [p for p in a.photometry if p.kind == "upper_limit"]
    assert len(det) == 1 + exp["n_prv"]
    assert {p.band for p in det} == {"lsstg", "lsstr", "lssti"}
    assert det[0].measurement_id == str(sid)
    for p in det + forced + lim:  # every history point in UTC MJD too
        assert p.mjd < Time(MJD_TAI, format="mjd", scale="tai").utc.mjd + 1e-9
    assert len(forced) == len(exp["forced"])
    by_id = {p.measurement_id: p for p in forced}
    for row in exp["forced"]:
        p = by_id[str(row["diaForcedSourceId"])]
        flux, mjd = row.get("psfFlux", row.get("psFlux")), row.get("midpointMjdTai", row.get("midPointTai"))
        assert p.flux == pytest.approx(flux)
        assert p.mjd == pytest.approx(Time(mjd, format="mjd", scale="tai").utc.mjd, abs=1e-9)
        assert (p.mag is None) == (flux <= 0)
    assert sorted((round(p.mjd, 6), round(p.limit, 6)) for p in lim) == sorted(
        (round(Time(m, format="mjd", scale="tai").utc.mjd, 6), round(lv, 6)) for m, lv in exp["limits"])
    assert set(a.cutouts) == {n for n in ("science", "template", "difference") if _has(schema, "cutout" + n.title())}
    json.dumps(payload_dict(a.payload))


@needs_data
@pytest.mark.parametrize("version", RUBIN_VERSIONS, ids=_rubin_ids)
def test_rubin_solar_system_source(version: tuple[int, int]) -> None:
    check_rubin_solar_system(*version, None)


def check_rubin_solar_system(major: int, minor: int, schema_source: Any) -> None:
    sid = 169298432598475000 + 1000 * major + minor
    rec, exp = build_rubin(major, minor, sid, sso=True)
    (a,) = parse_message("rubin-avro", rubin_message(major, minor, rec), schema_source=schema_source)
    assert a.kind == "solar_system"
    assert a.key == str(sid)
    assert a.object_id is None  # no diaObject for a known moving object
    assert a.fields["ssObjectId"] == exp["ss_object_id"]
    assert a.fields.get("ss_designation") == exp["designation"]
    assert _same_instant(a.time, Time(MJD_TAI, format="mjd", scale="tai").utc)


def registered_schema(major: int, minor: int) -> str:
    """The schema text Rubin puts in its registry: lsst-alert-packet's resolved definition."""
    from lsst.alert.packet import Schema

    with resources.as_file(rubin_schema_path(major, minor)) as p:
        schema = Schema.from_file(str(p))
    assert schema.get_schema_id() == 100 * major + minor  # the id Rubin registers it under
    return json.dumps(schema.definition)


class _Registry:
    """A Confluent Schema Registry on loopback: GET /schemas/ids/{id} → {"schema": "<json>"}."""

    def __init__(self, schemas: dict[int, str]) -> None:
        self.schemas = schemas
        self.calls: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.calls.append(self.path)
                try:
                    sid = int(self.path.rsplit("/", 1)[-1])
                except ValueError:
                    sid = -1
                if self.path.startswith("/schemas/ids/") and sid in outer.schemas:
                    body, code = json.dumps({"schema": outer.schemas[sid]}).encode(), 200
                else:
                    body, code = json.dumps({"error_code": 40403, "message": "Schema not found"}).encode(), 404
                self.send_response(code)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_Registry":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@needs_data
def test_rubin_registry_fetched_once_per_schema_id_then_packaged_fallback() -> None:
    """Registry schemas over HTTP, one request per schema id for many messages;
    ids the registry does not know fall back to the packaged schemas."""
    served = RUBIN_VERSIONS[::2]
    schemas = {100 * M + m: registered_schema(M, m) for M, m in served}
    messages = []
    for M, m in RUBIN_VERSIONS:
        for i in range(3):
            rec, _ = build_rubin(M, m, 169298432598476000 + 10000 * i + 100 * M + m)
            messages.append(((M, m), rubin_message(M, m, rec)))
    with _Registry(schemas) as reg, httpx.Client() as client:
        registry = decode.RegistrySchemaSource(reg.url, client, timeout=5.0)
        packaged = decode.PackagedRubinSchemas()
        chain = decode.ChainSchemaSource((registry, packaged))
        keys = set()
        for _, data in messages:
            (a,) = parse_message("rubin-avro", data, schema_source=chain)
            keys.add(a.key)
        assert len(keys) == len(messages)
        asked = sorted(reg.calls)
    # Each id asked once: the served ones answered, the others 404 → packaged schema, also cached.
    assert asked == sorted(f"/schemas/ids/{100 * M + m}" for M, m in RUBIN_VERSIONS)
    assert set(registry._cache) == set(schemas)
    assert set(packaged._cache) == {100 * M + m for M, m in RUBIN_VERSIONS} - set(schemas)


@needs_data
def test_rubin_10_1_decodes_without_a_registry() -> None:
    """10.1 (ssObject beside ssSource) is not in lsst-alert-packet: tomd's shipped copy decodes it."""
    packaged = decode.PackagedRubinSchemas()
    check_rubin_version(10, 1, packaged)
    check_rubin_solar_system(10, 1, packaged)
    # And through the default source `rubin-avro` uses when no registry is configured.
    rec, _ = build_rubin(10, 1, 169298432598477001)
    (a,) = parse_message("rubin-avro", rubin_message(10, 1, rec))
    assert a.key == "169298432598477001" and payload_dict(a.payload)["ssObject"] is None
    # A version neither has is refused with the id, the version and where it was looked for.
    data = b"\x00" + struct.pack(">I", 1002) + b"\x00"
    with pytest.raises(DecodeError, match=r"schema id 1002: no Rubin schema v10\.2 in lsst-alert-packet"):
        parse_message("rubin-avro", data, schema_source=decode.PackagedRubinSchemas())


def test_shipped_rubin_schemas_are_package_data() -> None:
    """pyproject's package data takes tomd/alerts/schemas (else a wheel would lack 10.1)."""
    import fnmatch
    import tomllib

    repo = Path(__file__).parents[1]
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tomd"]
    shipped = [p.relative_to(repo / "tomd").as_posix() for p in (repo / "tomd/alerts/schemas").rglob("*.avsc")]
    assert len(shipped) == 7
    # setuptools' "**" spans folders, as fnmatch's "*" does.
    missing = [f for f in shipped if not any(fnmatch.fnmatch(f, pat.replace("**/", "")) for pat in patterns)]
    assert not missing, (patterns, missing)
