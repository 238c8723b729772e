"""Ingest: real packets into targets and photometry, idempotent, dead letters."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select

from tests.alert_samples import encode, next_alert, read_ztf, ztf_files
from tests.test_storage import s3_endpoint  # noqa: F401  (a moto S3 server fixture)
from tomd.alerts.decode import decode_avro_ocf
from tomd.alerts.formats import ztf
from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
from tomd.db import migrate, repository as repo
from tomd.db.models import AlertRow, DeadLetter, OutboxEvent, Photometry, Target, TargetName
from tomd.errors import RetryableError
from tomd.targets import store


def ztf_parser(data: bytes):
    return [a for rec in decode_avro_ocf(data) for a in ztf.parse(rec)]


def ingestor(db):
    return Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), ztf_parser)


def counts(db):
    with db.sessions() as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                for m in (AlertRow, Target, TargetName, Photometry, OutboxEvent, DeadLetter)}


def messages(paths):
    return [FileMessage(str(p), 0, p.read_bytes()) for p in paths]


def test_every_ztf_sample_is_ingested_once_and_replay_changes_nothing(db, shared_data):
    files = ztf_files()
    msgs = messages(files)
    ing = ingestor(db)
    for lo in range(0, len(msgs), 20):
        ing.handle(msgs[lo:lo + 20])
    first = counts(db)
    n_alerts = sum(len(decode_avro_ocf(m.value)) for m in msgs)
    assert first["alerts"] == n_alerts == ing.totals.alerts
    assert first["dead_letters"] == 0
    with db.sessions() as s:
        # Every alert found its target, named after its objectId.
        rows = s.execute(select(AlertRow.object_id, AlertRow.target_id)).all()
        for object_id, target_id in rows:
            assert store.resolve(s, object_id).id == target_id
        # Photometry holds every history point of every alert (no two alerts share an object here).
        expected_points = sum(len(a.photometry) for m in msgs for a in ztf_parser(m.value))
        assert first["photometry"] == expected_points
    # Replay: the same messages again, in other batch sizes.
    result = ing.handle(msgs)
    assert result.alerts == 0 and result.duplicates == n_alerts
    assert counts(db) == first


def test_overlapping_histories_store_each_point_once(db, shared_data):
    schema, (rec,) = read_ztf(ztf_files()[0])
    second = next_alert(schema, rec, new_candid=rec["candid"] + 1)
    third = next_alert(schema, second, new_candid=rec["candid"] + 2)
    ing = ingestor(db)
    for r in (rec, second, third):
        ing.handle([FileMessage("copy", r["candid"], encode(schema, [r]))])
    with db.sessions() as s:
        target = store.resolve(s, rec["objectId"])
        points = repo.photometry_of(s, target.id)
        alerts = repo.alerts_of(s, target.id)
    assert len(alerts) == 3
    # Third alert's history = first alert's history + 2 detections; nothing doubled.
    n_first = len(ztf_parser(encode(schema, [rec]))[0].photometry)
    assert len(points) == n_first + 2
    keys = [(p.band, p.kind, round(p.mjd, 6)) for p in points]
    assert len(keys) == len(set(keys))
    detections = [p for p in points if p.kind == "detection"]
    assert detections[-1].mag == pytest.approx(rec["candidate"]["magpsf"] - 0.6, abs=1e-4)


def test_the_bulk_ingest_writes_store_what_the_plain_inserts_store(db):
    """On PostgreSQL alerts, photometry and outbox events of the ingest path go by COPY:
    the rows read back exactly as through the plain inserts, a point already stored is
    skipped (also within one transaction), and the points keep their order."""
    from datetime import datetime, timedelta, timezone

    from tomd.events import AlertIngested
    from tomd.targets.model import TargetSpec, validate

    when = datetime(2026, 5, 1, 3, 4, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
    with db.sessions.begin() as s:
        tid = store.upsert(s, validate(TargetSpec(name="bulk", ra=10.0, dec=20.0)), radius_arcsec=1.5,
                           origin="test").target_id

        def alert(key, payload):
            return {"source": "ztf", "key": key, "stream": "s", "topic": "t", "partition": 1, "offset": 2**40,
                    "kind": "transient", "object_id": "ZTF26x", "target_id": tid, "notice_id": None, "time": when,
                    "ra": 10.0, "dec": 20.0, "band": "ztfg", "mag": 18.5, "mag_err": None, "flux": 1.5e3,
                    "flux_err": 2.0, "fields": {"rb": 0.9, "tab\there": "quote \" back\\slash é"},
                    "payload": payload}

        plain = repo.insert_alerts(s, [alert("a1", {"x": [1, None, "y"]}), alert("a2", None)])
        bulk = repo.ingest_alerts(s, [alert("b1", {"x": [1, None, "y"]}), alert("b2", None)])
        assert len(set(plain + bulk)) == 4

        def point(mjd, dedupe=None):
            return {"target_id": tid, "alert_id": bulk[0], "source": "ztf", "mjd": mjd, "band": "ztfg",
                    "kind": "detection", "mag": 19.0, "mag_err": 0.1, "flux": None, "flux_err": None,
                    "limit": None, "dedupe": dedupe or f"ztf|ztfg|detection|{mjd:.6f}"}

        repo.ingest_photometry(s, [point(60001.5), point(60000.5), point(60001.5)])
        repo.ingest_photometry(s, [point(60000.5), point(60002.5)])  # same transaction: emptied in between
        repo.ingest_events(s, [(AlertIngested(bulk[0], "ztf", "b1", tid, "ZTF26x", when.isoformat(), 10.0, 20.0,
                                              18.5, "ztfg", "t[1]@2"), tid)])
        repo.add_events(s, [(AlertIngested(plain[0], "ztf", "a1", tid, "ZTF26x", when.isoformat(), 10.0, 20.0,
                                           18.5, "ztfg", "t[1]@2"), tid)])
    with db.sessions.begin() as s:
        repo.ingest_photometry(s, [point(60002.5), point(60003.5)])  # a later transaction
    with db.sessions() as s:
        rows = {r.key: r for r in s.scalars(select(AlertRow))}
        skip = ("id", "key", "ingested_at", "_sa_instance_state")
        for a, b in (("a1", "b1"), ("a2", "b2")):
            pa = {k: v for k, v in vars(rows[a]).items() if k not in skip}
            pb = {k: v for k, v in vars(rows[b]).items() if k not in skip}
            assert pa == pb
        assert rows["b1"].time == when and rows["b1"].fields["tab\there"] == "quote \" back\\slash é"
        assert rows["b2"].payload is None
        points = s.scalars(select(Photometry).order_by(Photometry.id)).all()
        assert [p.mjd for p in points] == [60001.5, 60000.5, 60002.5, 60003.5]
        events = s.scalars(select(OutboxEvent).where(OutboxEvent.kind == "alert.ingested")
                           .order_by(OutboxEvent.id)).all()
        assert events[0].payload == events[1].payload | {"alert_id": bulk[0], "key": "b1"}
        assert events[0].created_at.tzinfo is not None and events[0].target_id == tid


def test_corrupt_message_goes_to_dead_letters_and_the_stream_goes_on(db, shared_data):
    good = messages(ztf_files()[:3])
    bad = FileMessage("topic-x[0]", 7, b"Obj\x01garbage that is not avro", key=b"k1", topic="ztf_test",
                      partition=2, offset=41)
    truncated = FileMessage("f", 0, good[0].value[: len(good[0].value) // 2], topic="ztf_test", partition=2,
                            offset=42)
    result = ingestor(db).handle([good[0], bad, truncated, good[1], good[2]])
    assert result.alerts == 3 and result.dead_letters == 2
    with db.sessions() as s:
        dls = repo.dead_letters(s)
        assert [(d.topic, d.partition, d.offset) for d in dls] == [("ztf_test", 2, 41), ("ztf_test", 2, 42)]
        assert dls[0].raw == bad.value and dls[0].key == b"k1" and dls[0].error
        kinds = [k for (k,) in s.execute(select(OutboxEvent.kind))]
        assert kinds.count("alert.dead_lettered") == 2 and kinds.count("alert.ingested") == 3


def test_database_down_is_retryable_and_commits_nothing(tmp_path, shared_data):
    engine = migrate.connect("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    ing = Ingestor(migrate.sessions(engine), IngestSettings(stream="ztf", format="ztf-avro"), ztf_parser)
    with pytest.raises(RetryableError, match="database"):
        ing.handle(messages(ztf_files()[:2]))


def test_dead_letters_are_ingested_after_a_fix(db, shared_data):
    from tomd.alerts.ingest import retry_dead_letters
    from tomd.errors import ParseError

    def broken(data):  # a parser with a bug, as deployed before the fix
        raise ParseError("candidate.fid: unexpected value 4")

    msgs = messages(ztf_files()[:4])
    Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), broken).handle(msgs)
    assert counts(db)["dead_letters"] == 4 and counts(db)["alerts"] == 0

    def settings_for(stream, fmt):
        return IngestSettings(stream=stream, format=fmt)

    still = retry_dead_letters(db.sessions, lambda st: broken, settings_for)
    assert (still.retried, still.resolved, still.still_failing) == (4, 0, 4)
    fixed = retry_dead_letters(db.sessions, lambda st: ztf_parser, settings_for)
    assert (fixed.retried, fixed.resolved, fixed.still_failing) == (4, 4, 0)
    assert counts(db)["alerts"] == 4
    with db.sessions() as s:
        assert repo.dead_letters(s) == []
        assert all(d.retries == 2 for d in repo.dead_letters(s, unresolved_only=False))
    assert retry_dead_letters(db.sessions, lambda st: ztf_parser, settings_for).retried == 0


@pytest.mark.parametrize("known", [False, True])
def test_solar_system_alerts_join_the_named_target_never_by_position(db, shared_data, known):
    from tomd.alerts.parse import parse_message
    from tomd.targets.model import TargetSpec

    path = shared_data / "lsst/fink-broker-rubin_test_data_9_0/169298432645136561_169298432645136561.avro"
    (alert,) = parse_message("auto", path.read_bytes())
    assert alert.kind == "solar_system"
    ss_name = f"ssObject {alert.fields['ssObjectId']}"
    with db.sessions.begin() as s:
        # A sidereal target right at the alert's position must not capture it.
        store.upsert(s, TargetSpec("field star", ra=alert.ra, dec=alert.dec))
        if known:
            store.upsert(s, TargetSpec("2011 XY1", scheme="MPC_MINOR_PLANET", epochofel=60900.0, orbinc=5.0,
                                       longascnode=10.0, argofperih=20.0, meandist=2.7, eccentricity=0.1,
                                       meananom=30.0, aliases=(ss_name,)))
    ing = Ingestor(db.sessions, IngestSettings(stream="rubin", format="auto"), lambda d: parse_message("auto", d))
    ing.handle(messages([path]))
    with db.sessions() as s:
        row = s.scalars(select(AlertRow)).one()
        if known:
            assert row.target_id == store.resolve(s, "2011 XY1").id
            assert len(repo.photometry_of(s, row.target_id)) == len(alert.photometry)
        else:
            assert row.target_id is None
        assert store.resolve(s, "field star").id != row.target_id


def test_a_message_the_database_refuses_is_dead_lettered_not_retried_forever(db, shared_data):
    """PostgreSQL refuses NUL characters in JSON text; SQLite stores them."""
    schema, (rec,) = read_ztf(ztf_files()[0])
    bad = dict(rec, candidate={**rec["candidate"], "ssnamenr": "bad\x00name"})
    good = [FileMessage("f", i, p.read_bytes()) for i, p in enumerate(ztf_files()[1:4])]
    msgs = [good[0], FileMessage("bad", 0, encode(schema, [bad]), topic="ztf_x", partition=0, offset=7), *good[1:]]
    result = ingestor(db).handle(msgs)
    if db.kind == "postgresql":
        assert (result.messages, result.alerts, result.dead_letters, result.duplicates) == (4, 3, 1, 0)
        with db.sessions() as s:
            (dl,) = repo.dead_letters(s)
        assert (dl.topic, dl.offset) == ("ztf_x", 7) and "database refused it" in dl.error
    else:
        assert (result.alerts, result.dead_letters) == (4, 0)


# --- notices (GCN, LVK): identity, matching, refinement order ---------------------------

GCN_JSON = "gcn/gcn-schema-v7.2.1/gcn/notices/"


def gcn_record(shared_data, path: str, **changes) -> bytes:
    import json

    rec = json.loads((shared_data / GCN_JSON / path).read_text())
    rec.update(changes)
    return json.dumps(rec).encode()


def notice_ingestor(db, fmt: str = "gcn-json", **settings):
    from tomd.alerts.parse import parse_message

    return Ingestor(db.sessions, IngestSettings(stream="gcn", format=fmt, **settings),
                    lambda d: parse_message(fmt, d, include_test=True))


def notices(db):
    from tomd.db.models import Notice

    with db.sessions() as s:
        return {n.event_id: n for n in s.scalars(select(Notice)).all()}


@pytest.mark.parametrize("err, max_deg", [(0.08, 0.1), (0.5, 0.5)])
def test_a_notice_never_captures_an_unrelated_target_inside_its_error_circle(db, shared_data, err, max_deg):
    """B1: a supernova 2.8' from a GRB position is not the burst, whatever the error circle."""
    from tomd.targets.model import TargetSpec

    with db.sessions.begin() as s:
        sn = store.upsert(s, TargetSpec("SN 2026xyz", ra=10.05, dec=20.0)).target_id
    data = gcn_record(shared_data, "swift/bat/guano.loc_arc_min.example.json", ra=10.0, dec=20.0,
                      ra_dec_error=err)
    notice_ingestor(db, localization_max_deg=max_deg).handle([FileMessage("guano", 0, data)])
    (n,) = notices(db).values()
    assert n.event_id == "swift:694215995" and n.error_deg == pytest.approx(err)
    assert n.target_id is not None and n.target_id != sn
    with db.sessions() as s:
        assert store.resolve(s, "GCN swift 694215995").id == n.target_id
        assert [x.name for x in s.scalars(select(TargetName).where(TargetName.target_id == sn))] == ["SN 2026xyz"]
        t = s.get(Target, n.target_id)
        assert (t.ra, t.dec) == (pytest.approx(10.0), pytest.approx(20.0))


