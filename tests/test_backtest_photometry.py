"""The backtest rebuilds stored alerts with the photometry each brought, in a few queries by target.

``repository.photometry_of_alert`` (one query per alert, a scan of the photometry table: alert_id
has no index) is the reference; ``photometry_of_alerts`` must give the same points in the same
order for every alert, on real ZTF packets with overlapping histories.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import event, select

from tests.alert_samples import encode, next_alert, read_ztf, ztf_files
from tomd.alerts.decode import decode_avro_ocf
from tomd.alerts.formats import ztf
from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
from tomd.alerts.model import PhotPoint
from tomd.db import repository as repo
from tomd.db.models import AlertRow, Photometry
from tomd.rules.cli import _alerts_from_db

SINCE = datetime(2000, 1, 1, tzinfo=timezone.utc)


class App:
    def __init__(self, db):
        self.sessions = db.sessions


def _series(file_index: int, n: int) -> tuple[dict, list[dict]]:
    """``n`` packets of one object a day apart, each carrying the previous ones' detections again."""
    schema, (rec,) = read_ztf(ztf_files()[file_index])
    out = [rec]
    for i in range(1, n):
        out.append(next_alert(schema, out[-1], new_candid=rec["candid"] + i, days_later=1.0, mag_change=-0.2))
    return schema, out


def _ingest(db, schema: dict, recs: list[dict]) -> list[int]:
    """Each packet in its own batch, as they arrive; their alert ids."""
    ing = Ingestor(db.sessions, IngestSettings(stream="ztf", format="ztf-avro"),
                   lambda d: [a for r in decode_avro_ocf(d) for a in ztf.parse(r)])
    ids = []
    for r in recs:
        res = ing.handle([FileMessage("x", 0, encode(schema, [r]))])
        ids.extend(res.alert_ids)
    return ids


def _points(rows) -> tuple[PhotPoint, ...]:
    """As the backtest makes them (tomd.rules.cli._alerts_from_db)."""
    return tuple(PhotPoint(mjd=p.mjd, band=p.band, kind=p.kind, mag=p.mag, mag_err=p.mag_err, flux=p.flux,
                           flux_err=p.flux_err, limit=p.limit, source=p.source) for p in rows)


def _reference(db, since: datetime = SINCE) -> dict[int, tuple[PhotPoint, ...]]:
    """Each stored alert's points, one query per alert (the old way)."""
    with db.sessions() as s:
        return {r.id: _points(repo.photometry_of_alert(s, r.id)) for r in repo.alerts_since(s, since)}


def _store_three_targets(db) -> dict[str, list[int]]:
    """A: 3 packets; B: 4, the last a copy of the 3rd under a new candid (all its points stored
    already: it brings none); C: 2, then C is deleted. A also has an uploaded point (no alert)."""
    schema, a = _series(0, 3)
    ids = {"A": _ingest(db, schema, a)}
    schema_b, b = _series(1, 3)
    again = dict(b[-1], candid=b[-1]["candid"] + 100)
    again["candidate"] = dict(b[-1]["candidate"], candid=again["candid"])
    ids["B"] = _ingest(db, schema_b, [*b, again])
    schema_c, c = _series(2, 2)
    ids["C"] = _ingest(db, schema_c, c)
    with db.sessions.begin() as s:
        t_a, t_b, t_c = (repo.get_alert(s, ids[k][0]).target_id for k in "ABC")
        assert len({t_a, t_b, t_c}) == 3
        repo.insert_photometry(s, [{"target_id": t_a, "alert_id": None, "source": "upload:x.csv", "mjd": 60000.5,
                                    "band": "r", "kind": "detection", "mag": 18.0, "mag_err": 0.1, "flux": None,
                                    "flux_err": None, "limit": None, "dedupe": "upload|r|60000.5"}])
        assert len(repo.photometry_of(s, t_c)) > 1  # C's points go with it (CASCADE)
        repo.delete_target(s, t_c)
    return ids


def test_rebuilt_alerts_bring_the_points_each_alert_stored(db, shared_data):
    ids = _store_three_targets(db)
    ref = _reference(db)
    assert sorted(ref) == sorted(i for v in ids.values() for i in v)
    # The histories overlap, so dedupe left later alerts only their new points; the fixture covers
    # an alert with several points, one of a live target with none, and those of a deleted target.
    # Each later packet carried the earlier detections again and stored only its new one.
    assert all(len(ref[i]) > 1 for i in ids["A"][:1] + ids["B"][:1])
    assert all(len(ref[i]) == 1 for i in ids["A"][1:] + ids["B"][1:3])
    assert ref[ids["B"][-1]] == ()
    assert [ref[i] for i in ids["C"]] == [(), ()]
    with db.sessions() as s:
        assert all(repo.get_alert(s, i).target_id is None for i in ids["C"])
        assert repo.get_alert(s, ids["B"][-1]).target_id is not None
        stored = sum(1 for _ in s.scalars(select(Photometry.id).where(Photometry.alert_id.is_not(None))))
    assert stored == sum(len(p) for p in ref.values())

    rebuilt = _alerts_from_db(App(db), SINCE, None)
    with db.sessions() as s:
        id_of = {(r.source, r.key): r.id for r in s.scalars(select(AlertRow))}
    assert len(rebuilt) == len(ref)
    assert {id_of[(a.source, a.key)]: a.photometry for a in rebuilt} == ref


def test_photometry_of_alerts_matches_per_alert_whatever_the_chunks_and_window(db, shared_data):
    ids = _store_three_targets(db)
    with db.sessions() as s:
        second = repo.get_alert(s, ids["A"][1]).time
    for since in (SINCE, second):  # later: the targets' earlier alerts' points are read and left out
        ref = _reference(db, since)
        with db.sessions() as s:
            pairs = [(r.id, r.target_id) for r in repo.alerts_since(s, since)]
            assert sorted(ref) == sorted(aid for aid, _ in pairs)
            for chunk in (1, 2, 500):
                got = repo.photometry_of_alerts(s, pairs, chunk=chunk)
                assert {aid: _points(p) for aid, p in got.items()} == ref
    with db.sessions() as s:
        assert repo.photometry_of_alerts(s, []) == {}
        assert repo.photometry_of_alerts(s, [(ids["C"][0], None)]) == {ids["C"][0]: []}


def test_rebuild_queries_do_not_grow_with_the_alerts(db, shared_data):
    """30 alerts of one target cost the photometry table as many statements as their last 3."""
    schema, recs = _series(0, 30)
    ids = _ingest(db, schema, recs)
    with db.sessions() as s:
        times = sorted(repo.get_alert(s, i).time for i in ids)
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args):
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        phot_statements = {}
        for n in (3, 30):
            statements.clear()
            alerts = _alerts_from_db(App(db), times[-n] - timedelta(seconds=1), None)
            assert len(alerts) == n and all(a.photometry for a in alerts)
            phot_statements[n] = sum(1 for q in statements if "photometry" in q.lower())
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
    assert phot_statements == {3: 1, 30: 1}
