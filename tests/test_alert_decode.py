"""Decoding: framings, schema sources, malformed input, sniffing."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import bson
import fastavro
import httpx
import pytest

from tomd.alerts import decode
from tomd.alerts.parse import parse_message
from tomd.errors import DecodeError, ParseError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"sample data not found at {DATA}")
ZTF = "ztf/pittgoogle/ztf_20250302_programid1_ZTF17aaarzyp_2982177112815010003.v4_02.avro"
RUBIN = "lsst/pittgoogle-confluent-wire/lsst.v11_1.avro"


def _ztf_bytes() -> bytes:
    return (DATA / ZTF).read_bytes()


def _rewrite(data: bytes, codec: str, mutate=None) -> bytes:
    r = fastavro.reader(io.BytesIO(data))
    recs = list(r)
    if mutate:
        for rec in recs:
            mutate(rec)
    out = io.BytesIO()
    fastavro.writer(out, r.writer_schema, recs, codec=codec)
    return out.getvalue()


@needs_data
def test_ocf_deflate_equals_null_codec_and_fastavro() -> None:
    data = _ztf_bytes()
    deflated = _rewrite(data, "deflate")
    assert decode.read_ocf_header(deflated).codec == "deflate"
    assert repr(decode.decode_avro_ocf(deflated)) == repr(decode.decode_avro_ocf(data))
    assert repr(decode.decode_avro_ocf(data)) == repr(list(fastavro.reader(io.BytesIO(data))))


def _ocf_samples() -> list[Path]:
    if not DATA.is_dir():
        return []
    return sorted(p for p in DATA.rglob("*.avro") if p.read_bytes()[:4] == decode.OCF_MAGIC)


@needs_data
@pytest.mark.parametrize("path", _ocf_samples(), ids=lambda p: str(p.relative_to(DATA)))
def test_fast_reader_reads_every_real_container_as_fastavro_does(path: Path) -> None:
    """Records are read by cavro where it takes the schema (decode.OcfSchema): on every
    real container sample (ZTF, Fink, LVK, Rubin via Fink) it must, and its values must be fastavro's."""
    data = path.read_bytes()
    assert decode._parsed_schema(decode.read_ocf_header(data).schema_json).fast is not None
    assert repr(decode.decode_avro_ocf(data)) == repr(list(fastavro.reader(io.BytesIO(data))))


def test_schema_the_fast_reader_refuses_is_read_by_fastavro() -> None:
    # "r-x" is no valid Avro name: cavro refuses the schema, fastavro reads it (as it always did).
    schema = {"type": "record", "name": "r-x", "fields": [{"name": "a", "type": "long"},
                                                           {"name": "b", "type": ["null", "string"]}]}
    out = io.BytesIO()
    fastavro.writer(out, schema, [{"a": 1, "b": None}, {"a": -7, "b": "x"}])
    data = out.getvalue()
    assert decode._parsed_schema(decode.read_ocf_header(data).schema_json).fast is None
    assert decode.decode_avro_ocf(data) == [{"a": 1, "b": None}, {"a": -7, "b": "x"}]


@needs_data
def test_ocf_schema_parsed_once_per_distinct_schema() -> None:
    data = _ztf_bytes()
    decode.decode_avro_ocf(data)
    before = decode._parsed_schema.cache_info()
    for _ in range(5):
        decode.decode_avro_ocf(data)
    after = decode._parsed_schema.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 5


@needs_data
@pytest.mark.parametrize("cut", [3, 40, 2000, -10])
def test_truncated_ocf_is_a_decode_error(cut: int) -> None:
    with pytest.raises(DecodeError):
        parse_message("ztf-avro", _ztf_bytes()[:cut])


@needs_data
def test_corrupt_sync_marker_and_body() -> None:
    data = bytearray(_ztf_bytes())
    data[-3] ^= 0xFF  # inside the final sync marker
    with pytest.raises(DecodeError, match="sync"):
        decode.decode_avro_ocf(bytes(data))


def test_garbage_inputs_name_the_problem() -> None:
    with pytest.raises(DecodeError, match="not an Avro container"):
        parse_message("ztf-avro", b"hello world")
    with pytest.raises(DecodeError, match="invalid JSON"):
        parse_message("gcn-json", b"{not json")
    with pytest.raises(DecodeError, match="not a VOEvent"):
        parse_message("gcn-voevent", b"<html><body/></html>")
    with pytest.raises(DecodeError, match="invalid XML"):
        parse_message("gcn-voevent", b"<VOEvent")
    with pytest.raises(DecodeError, match="160 bytes"):
        parse_message("gcn-binary", b"\x00" * 100)
    with pytest.raises(DecodeError, match="zlib"):
        parse_message("antares", b"not compressed")
    with pytest.raises(DecodeError, match="cannot tell"):
        parse_message("auto", b"\x93\x11garbage")
    with pytest.raises(DecodeError, match="Confluent"):
        parse_message("rubin-avro", b"\x01abc")
    with pytest.raises(ParseError, match="unknown alert format"):
        parse_message("nope", b"{}")