def test_a_later_notice_of_the_same_event_joins_its_target_by_name(db, shared_data):
    """The XRT position (5") of a Swift trigger lands 1.4' from the BAT one: same target, by name."""
    base = shared_data / "gcn/voevent/skyportal"
    ing = notice_ingestor(db, "gcn-voevent", localization_max_deg=0.1)
    ing.handle([FileMessage(str(base / "SWIFT_1125809-092.xml"), 0, (base / "SWIFT_1125809-092.xml").read_bytes())])
    ing.handle([FileMessage(str(base / "SWIFT_1125809-104.xml"), 0, (base / "SWIFT_1125809-104.xml").read_bytes())])
    (n,) = notices(db).values()
    assert n.event_id == "swift:1125809" and n.notice_type == "SWIFT_XRT_POSITION"
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Target)) == 1
        assert {a.notice_id for a in s.scalars(select(AlertRow))} == {n.id}
        # The target moved to the better (XRT) position, and is found there by a cone search.
        t = s.get(Target, n.target_id)
        assert (t.ra, t.dec) == (pytest.approx(n.ra), pytest.approx(n.dec))
        assert [tid for tid, _ in store.cone(s, n.ra, n.dec, 1.0)] == [t.id]
        bat = notice_ingestor(db, "gcn-voevent").parser((base / "SWIFT_1125809-092.xml").read_bytes())[0]
        assert store.cone(s, bat.ra, bat.dec, 5.0) == [] and store.cone(s, bat.ra, bat.dec, 300.0)


