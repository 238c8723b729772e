"""Ingest: real packets into targets and photometry, idempotent, dead letters."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.alert_samples import encode, next_alert, read_ztf, ztf_files
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

    still = retry_dead_letters(db.sessions, lambda fmt: broken, settings_for)
    assert (still.retried, still.resolved, still.still_failing) == (4, 0, 4)
    fixed = retry_dead_letters(db.sessions, lambda fmt: ztf_parser, settings_for)
    assert (fixed.retried, fixed.resolved, fixed.still_failing) == (4, 4, 0)
    assert counts(db)["alerts"] == 4
    with db.sessions() as s:
        assert repo.dead_letters(s) == []
        assert all(d.retries == 2 for d in repo.dead_letters(s, unresolved_only=False))
    assert retry_dead_letters(db.sessions, lambda fmt: ztf_parser, settings_for).retried == 0


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
        assert (result.alerts, result.dead_letters) == (3, 1)
        with db.sessions() as s:
            (dl,) = repo.dead_letters(s)
        assert (dl.topic, dl.offset) == ("ztf_x", 7) and "database refused it" in dl.error
    else:
        assert (result.alerts, result.dead_letters) == (4, 0)