@needs_data
def test_ztf_missing_or_bad_fields_are_parse_errors() -> None:
    data = _ztf_bytes()
    cases = {
        "candidate.jd": lambda r: r["candidate"].update(jd=float("nan")),
        "candidate.dec": lambda r: r["candidate"].update(dec=123.0),
        "candidate.fid": lambda r: r["candidate"].update(fid=9),
    }
    for field, mutate in cases.items():
        with pytest.raises(ParseError, match=field.replace(".", r"\.")):
            parse_message("ztf-avro", _rewrite(data, "null", mutate))


@needs_data
def test_confluent_unknown_schema_and_trailing_bytes() -> None:
    data = (DATA / RUBIN).read_bytes()
    with pytest.raises(DecodeError, match="4242"):
        parse_message("rubin-avro", b"\x00\x00\x00\x10\x92" + data[5:])
    with pytest.raises(DecodeError, match="unread"):
        parse_message("rubin-avro", data + b"\x00\x00")


def _registry(schemas: dict[int, str], calls: list[str]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        sid = int(request.url.path.rsplit("/", 1)[-1])
        if sid not in schemas:
            return httpx.Response(404, json={"error_code": 40403, "message": "Schema not found"})
        return httpx.Response(200, json={"schema": schemas[sid]})

    return httpx.Client(transport=httpx.MockTransport(handler))


@needs_data
def test_registry_schema_source_caches_and_chain_falls_back() -> None:
    from fastavro.schema import expand_schema

    packaged = decode.PackagedRubinSchemas()
    schema_json = json.dumps(expand_schema(packaged.get(1101)))
    calls: list[str] = []
    client = _registry({1101: schema_json}, calls)
    reg = decode.RegistrySchemaSource("http://registry.test", client, timeout=2.0)
    data = (DATA / RUBIN).read_bytes()
    a1 = parse_message("rubin-avro", data, schema_source=reg)
    a2 = parse_message("rubin-avro", data, schema_source=reg)
    assert a1[0].key == a2[0].key == parse_message("rubin-avro", data)[0].key
    assert calls == ["/schemas/ids/1101"], "one request, then the cache"
    v9 = (DATA / "lsst/pittgoogle-confluent-wire/lsst.v9_0.avro").read_bytes()
    with pytest.raises(DecodeError, match="HTTP 404"):
        parse_message("rubin-avro", v9, schema_source=reg)
    chain = decode.ChainSchemaSource((reg, packaged))
    assert parse_message("rubin-avro", v9, schema_source=chain)[0].source == "rubin"


def test_registry_timeout_is_a_decode_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    reg = decode.RegistrySchemaSource("http://r.test", httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(DecodeError, match="ReadTimeout"):
        reg.get(700)


def test_packaged_schema_unknown_version() -> None:
    with pytest.raises(DecodeError, match="v99.0"):
        decode.PackagedRubinSchemas().get(9900)


def _antares_message(newest_mag: float = 18.2) -> bytes:
    doc = {
        "data": {
            "type": "locus",
            "id": "ANT2020abcde",
            "attributes": {
                "ra": 150.1, "dec": -2.5, "tags": ["nuclear_transient"], "catalogs": ["gaia_dr3"],
                "properties": {
                    "newest_alert_id": "ztf_candidate:1234567890", "newest_alert_observation_time": 60100.25,
                    "ztf_object_id": "ZTF23aaaaaaa", "num_alerts": 2,
                },
            },
        },
        "included": [
            {"type": "alert", "id": "ztf_candidate:1234567890",
             "attributes": {"mjd": 60100.25, "properties": {"ant_mag": newest_mag, "ant_magerr": 0.05, "ant_passband": "g"}}},
            {"type": "alert", "id": "ztf_upper_limit:1",
             "attributes": {"mjd": 60098.2, "properties": {"ant_maglim": 20.1, "ant_passband": "R"}}},
        ],
    }
    return zlib.compress(bson.encode(doc))


def test_antares_zlib_bson_locus() -> None:
    data = _antares_message()
    assert decode.sniff(data) == "zlib"
    (a,) = parse_message("antares", data)
    assert a.source == "antares" and a.key == "ztf_candidate:1234567890" and a.object_id == "ANT2020abcde"
    assert a.mag == 18.2 and a.band == "ztfg" and "ZTF23aaaaaaa" in a.aliases
    assert [p.kind for p in a.photometry] == ["upper_limit", "detection"]
    # ZTF's measurements relayed by ANTARES: ZTF is their source, the candid their id, as ztf.parse gives them.
    assert [(p.source, p.measurement_id) for p in a.photometry] == [("ztf", None), ("ztf", "1234567890")]
    assert a.fields["broker"] == "antares"
    assert a.fields["tags"] == ["nuclear_transient"]
    assert parse_message("auto", data)[0].key == a.key
    broken = zlib.compress(bson.encode({"data": {"id": "x", "attributes": {"ra": 1.0, "dec": 2.0}}}))
    with pytest.raises(ParseError, match="properties"):
        parse_message("antares", broken)


@needs_data
def test_hop_envelope_id_and_test_flag() -> None:
    notice = json.loads((DATA / "gcn/gcn-schema-v7.2.1/gcn/notices/icecube/"
                         "single_neutrino_alerts.gold_bronze_track_alerts.example.json").read_text())
    env = {"_id": "6f1c0a4e-0000-4000-8000-000000000001", "format": "json", "content": notice}
    (a,) = parse_message("hop", json.dumps(env).encode())
    assert a.key == env["_id"] and a.source == "hop" and a.ra == pytest.approx(345.82)
    assert parse_message("hop", json.dumps({**env, "_test": True}).encode()) == []
    voe = (DATA / "gcn/voevent/skyportal/SWIFT_1125809-092.xml").read_text()
    (v,) = parse_message("hop", json.dumps({"format": "voevent", "content": voe}).encode())
    assert v.fields["inner_key"].startswith("ivo://nasa.gsfc.gcn/SWIFT")


@needs_data
@pytest.mark.parametrize(
    ("rel", "kind"),
    [
        (ZTF, "avro-ocf"),
        (RUBIN, "confluent-avro"),
        ("gcn/gcn-classic-binary/SWIFT_BAT_GRB_POS_ACK.bin", "gcn-binary"),
        ("gcn/gcn-classic-binary/LVC_UPDATE.bin", "gcn-binary"),
        ("gcn/voevent/skyportal/AMON.xml", "xml"),
        ("gcn/skyportal-json/EP240508.json", "json"),
        ("other/lasair/skyportal_lasair_lsst_stream_alerts.json", "json"),
    ],
)
def test_sniff(rel: str, kind: str) -> None:
    assert decode.sniff((DATA / rel).read_bytes()) == kind


def test_sniff_edge_cases() -> None:
    assert decode.sniff(b"") == "unknown"
    assert decode.sniff(b"\xef\xbb\xbf  {\"a\": 1}") == "json"
    assert decode.sniff(zlib.compress(b"x")) == "zlib"


# --- schemaless Avro with a published schema (the Fink livestream) ---------------------

FINK_AVSC = "other/fink/schemas/distribution_schema_fink_ztf_2.7_3.10.1.avsc"
FINK_PART = "other/fink/ztf/part-3-305711.avro"


def _fink_livestream(n: int = 5) -> tuple[decode.SchemaFile, list[dict], list[bytes]]:
    """Real Fink records as the livestream sends them: bare Avro under Fink's published schema."""
    schema = decode.load_schema_file(str(DATA / FINK_AVSC))
    records = list(fastavro.reader(io.BytesIO((DATA / FINK_PART).read_bytes())))[:n]
    messages = []
    for rec in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema.schema, rec)
        messages.append(buf.getvalue())
    return schema, records, messages


@needs_data
def test_fink_livestream_schemaless_avro_with_its_published_schema() -> None:
    schema, records, messages = _fink_livestream()
    assert decode.load_schema_file(str(DATA / FINK_AVSC)) is schema  # parsed once per file
    for rec, data in zip(records, messages):
        assert data[:4] != decode.OCF_MAGIC
        (a,) = parse_message("fink-avro", data, schema_file=schema)
        assert a.source == "fink" and a.key == str(rec["candid"]) and a.object_id == rec["objectId"]
        assert a.ra == pytest.approx(rec["candidate"]["ra"]) and a.fields["survey"] == "ztf"
        assert a.fields["cdsxmatch"] == rec["cdsxmatch"] and a.fields["broker"] == "fink"
        assert len(a.photometry) == 1 + len(rec["prv_candidates"] or [])
        # "auto" takes the stream's word for it: the first byte (a union branch, 0x00)
        # is not Confluent's magic byte here.
        assert decode.sniff(data) == "confluent-avro"
        (b,) = parse_message("auto", data, schema_file=schema)
        assert (b.source, b.key, b.photometry) == (a.source, a.key, a.photometry)
    with pytest.raises(DecodeError, match="needs the stream's schema_file"):
        parse_message("fink-avro", messages[0])
    with pytest.raises(DecodeError, match="if the stream carries schemaless Avro.*set its schema_file"):
        parse_message("auto", messages[0])
    with pytest.raises(DecodeError, match="left 2 of .* bytes unread"):
        parse_message("fink-avro", messages[0] + b"\x02\x04", schema_file=schema)
    with pytest.raises(DecodeError, match="does not match"):
        parse_message("fink-avro", messages[0][:100], schema_file=schema)
    # A container (Fink's data-transfer files) still reads as one, schema_file or not.
    ocf = (DATA / FINK_PART).read_bytes()
    assert len(parse_message("fink-avro", ocf, schema_file=schema)) == len(parse_message("fink-avro", ocf))


@needs_data
def test_parser_for_loads_the_schema_file_once_and_names_a_bad_one(tmp_path) -> None:
    from tomd.daemon import parser_for
    from tomd.errors import ConfigError

    _, records, messages = _fink_livestream(1)
    parse = parser_for("fink-avro", include_test=False, schema_file=str(DATA / FINK_AVSC))
    assert [a.key for a in parse(messages[0])] == [str(records[0]["candid"])]
    with pytest.raises(ConfigError, match="nope.avsc: No such file"):
        parser_for("fink-avro", include_test=False, schema_file=str(tmp_path / "nope.avsc"))


@needs_data
def test_fink_schema_in_the_message_key_as_fink_client_reads_it() -> None:
    from tomd.daemon import parser_for

    _, records, messages = _fink_livestream(2)
    key = (DATA / FINK_AVSC).read_bytes()  # the schema's JSON text, as Fink sends it
    parse = parser_for("fink-avro", include_test=False)  # no schema_file
    for rec, data in zip(records, messages):
        assert [a.key for a in parse(data, key=key)] == [str(rec["candid"])]
    assert decode.schema_from_key(key) is decode.schema_from_key(bytes(key))  # parsed once per key
    with pytest.raises(DecodeError, match="needs the stream's schema_file"):
        parse(messages[0], key=b"ZTF26aaakzsi")  # a key that is not a schema changes nothing
    with pytest.raises(DecodeError, match="message key is not an Avro schema"):
        parse(messages[0], key=b'{"type": "nosuchtype"}')
    ocf = (DATA / FINK_PART).read_bytes()  # containers keep their own schema
    assert len(parse(ocf, key=key)) == len(parse(ocf))


@needs_data
@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_fink_livestream_through_a_real_broker_into_targets(kafka_broker, make_topic, db) -> None:
    import threading
    import time

    from sqlalchemy import select

    from tomd.alerts.broker import LOCAL_GROUP_SETTINGS, produce
    from tomd.alerts.consumer import ConsumerSettings, StreamConsumer
    from tomd.alerts.ingest import IngestSettings, Ingestor
    from tomd.daemon import parser_for
    from tomd.db.models import AlertRow, DeadLetter

    _, records, messages = _fink_livestream(8)
    topic = make_topic(1)
    produce(kafka_broker.bootstrap, topic, messages)
    ingestor = Ingestor(db.sessions, IngestSettings(stream="fink", format="fink-avro"),
                        parser_for("fink-avro", include_test=False, schema_file=str(DATA / FINK_AVSC)))
    consumer = StreamConsumer(ConsumerSettings(bootstrap=kafka_broker.bootstrap, topics=[topic], group="fink",
                                               kafka=dict(LOCAL_GROUP_SETTINGS), batch_timeout_s=0.1), ingestor)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while ingestor.totals.messages < len(messages) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
    with db.sessions() as s:
        keys = set(s.scalars(select(AlertRow.key).where(AlertRow.source == "fink")))
        letters = s.scalars(select(DeadLetter.error)).all()
    assert letters == [] and keys == {str(r["candid"]) for r in records}


@needs_data
def test_the_ingestor_hands_the_message_key_to_the_parser(db) -> None:
    """End to end below the consumer: a Fink livestream message whose schema rides in its key
    is ingested (the Ingestor passes keys to parsers that take one)."""
    from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
    from tomd.daemon import parser_for

    _, records, messages = _fink_livestream(2)
    key = (DATA / FINK_AVSC).read_bytes()
    ing = Ingestor(db.sessions, IngestSettings(stream="fink", format="fink-avro"),
                   parser_for("fink-avro", include_test=False))
    res = ing.handle([FileMessage(f"m{i}", 0, data, key=key) for i, data in enumerate(messages)])
    assert res.alerts == len(records) and res.dead_letters == 0
    # A parser without a key parameter still works (keys are dropped for it).
    ing2 = Ingestor(db.sessions, IngestSettings(stream="fink2", format="fink-avro"),
                    lambda value: parser_for("fink-avro", include_test=False)(value, key=key))
    assert ing2.handle([FileMessage("n0", 0, messages[0], key=b"ignored")]).dead_letters == 0