def test_notices_of_different_missions_with_the_same_trigger_number_are_two_events(db, shared_data):
    """B2: trigger numbers are per mission."""
    swift = gcn_record(shared_data, "swift/bat/guano.loc_arc_min.example.json")
    icecube = gcn_record(shared_data, "icecube/single_neutrino_alerts.gold_bronze_track_alerts.example.json",
                         id=["694215995"])
    notice_ingestor(db).handle([FileMessage("swift", 0, swift), FileMessage("icecube", 0, icecube)])
    got = notices(db)
    assert set(got) == {"swift:694215995", "icecube:694215995"}
    assert (got["swift:694215995"].ra, got["icecube:694215995"].ra) == (pytest.approx(336.26), pytest.approx(345.82))
    with db.sessions() as s:
        rows = {a.key.split("/")[0]: a.notice_id for a in s.scalars(select(AlertRow))}
    assert rows == {"swift": got["swift:694215995"].id, "icecube": got["icecube:694215995"].id}


@pytest.mark.parametrize("batches", ["one batch", "two batches"])
def test_an_older_notice_arriving_late_does_not_overwrite_the_refinement(db, shared_data, batches):
    """B2: Fermi GBM ground1 (issued 02:16:11, 1.34°) then flight1 (02:14:56, 8.32°) arriving late."""
    ground = FileMessage("ground1", 0, gcn_record(shared_data, "fermi/gbm/trigger.ground1.example.json"))
    flight = FileMessage("flight1", 0, gcn_record(shared_data, "fermi/gbm/trigger.flight1.example.json"))
    ing = notice_ingestor(db)
    if batches == "one batch":
        ing.handle([ground, flight])
    else:
        ing.handle([ground])
        ing.handle([flight])
    (n,) = notices(db).values()
    assert (n.ra, n.dec, n.error_deg) == (pytest.approx(92.17), pytest.approx(-66.98), pytest.approx(1.34))
    assert counts(db)["alerts"] == 2  # both kept as alerts of the notice
    # In order, the later one refines.
    final = FileMessage("final", 0, gcn_record(shared_data, "fermi/gbm/trigger.final.example.json", ra=93.0,
                                               dec=-67.5, ra_dec_error=0.9))
    ing.handle([final])
    (n,) = notices(db).values()
    assert (n.ra, n.dec, n.error_deg) == (pytest.approx(93.0), pytest.approx(-67.5), pytest.approx(0.9))


