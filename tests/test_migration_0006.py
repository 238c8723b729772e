"""Migration 0006: GCN notices stored under the bare trigger number get the mission-qualified id.

A database is built at revision 0005 and filled as tomd filled it before GCN
ids were qualified: every GCN/LVK sample in ../shared/data parsed, its notice
stored under the id the parsers gave then (tests/data/gcn_event_ids_before_0006.json,
made with the parsers of commit 192f717^), its alert linked, its target named
"GCN <id>". After `upgrade` each notice must carry the id today's parsers give,
LVK superevents and circulars stay as they were, and the rows that cannot be
told apart are kept and reported. Then a later notice of a migrated event is
ingested: it refines the same notice and joins the same target.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import JSON, column, func, insert, select
from sqlalchemy import table as sa_table

from tests.conftest import SHARED_DATA, pg_database_at
from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
from tomd.alerts.parse import parse_message
from tomd.db import migrate
from tomd.db.models import AlertRow, Notice, TargetName
from tomd.targets import store
from tomd.db.models import UTCDateTime
from tomd.targets.model import TargetSpec, derived_columns, validate
from tomd.targets.names import normalize

IDS = json.loads((Path(__file__).parent / "data/gcn_event_ids_before_0006.json").read_text())["ids"]
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _format(rel: str) -> str:
    if rel.endswith(".bin"):
        return "gcn-binary"
    if rel.endswith(".xml"):
        return "gcn-voevent"
    if rel.startswith("lvk/"):
        return "lvk-avro" if rel.endswith(".avro") else "lvk-json"
    return "gcn-json"


def _samples():
    """(sample, alert as parsed today, id stored before 0006) for every GCN/LVK sample with an event."""
    out = []
    for name, ids in IDS.items():
        rel, _, index = name.partition("#")
        alerts = parse_message(_format(rel), (SHARED_DATA / rel).read_bytes(), include_test=True)
        a = alerts[int(index or 0)]
        assert (a.event_id or a.key) == ids["after"], name  # the parsers have not moved on since
        out.append((name, a, ids["before"]))
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_at_0005(request, tmp_path):
    if request.param == "sqlite":
        engine = migrate.connect(f"sqlite:///{tmp_path / 'old.db'}")
        migrate.upgrade(engine, "0005")
        yield engine
        engine.dispose()
        return
    with pg_database_at("0005") as engine:
        yield engine


_TARGETS_0005 = sa_table("targets", column("id"), column("name"), column("type"), column("ra"), column("dec"),
                         column("hpx"), column("gal_l"), column("gal_b"), column("extras", JSON),
                         column("created_at", UTCDateTime), column("modified_at", UTCDateTime))
_NAMES_0005 = sa_table("target_names", column("target_id"), column("name"), column("norm"), column("source"),
                       column("primary"))


def _add_notice(s, source, event_id, notice_type, alerts=(), *, ra=None, dec=None) -> tuple[int, int | None]:
    """A notice as the ingest stored it before 0006: row, alerts linked, target named '<SOURCE> <id>'."""
    target_id = None
    if ra is not None:
        # Written with the columns of schema 0005 (the models are today's: targets has gained
        # columns since, which an ORM write or read would name).
        name = f"{source.upper()} {event_id}"
        derived = derived_columns(validate(TargetSpec(name=name, ra=ra, dec=dec)))
        target_id = s.execute(insert(_TARGETS_0005).returning(_TARGETS_0005.c.id), [{
            "name": name, "type": "sidereal", "ra": ra, "dec": dec, "hpx": derived["hpx"],
            "gal_l": derived["gal_l"], "gal_b": derived["gal_b"], "extras": {}, "created_at": T0,
            "modified_at": T0}]).scalar_one()
        s.execute(insert(_NAMES_0005), [{"target_id": target_id, "name": name, "norm": normalize(name),
                                         "source": source, "primary": True}])
    n = Notice(source=source, event_id=event_id, notice_type=notice_type, time=T0, ra=ra, dec=dec,
               target_id=target_id)
    s.add(n)
    s.flush()
    for a in alerts:
        s.add(AlertRow(source=a.source, key=a.key, kind=a.kind, time=a.time, notice_id=n.id,
                       fields=a.fields, payload=a.payload, target_id=target_id))
    s.flush()
    return n.id, target_id


def test_old_notice_ids_become_the_ids_the_parsers_give_now(engine_at_0005, caplog):
    sessions = migrate.sessions(engine_at_0005)
    samples = _samples()
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for name, a, before in samples:  # one notice per (source, old id), as the ingest kept them
        groups[a.source, before].append((name, a))
    # Every kind of id is here: qualified ones, LVK superevents, a circular, the AMON IVORN.
    assert {a.event_id.split(":")[0] for _, a, b in samples if a.event_id != b} >= {
        "swift", "fermi", "icecube", "maxi", "integral", "svom", "superk", "einstein_probe", "gcn"}
    assert sum(a.event_id == b for _, a, b in samples) >= 20

    want: dict[int, str] = {}
    with sessions.begin() as s:
        for (source, before), members in groups.items():
            alerts = list({a.key: a for _, a in members}.values())
            first = alerts[0]
            ra = first.localization.ra if first.localization and first.localization.ra is not None else first.ra
            dec = first.localization.dec if first.localization and first.localization.dec is not None else first.dec
            nid, _ = _add_notice(s, source, before, first.notice_type, alerts, ra=ra,
                                 dec=dec if ra is not None else None)
            afters = {a.event_id or a.key for a in alerts}
            # Two missions' triggers under one bare number (the collision the
            # qualification ends) stay as they are: the row cannot be split here.
            want[nid] = afters.pop() if len(afters) == 1 else before
        # Notices whose alerts are gone: the notice type alone.
        alone = {
            _add_notice(s, "gcn", "745120001", "fermi/gbm/trigger")[0]: "fermi:745120001",
            _add_notice(s, "gcn", "1125001", "SWIFT_XRT_POSITION", ra=10.0, dec=20.0)[0]: "swift:1125001",
            _add_notice(s, "gcn", "1125002", "Preliminary")[0]: "1125002",  # a VOEvent AlertType: says nothing
            _add_notice(s, "gcn", "21001", "GRB_CNTRPART")[0]: "21001",  # "GCN" mission: packet or VOEvent?
            _add_notice(s, "gcn", "GRB 260101A", "circular")[0]: "GRB 260101A",
            _add_notice(s, "lvk", "S260102ab", "PRELIMINARY")[0]: "S260102ab",  # superevents stay bare
            _add_notice(s, "gcn", "S260102ab", "icecube/lvk_nu_track_search")[0]: "icecube:S260102ab",
        }
        want.update(alone)
        # Stored twice: once bare before the upgrade of the code, once qualified after it.
        twice_old, _ = _add_notice(s, "gcn", "745120002", "fermi/gbm/trigger")
        twice_new, _ = _add_notice(s, "gcn", "fermi:745120002", "fermi/gbm/trigger")
        want.update({twice_old: "745120002", twice_new: "fermi:745120002"})
        targets = {n.id: n.target_id for n in s.scalars(select(Notice))}

    with caplog.at_level(logging.INFO, logger="tomd.db.migrations"):
        before, after = migrate.upgrade(engine_at_0005)
    assert (before, after) == ("0005", migrate.head_revision())

    with sessions() as s:
        got = {n.id: n.event_id for n in s.scalars(select(Notice))}
        assert got == want
        # Each rewritten notice's target is found by the name the ingest now looks up.
        renamed = 0
        for nid, new in want.items():
            if ":" in new and not new.startswith("ivo://") and targets[nid] is not None:
                assert store.resolve(s, f"GCN {new.replace(':', ' ', 1)}").id == targets[nid], new
                renamed += 1
        assert renamed >= 20
    logged = caplog.text
    assert "notice %d (gcn '745120002') is notice %d ('fermi:745120002')" % (twice_old, twice_new) in logged
    assert "'1125002'" in logged and "'21001'" in logged and "rewritten" in logged
    assert "'S260102ab'" not in logged and "'GRB 260101A'" not in logged
    # The real samples hold the collision itself: test packets numbered 99999 by four missions.
    assert "'99999'): its alerts name ['agile:99999', 'fermi:99999', 'maxi:99999', 'swift:99999']" in logged


def test_a_later_notice_of_a_migrated_event_refines_it_and_joins_its_target(engine_at_0005):
    """Swift trigger 1125809: its BAT notice stored before 0006, its XRT notice ingested after."""
    sessions = migrate.sessions(engine_at_0005)
    base = SHARED_DATA / "gcn/voevent/skyportal"
    (bat,) = parse_message("gcn-voevent", (base / "SWIFT_1125809-092.xml").read_bytes())
    bare = bat.event_id.split(":", 1)[1]
    with sessions.begin() as s:
        nid, target_id = _add_notice(s, "gcn", bare, bat.notice_type, [bat], ra=bat.ra, dec=bat.dec)
    migrate.upgrade(engine_at_0005)

    ingest = Ingestor(sessions, IngestSettings(stream="gcn", format="gcn-voevent", localization_max_deg=0.1),
                      lambda d: parse_message("gcn-voevent", d, include_test=True))
    ingest.handle([FileMessage("xrt", 0, (base / "SWIFT_1125809-104.xml").read_bytes())])
    with sessions() as s:
        (n,) = s.scalars(select(Notice)).all()
        assert (n.id, n.event_id) == (nid, bat.event_id)
        assert n.target_id == target_id and n.error_deg < 0.01  # the XRT refinement, on the same target
        assert s.scalar(select(func.count()).select_from(AlertRow)) == 2
        names = set(s.scalars(select(TargetName.name).where(TargetName.target_id == target_id)))
        assert names == {f"GCN {bare}", f"GCN swift {bare}"}
