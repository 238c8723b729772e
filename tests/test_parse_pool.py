"""Parsing in a worker process (tomd/alerts/parallel.py): the same rows as parsing in the stream
thread, chunk after chunk in one transaction, and a worker that dies costs nothing."""

from __future__ import annotations

import os
import signal

import pytest
from sqlalchemy import func, select

from tests.alert_samples import ztf_files
from tomd.alerts.model import payload_dict
from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
from tomd.alerts.parallel import ParsePool, ParserRecipe
from tomd.daemon import parser_for
from tomd.db import repository as repo
from tomd.db.models import AlertRow, DeadLetter, OutboxEvent, Photometry, Target, TargetName


def _pool(**kw) -> ParsePool:
    pool = ParsePool(ParserRecipe("ztf-avro", **kw))
    pool.FIRST_CHUNK, pool.CHUNK = 4, 9  # many chunks from a few dozen messages
    return pool


def _ingestor(db, pool=None) -> Ingestor:
    return Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"),
                    parser_for("ztf-avro", include_test=False), parse_pool=pool)


def _batch():
    files = ztf_files()
    if not files:
        pytest.skip("real ZTF samples not found")
    msgs = [FileMessage(str(p), 0, p.read_bytes(), topic="ztf", partition=0, offset=i) for i, p in enumerate(files)]
    # A truncated packet in the middle and a redelivered one at the end.
    bad = FileMessage("bad", 0, files[0].read_bytes()[:300], topic="ztf", partition=0, offset=9999)
    return msgs[:10] + [bad] + msgs[10:] + [msgs[3]]


def _state(db):
    with db.sessions() as s:
        counts = {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                  for m in (AlertRow, Target, TargetName, Photometry, OutboxEvent, DeadLetter)}
        keys = {r.key: (r.payload, r.fields, r.mag) for r in s.scalars(select(AlertRow))}
        letters = [(d.offset, d.error) for d in repo.dead_letters(s)]
    return counts, keys, letters


@pytest.fixture
def pool():
    p = _pool()
    yield p
    p.close()


def _empty(db) -> None:
    from sqlalchemy import text

    from tomd.db.models import Base

    with db.engine.begin() as c:
        if db.kind == "postgresql":
            c.execute(text("TRUNCATE " + ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
                           + " RESTART IDENTITY CASCADE"))
        else:
            for t in reversed(Base.metadata.sorted_tables):
                c.execute(t.delete())


def test_a_worker_gives_the_rows_the_stream_thread_gives(db, pool):
    batch = _batch()
    here = _ingestor(db).handle(batch)
    expected = _state(db)
    _empty(db)
    there = _ingestor(db, pool).handle(batch)
    assert len(pool.chunks(len(batch))) > 3
    assert (there.alerts, there.duplicates, there.dead_letters) == (here.alerts, here.duplicates, here.dead_letters)
    assert (here.dead_letters, here.duplicates) == (1, 1)
    assert _state(db) == expected
    assert expected[2][0][0] == 9999 and expected[0]["alerts"] == here.alerts > 50


def test_a_worker_killed_mid_stream_costs_no_alert(db, pool, caplog):
    batch = _batch()
    ing = _ingestor(db, pool)
    pool.start()
    (pid,) = list(pool._pool._processes)  # the one worker
    os.kill(pid, signal.SIGKILL)
    first = ing.handle(batch[:20])  # parsed in the stream thread: the worker is gone
    assert pool.restarts == 1 and "parse worker died" in caplog.text
    second = ing.handle(batch[20:])  # a new worker
    assert pool.restarts == 1 and pool._pool is not None and pid not in pool._pool._processes
    reference = _ingestor(db).handle(batch)  # everything is stored already: all duplicates
    # (+1: the redelivered message at the end of the batch)
    assert reference.alerts == 0 and reference.duplicates == first.alerts + second.alerts + 1
    assert (first.dead_letters, second.duplicates) == (1, 1)


def test_cutouts_come_back_only_when_kept():
    files = ztf_files()
    if not files:
        pytest.skip("real ZTF samples not found")
    msgs = [FileMessage(str(p), 0, p.read_bytes()) for p in files[:6]]
    for keep in (True, False):
        pool = _pool(keep_cutouts=keep)
        try:
            got = [a for chunk in pool.parse(msgs, None) for _, alerts, _ in chunk for a in alerts]
        finally:
            pool.close()
        assert len(got) == 6
        assert all(bool(a.cutouts) is keep for a in got)
        assert all(a.payload and a.photometry for a in got)


def test_rules_read_the_payload_a_worker_sends_as_json():
    from tomd.alerts.model import PayloadJson
    from tomd.alerts.parse import parse_message
    from tomd.rules.context import AlertView

    files = ztf_files()
    if not files:
        pytest.skip("real ZTF samples not found")
    msgs = [FileMessage(str(p), 0, p.read_bytes()) for p in files[:5]]
    pool = _pool(keep_cutouts=False)
    try:
        got = [a for chunk in pool.parse(msgs, None) for _, alerts, _ in chunk for a in alerts]
    finally:
        pool.close()
    here = [a for m in msgs for a in parse_message("ztf-avro", m.value)]
    assert all(isinstance(a.payload, PayloadJson) for a in got)
    for a, b in zip(got, here):
        view = AlertView(a, 1)
        assert view.payload == payload_dict(b.payload) and view.payload["candidate"]["candid"] == int(b.key)


def test_a_row_the_database_refuses_mid_batch_is_found_with_a_worker_too(db, pool):
    """PostgreSQL refuses a NUL in jsonb (the alert's fields): the batch, parsed by the worker in
    chunks, is applied message by message; the one refused is dead-lettered, the rest stored once."""
    from tests.alert_samples import encode, read_ztf

    if db.kind != "postgresql":
        pytest.skip("SQLite stores NUL characters")
    batch = _batch()[:20]
    schema, (rec,) = read_ztf(ztf_files()[0])
    bad = dict(rec, candid=rec["candid"] + 12345,  # a new alert, not a redelivery of the first file's
               candidate={**rec["candidate"], "candid": rec["candid"] + 12345, "ssnamenr": "bad\x00name"})
    batch.insert(15, FileMessage("bad", 0, encode(schema, [bad]), topic="ztf", partition=0, offset=777))
    r = _ingestor(db, pool).handle(batch)
    assert (r.messages, r.dead_letters, r.duplicates) == (len(batch), 2, 0)  # the truncated one and this
    with db.sessions() as s:
        assert sorted(d.offset for d in repo.dead_letters(s)) == [777, 9999]
        assert s.scalar(select(func.count()).select_from(AlertRow)) == r.alerts > 15