def test_a_retraction_applies_even_when_issued_before_the_last_update(db, shared_data):
    update = FileMessage("upd", 0, gcn_record(shared_data, "swift/bat/guano.loc_arc_min.example.json"))  # 05:33
    retraction = FileMessage("ret", 0, gcn_record(shared_data, "swift/bat/Guano.Retraction.example.json"))  # 03:24
    notice_ingestor(db).handle([update])
    notice_ingestor(db).handle([retraction])
    (n,) = notices(db).values()
    assert n.retracted and n.ra == pytest.approx(336.26)


# --- dead letters: one per message, however often it comes -----------------------------


def dead_lettered_events(db) -> int:
    with db.sessions() as s:
        return s.scalar(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.kind == "alert.dead_lettered"))


def test_a_bad_message_delivered_again_is_one_dead_letter(db, shared_data):
    """B3: replaying a bad file (under another name) or a Kafka redelivery adds no letter and no event."""
    from tomd.alerts.consumer import RawMessage

    bad = b"Obj\x01garbage that is not avro"
    ing = ingestor(db)
    assert ing.handle([FileMessage("/data/a.avro", 0, bad)]).dead_letters == 1
    assert ing.handle([FileMessage("/elsewhere/copy.avro", 0, bad)]).dead_letters == 0
    kafka = RawMessage("ztf_x", 3, 17, b"k", bad, None, (("origin", b"ztf"),))
    assert ing.handle([kafka]).dead_letters == 1
    assert ingestor(db).handle([kafka, FileMessage("again", 1, bad)]).dead_letters == 0  # a restarted daemon
    assert counts(db)["dead_letters"] == 2 and dead_lettered_events(db) == 2
    with db.sessions() as s:
        file_dl, kafka_dl = repo.dead_letters(s)
    import hashlib

    assert file_dl.fingerprint == "sha256:" + hashlib.sha256(bad).hexdigest() and file_dl.topic == "/data/a.avro#0"
    assert kafka_dl.fingerprint == "ztf_x[3]@17" and kafka_dl.headers == [["origin", "enRm"]]
    # Another stream's letter of the same bytes is its own.
    other = Ingestor(db.sessions, IngestSettings(stream="other", format="ztf-avro"), ztf_parser)
    assert other.handle([FileMessage("/data/a.avro", 0, bad)]).dead_letters == 1


def test_a_database_outage_partway_through_the_one_by_one_pass_doubles_nothing(db, shared_data):
    """B3: the batch is applied again after a RetryableError; letters already written are not written twice."""
    from sqlalchemy.exc import OperationalError

    schema, (rec,) = read_ztf(ztf_files()[0])
    nul = FileMessage("nul", 0, encode(schema, [dict(rec, candidate={**rec["candidate"], "ssnamenr": "bad\x00"})]),
                      topic="ztf_x", partition=0, offset=7)
    garbage = FileMessage("g", 0, b"not avro at all", topic="ztf_x", partition=0, offset=8)
    good = messages(ztf_files()[1:3])
    calls = {"n": 0}

    def flaky_sink(s, stored):  # the database goes away while the third message is applied
        calls["n"] += 1
        if calls["n"] == 3 and db.kind == "postgresql":
            raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"), ztf_parser, sinks=[flaky_sink])
    batch = [garbage, nul, *good]
    if db.kind == "postgresql":
        with pytest.raises(RetryableError):
            ing.handle(batch)  # batch refused (NUL) → one by one → outage on a good message
        assert counts(db)["dead_letters"] == 2
    ing.handle(batch)  # the consumer applies the batch again
    again = ing.handle(batch)  # and once more (a redelivery)
    assert again.dead_letters == 0 and again.alerts == 0
    letters = 2 if db.kind == "postgresql" else 1  # SQLite stores the NUL
    assert counts(db)["dead_letters"] == letters and dead_lettered_events(db) == letters
    assert counts(db)["alerts"] == 4 - letters


def test_retry_parses_a_letter_with_its_kafka_headers_and_the_streams_include_test(db, shared_data):
    """B3: hop keeps the message id in Kafka headers; a retry must see them, and the stream's include_test."""
    import uuid

    from tomd.alerts.consumer import RawMessage
    from tomd.alerts.ingest import retry_dead_letters
    from tomd.alerts.parse import parse_message
    from tomd.errors import ParseError

    def broken(data):
        raise ParseError("hop: unsupported")

    content = (shared_data / GCN_JSON / "icecube/single_neutrino_alerts.gold_bronze_track_alerts.example.json")
    mid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    real = RawMessage("hop.gcn", 0, 5, None, content.read_bytes(), None,
                      (("_id", mid.bytes), ("_test", b"false"), ("_format", b"json")))
    test = RawMessage("hop.gcn", 0, 6, None, content.read_bytes(), None,
                      (("_id", uuid.uuid4().bytes), ("_test", b"true"), ("_format", b"json")))
    Ingestor(db.sessions, IngestSettings(stream="hop", format="hop"), broken).handle([real, test])
    with db.sessions() as s:
        assert [d.headers[0][0] for d in repo.dead_letters(s)] == ["_id", "_id"]

    def parser_for(st):
        return lambda d: parse_message(st.format, d, include_test=st.include_test)

    res = retry_dead_letters(db.sessions, parser_for, lambda stream, fmt: IngestSettings(stream, fmt, include_test=True))
    assert (res.resolved, res.still_failing) == (2, 0)
    with db.sessions() as s:
        rows = {a.key: a for a in s.scalars(select(AlertRow))}
    assert mid.hex in rows and len(rows) == 2  # the header's id, as on the stream; the test event kept


# --- cutouts and position errors ----------------------------------------------------------


@pytest.mark.parametrize("backend, store_cutouts", [("local", True), ("s3", True), ("local", False)])
def test_ztf_cutouts_are_stored_as_data_products_under_the_target(db, shared_data, tmp_path, request, backend,
                                                                   store_cutouts):
    """B4: the stamps ZTF sends with each alert are kept, once per (alert, cutout)."""
    from tomd.db.models import DataProduct
    from tomd.storage import LocalStore, S3Store

    if backend == "s3":  # moto on loopback: the batch's PUTs go concurrently, each with its Content-MD5
        from tests.test_storage import new_bucket

        endpoint = request.getfixturevalue("s3_endpoint")
        storage = S3Store(new_bucket(endpoint), "tomd", endpoint_url=endpoint, region="us-east-1")
    else:
        storage = LocalStore(tmp_path / "store")
    msgs = messages(ztf_files()[:5])
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro", store_cutouts=store_cutouts),
                   ztf_parser, storage=storage)
    ing.handle(msgs)
    ing.handle(msgs)  # a replay stores nothing again
    alerts = [a for m in msgs for a in ztf_parser(m.value)]
    with db.sessions() as s:
        products = s.scalars(select(DataProduct).order_by(DataProduct.id)).all()
        if not store_cutouts:
            assert products == [] and list(storage.keys()) == []
            return
        assert len(products) == sum(len(a.cutouts) for a in alerts) == 3 * len(alerts)
        assert ing.totals.cutouts == len(products)
        for a in alerts:
            target = store.resolve(s, a.object_id)
            mine = {p.meta["cutout"]: p for p in products if p.meta["alert_key"] == a.key}
            assert set(mine) == {"science", "template", "difference"}
            for name, p in mine.items():
                assert p.kind == "cutout" and p.state == "stored" and p.target_id == target.id
                assert p.storage_key.startswith(f"{target.id}-{a.object_id}/ztf/cutouts/{a.key}-{name}.fits")
                with storage.open(p.storage_key) as f:
                    assert f.read() == a.cutouts[name]
                assert (p.size, p.md5) == (len(a.cutouts[name]), hashlib.md5(a.cutouts[name]).hexdigest())
                assert p.attempts == 0 and p.error is None and p.stored_at is not None
                assert p.meta["object_id"] == a.object_id and p.filename == p.storage_key.rsplit("/", 1)[1]
    assert sorted(storage.keys()) == sorted(p.storage_key for p in products)


def test_position_errors_are_kept_in_the_alert_fields(db, shared_data):
    from tomd.alerts.parse import parse_message

    path = next((shared_data / "lsst/fink-broker-rubin_test_data_9_0").glob("*.avro"))
    ing = Ingestor(db.sessions, IngestSettings(stream="rubin", format="auto"), lambda d: parse_message("auto", d))
    ing.handle(messages([path]))
    (alert,) = parse_message("auto", path.read_bytes())
    assert alert.ra_err_arcsec is not None
    with db.sessions() as s:
        row = s.scalars(select(AlertRow)).one()
    assert row.fields["ra_err_arcsec"] == pytest.approx(alert.ra_err_arcsec)
    assert row.fields["dec_err_arcsec"] == pytest.approx(alert.dec_err_arcsec)


# --- LVK skymaps: the 90% area ------------------------------------------------------------


def direct_area_90(skymap: bytes) -> float:
    """The 90% credible area by another route: the density threshold found by bisection."""
    import io

    import numpy as np
    from astropy.table import Table

    t = Table.read(io.BytesIO(skymap), format="fits")
    uniq, rho = np.asarray(t["UNIQ"]), np.asarray(t["PROBDENSITY"])
    order = np.array([(int(u).bit_length() - 3) // 2 for u in uniq])
    area = 4 * np.pi / (12 * 4.0 ** order)
    prob = rho * area
    lo, hi = 0.0, float(rho.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prob[rho >= mid].sum() >= 0.9 * prob.sum() else (lo, mid)
    return float(area[rho >= lo].sum()) * (180 / np.pi) ** 2


@pytest.mark.parametrize("path, expected", [("lvk/userguide-examples/MS181101ab-preliminary.avro", 30.99),
                                            ("lvk/skyportal/igwn_gwalert_preliminary.json", 7.75)])
def test_lvk_notices_get_the_90_percent_area_of_their_skymap(db, shared_data, path, expected):
    from tomd.alerts.parse import parse_message

    fmt = "lvk-avro" if path.endswith(".avro") else "lvk-json"
    data = (shared_data / path).read_bytes()
    (alert,) = parse_message(fmt, data, include_test=True)
    direct = direct_area_90(alert.localization.skymap)
    assert direct == pytest.approx(expected, abs=0.01)
    assert alert.localization.area_90_deg2 == pytest.approx(direct, rel=1e-9)
    notice_ingestor(db, fmt, include_test=True).handle([FileMessage(path, 0, data)])  # mock events
    (n,) = notices(db).values()
    assert n.area_90_deg2 == pytest.approx(direct, rel=1e-9)
    assert n.target_id is None  # tens of square degrees: an event, not a target


@pytest.mark.parametrize("max_deg", [1.0, 2.0])
def test_a_small_enough_skymap_becomes_a_target_at_its_most_probable_direction(db, shared_data, max_deg):
    """MS260605l's 90% area is 7.75 deg²: smaller than a 2° circle's (12.6 deg²), larger than a 1° one's."""
    import math

    data = (shared_data / "lvk/skyportal/igwn_gwalert_preliminary.json").read_bytes()
    notice_ingestor(db, "lvk-json", localization_max_deg=max_deg, include_test=True).handle([FileMessage("a", 0, data)])
    n = notices(db)["MS260605l"]
    assert n.error_deg is None and n.area_90_deg2 == pytest.approx(7.75, abs=0.01)
    if max_deg == 1.0:
        assert n.target_id is None
        return
    with db.sessions() as s:
        t = s.get(Target, n.target_id)
    assert t.name == "LVK MS260605l" and (t.ra, t.dec) == (pytest.approx(n.ra), pytest.approx(n.dec))
    # The most probable pixel lies in the map's 90% region, whose pixels cluster within a few degrees.
    assert (n.ra, n.dec) == (pytest.approx(307.86, abs=0.01), pytest.approx(8.76, abs=0.01))
    assert math.isfinite(n.ra)


def test_cli_retry_dead_letters_parses_with_the_streams_include_test(db, shared_data, tmp_path, monkeypatch, capsys):
    """B3: `tomd alert retry-dead-letters` builds each stream's parser with its own include_test."""
    from tomd.cli import main
    from tomd.errors import ParseError

    cfg = tmp_path / "tomd.toml"
    cfg.write_text(f'[database]\nurl = "{db.url}"\n[storage]\nurl = "file://{tmp_path}/data"\n'
                   f'[rules]\npaths = ["{tmp_path}/rules"]\n[hooks]\npaths = ["{tmp_path}/hooks"]\n'
                   '[metrics]\nlisten = "127.0.0.1:0"\n'
                   '[[streams]]\nname = "gcn"\nbootstrap = "127.0.0.1:9"\ntopics = ["gcn.notices"]\n'
                   'format = "gcn-json"\ninclude_test = true\n')
    monkeypatch.setenv("TOMD_CONFIG", str(cfg))

    def broken(data):
        raise ParseError("not yet")

    real = gcn_record(shared_data, "superk/sn_alert.real.example.json")
    test = gcn_record(shared_data, "superk/sn_alert.test.example.json")
    Ingestor(db.sessions, IngestSettings(stream="gcn", format="gcn-json"), broken).handle(
        [FileMessage("real", 0, real), FileMessage("test", 0, test)])
    assert main(["alert", "retry-dead-letters"]) == 0
    assert "2 dead letters retried: 2 ingested" in capsys.readouterr().out
    with db.sessions() as s:
        tests = sorted(a.fields.get("alert_tense") for a in s.scalars(select(AlertRow)))
    assert tests == ["current", "test"]  # the stream asks for test events: the test notice is kept


def test_hop_headers_are_read_under_auto_too(db, shared_data):
    """hop-client >= 0.8 sends the content bare with _id/_test/_format headers; a stream left on
    format "auto" must still dedupe by _id and skip _test messages."""
    import uuid

    from tomd.alerts.consumer import RawMessage
    from tomd.daemon import parser_for

    content = (shared_data / GCN_JSON / "icecube/single_neutrino_alerts.gold_bronze_track_alerts.example.json")
    mid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    real = RawMessage("hop.gcn", 0, 5, None, content.read_bytes(), None,
                      (("_id", mid.bytes), ("_test", b"false"), ("_format", b"json")))
    again = RawMessage("hop.gcn", 0, 9, None, content.read_bytes(), None,
                       (("_id", mid.bytes), ("_test", b"false"), ("_format", b"json")))
    test = RawMessage("hop.gcn", 0, 6, None, content.read_bytes(), None,
                      (("_id", uuid.uuid4().bytes), ("_test", b"true"), ("_format", b"json")))
    ing = Ingestor(db.sessions, IngestSettings(stream="scimma", format="auto"), parser_for("auto", include_test=False))
    r = ing.handle([real, test, again])
    assert (r.alerts, r.skipped_test, r.duplicates, r.dead_letters) == (1, 1, 1, 0)
    with db.sessions() as s:
        (row,) = s.scalars(select(AlertRow))
    assert (row.source, row.key) == ("hop", mid.hex)
