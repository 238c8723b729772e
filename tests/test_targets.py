"""Targets on SQLite and PostgreSQL: names, matching (poles, RA wrap), upsert."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from sqlalchemy import func, select

from tomd.db import migrate, repository as repo
from tomd.db.models import OutboxEvent, Target, TargetName
from tomd.errors import DatabaseNotReady
from tomd.targets import store
from tomd.targets.model import SpecError, TargetSpec, validate
from tomd.targets.names import normalize


def add(db, name, ra, dec, **kw):
    with db.sessions.begin() as s:
        return store.upsert(s, TargetSpec(name, ra=ra, dec=dec, **kw), radius_arcsec=1.5)


@pytest.mark.parametrize(
    "a,b",
    [("ZTF 25abc", "ZTF25abc"), ("ztf25ABC", "ZTF_25-abc"), ("AT 2025xyz", "SN2025xyz"), ("M 31", "m31"),
     ("NGC 224", "ngc-224")],
)
def test_names_match_case_and_punctuation_insensitively(a, b):
    assert normalize(a) == normalize(b)


def test_different_names_stay_different():
    assert normalize("ZTF25abc") != normalize("ZTF25abd")
    assert normalize("M 31") != normalize("M 3 1 a")


def test_alias_lookup_and_name_match(db):
    first = add(db, "ZTF 25abc", 150.0, 2.0, aliases=("AT 2025qq",))
    assert first.created
    # A far-away position but a known alias: the name decides.
    again = add(db, "SN 2025qq", 10.0, -40.0)
    assert not again.created and again.match.by == "name" and again.target_id == first.target_id
    with db.sessions() as s:
        assert store.resolve(s, "ztf25ABC").id == first.target_id
        assert store.resolve(s, "at2025qq").id == first.target_id
        assert store.resolve(s, f"#{first.target_id}").name == "ZTF 25abc"
        assert store.resolve(s, "nothing") is None
        # The stored position did not move.
        assert repo.get_target(s, first.target_id).ra == 150.0


@pytest.mark.parametrize(
    "stored,probe,should_match",
    [
        ((359.99995, 0.0), (0.00005, 0.0), True),  # 0.36" across RA 0/360
        ((0.0002, 10.0), (359.9998, 10.0), True),  # 1.42" across the wrap at dec 10
        ((0.0, 89.9999), (180.0, 89.9999), True),  # 0.72" across the north pole
        ((45.0, -89.99997), (225.0, -89.99997), True),  # across the south pole
        ((10.0, 90.0), (250.0, 90.0), True),  # exactly at the pole, any RA
        ((0.0, 89.9990), (180.0, 89.9990), False),  # 7.2" apart over the pole
        ((359.9990, 0.0), (0.0010, 0.0), False),  # 7.2" apart across the wrap
        ((100.0, 20.0), (100.0, 20.0 + 1.49 / 3600), True),
        ((100.0, 20.0), (100.0, 20.0 + 1.51 / 3600), False),
    ],
)
def test_position_match_at_poles_and_across_ra_zero(db, stored, probe, should_match):
    a = add(db, "stored", *stored)
    b = add(db, "probe", *probe)
    sep = SkyCoord(stored[0] * u.deg, stored[1] * u.deg).separation(SkyCoord(probe[0] * u.deg, probe[1] * u.deg))
    assert (sep.arcsec <= 1.5) == should_match  # the case itself is what it claims
    if should_match:
        assert not b.created and b.target_id == a.target_id and b.match.by == "position"
        assert b.match.separation_arcsec == pytest.approx(sep.arcsec, abs=1e-6)
        assert "probe" in b.new_names
    else:
        assert b.created and b.target_id != a.target_id


def test_cone_search_equals_brute_force_near_poles_and_wrap(db):
    rng = np.random.default_rng(7)
    centres = [(0.0, 89.99), (359.995, -30.0), (0.0, -89.995), (200.0, 10.0)]
    rows, names = [], []
    tid = 0
    for ra0, dec0 in centres:
        c = SkyCoord(ra0 * u.deg, dec0 * u.deg)
        pts = c.directional_offset_by(rng.uniform(0, 360, 150) * u.deg, rng.uniform(0, 80, 150) * u.arcsec)
        for ra, dec in zip(pts.ra.deg, pts.dec.deg):
            tid += 1
            rows.append(_row(tid, float(ra), float(dec)))
            names.append({"target_id": tid, "name": f"t{tid}", "norm": f"t{tid}", "primary": True})
    with db.sessions.begin() as s:
        repo.bulk_insert_targets(s, rows, names)
    all_ra = np.array([r["ra"] for r in rows])
    all_dec = np.array([r["dec"] for r in rows])
    ids = np.array([r["id"] for r in rows])
    with db.sessions() as s:
        for ra0, dec0 in centres:
            for radius in (5.0, 20.0, 60.0):
                got = store.cone(s, ra0, dec0, radius)
                sep = SkyCoord(all_ra * u.deg, all_dec * u.deg).separation(SkyCoord(ra0 * u.deg, dec0 * u.deg)).arcsec
                want = set(ids[sep <= radius].tolist())
                assert {t for t, _ in got} == want
                assert [d for _, d in got] == sorted(d for _, d in got)


def _row(tid, ra, dec):
    from tomd import sky

    l, b = sky.to_galactic(ra, dec)
    return {"id": tid, "name": f"t{tid}", "type": "sidereal", "ra": ra, "dec": dec,
            "hpx": sky.sky_index(ra, dec), "gal_l": l, "gal_b": b, "extras": {}}


def test_nearest_target_wins(db):
    near = add(db, "near", 50.0, 50.0 + 0.5 / 3600)
    add(db, "far", 50.0, 50.0 - 1.2 / 3600)
    res = add(db, "probe", 50.0, 50.0)
    assert res.target_id == near.target_id


def test_upsert_merges_without_moving_and_records_events(db):
    a = add(db, "T1", 10.0, 10.0, tags=("sn",), extras={"z": 0.1})
    b = add(db, "T1 alias", 10.0, 10.0 + 1.0 / 3600, tags=("sn", "bright"), lists=("tonight",),
            extras={"z": 0.1, "host": "NGC 1"}, parallax=1.5)
    assert b.target_id == a.target_id
    assert b.changes == {"parallax": 1.5, "extras.host": "NGC 1", "tags": ["bright"], "lists": ["tonight"]}
    unchanged = add(db, "T1", 10.0, 10.0, tags=("sn",))
    assert not unchanged.changes and not unchanged.new_names
    with db.sessions() as s:
        t = repo.get_target(s, a.target_id)
        assert (t.ra, t.dec, t.parallax) == (10.0, 10.0, 1.5)
        assert t.extras == {"z": 0.1, "host": "NGC 1"}
        assert repo.tags_of(s, [t.id])[t.id] == ["bright", "sn"]
        assert repo.lists_of(s, [t.id])[t.id] == ["tonight"]
        kinds = list(s.scalars(select(OutboxEvent.kind).order_by(OutboxEvent.id)))
        assert kinds == ["target.created", "target.updated"]  # the no-op wrote nothing


def test_galactic_coordinates_are_derived(db):
    res = add(db, "gc", 266.40499, -28.93617)
    with db.sessions() as s:
        t = repo.get_target(s, res.target_id)
    ref = SkyCoord(266.40499 * u.deg, -28.93617 * u.deg).galactic
    assert t.gal_b == pytest.approx(ref.b.deg, abs=1e-9)
    assert t.hpx is not None


def test_name_conflict_is_reported_not_stolen(db):
    a = add(db, "A", 10.0, 10.0)
    b = add(db, "B", 20.0, 20.0)
    # "B" as an alias of a spec that matches A by position: B stays with target B.
    res = add(db, "A2", 10.0, 10.0, aliases=("B",))
    assert res.target_id == a.target_id and res.conflicts == ("B",)
    with db.sessions() as s:
        assert store.resolve(s, "B").id == b.target_id


def test_non_sidereal_targets(db):
    spec = TargetSpec("C/2020 F3", scheme="MPC_COMET", epochofel=59000.0, orbinc=128.9, longascnode=61.0,
                      argofperih=37.3, perihdist=0.295, eccentricity=0.999, epochofperih=59034.7)
    with db.sessions.begin() as s:
        res = store.upsert(s, spec)
    with db.sessions() as s:
        t = repo.get_target(s, res.target_id)
        assert t.type == "non_sidereal" and t.scheme == "MPC_COMET" and t.ra is None and t.hpx is None
        assert store.resolve(s, "c2020f3").id == t.id


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(scheme="MPC_MINOR_PLANET", epochofel=59000.0, orbinc=10.0, longascnode=1.0, argofperih=1.0,
              meandist=2.5, eccentricity=0.1), "meananom"),
        (dict(scheme="JPL_MAJOR_PLANET", epochofel=59000.0, orbinc=10.0, longascnode=1.0, argofperih=1.0,
              meandist=2.5, eccentricity=0.1, meananom=3.0), "dailymot"),
        (dict(scheme="MPC_MINOR_PLANET", epochofel=59000.0, orbinc=190.0, longascnode=1.0, argofperih=1.0,
              meandist=2.5, eccentricity=0.1, meananom=3.0), "orbinc"),
        (dict(scheme="MPC_MINOR_PLANET", epochofel=59000.0, orbinc=10.0, longascnode=1.0, argofperih=1.0,
              meandist=2.5, eccentricity=1.2, meananom=3.0), "eccentricity"),
        (dict(scheme="KEPLER", epochofel=59000.0), "scheme"),
        (dict(orbinc=10.0), "orbinc"),
        (dict(ra=10.0), "dec"),
        (dict(dec=10.0), "ra"),
        (dict(ra=10.0, dec=95.0), "dec"),
        (dict(ra=-1.0, dec=5.0), "ra"),
        (dict(ra=float("nan"), dec=5.0), "ra"),
        (dict(ra=1.0, dec=5.0, parallax=-1.0), "parallax"),
        (dict(ra=1.0, dec=5.0, aliases=("bad\x00name",)), "aliases"),
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(SpecError) as exc:
        validate(TargetSpec("x", **kwargs))
    assert exc.value.field == field


def test_commands_refuse_an_unmigrated_database(tmp_path):
    engine = migrate.connect(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseNotReady, match="tomd db upgrade"):
        migrate.ensure_current(engine)


def test_unreachable_database_is_a_clear_error():
    engine = migrate.connect("postgresql+psycopg://nobody:s3cret@127.0.0.1:1/none")
    with pytest.raises(DatabaseNotReady) as exc:
        migrate.ensure_current(engine)
    assert "s3cret" not in str(exc.value) and "cannot reach" in str(exc.value)


def test_models_and_migrations_agree(db):
    """Autogenerate finds nothing to do: the migrations build exactly the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tomd.db.models import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), Base.metadata)
    assert diff == []


def test_concurrent_creation_of_one_object_makes_one_target(db):
    """Two writers race to create the same new object: one target results."""
    import threading

    barrier = threading.Barrier(4)
    errors = []

    def worker(i):
        try:
            barrier.wait()
            with db.sessions.begin() as s:
                store.upsert(s, TargetSpec(f"racer{i}", ra=33.0, dec=-5.0 + i * 0.1 / 3600))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Target)) == 1
        assert s.scalar(select(func.count()).select_from(TargetName)) == 4


def test_concurrent_upgrades_of_a_new_database_are_serialised(tmp_path):
    """Replicas that start together: every `db upgrade` succeeds, one schema results."""
    import os
    import secrets
    import threading

    from sqlalchemy import create_engine, text

    from tests.conftest import ADMIN_URL

    name = f"tomd_upg_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    errors = []

    def upgrade():
        engine = migrate.connect(url)
        try:
            migrate.upgrade(engine)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            engine.dispose()

    try:
        threads = [threading.Thread(target=upgrade) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        engine = migrate.connect(url)
        migrate.ensure_current(engine)
        engine.dispose()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_batch_upsert_matches_as_brute_force_across_poles_and_wrap(db):
    """upsert_many of a batch larger than one statement's worth of sky ranges (PostgreSQL sends them
    as one array): every probe joins the nearest stored target within the radius, or is created."""
    rng = np.random.default_rng(3)
    centres = [(0.0, 89.999), (359.9995, 12.0), (0.0, -89.9995), (120.0, -30.0)]
    stored_pos, probes = [], []
    for ra0, dec0 in centres:
        c = SkyCoord(ra0 * u.deg, dec0 * u.deg)
        pts = c.directional_offset_by(rng.uniform(0, 360, 120) * u.deg, rng.uniform(0, 30, 120) * u.arcsec)
        stored_pos += [(float(a), float(b)) for a, b in zip(pts.ra.deg, pts.dec.deg)]
        near = c.directional_offset_by(rng.uniform(0, 360, 150) * u.deg, rng.uniform(0, 30, 150) * u.arcsec)
        probes += [(float(a), float(b)) for a, b in zip(near.ra.deg, near.dec.deg)]
    with db.sessions.begin() as s:
        made = store.upsert_many(s, [TargetSpec(f"s{i}", ra=a, dec=b) for i, (a, b) in enumerate(stored_pos)],
                                 radius_arcsec=0.0)  # all new, even when close together
    ids = np.array([r.target_id for r in made])
    assert all(r.created for r in made) and len(set(ids)) == len(stored_pos)
    with db.sessions.begin() as s:
        got = store.upsert_many(s, [TargetSpec(f"p{i}", ra=a, dec=b) for i, (a, b) in enumerate(probes)],
                                radius_arcsec=1.5)
    # Brute force, in batch order: a probe joins the nearest target within 1.5", stored before or
    # created by an earlier probe of the same batch; else it is created.
    known_pos, known_ids = list(stored_pos), list(ids.tolist())
    matched = 0
    for (ra, dec), res in zip(probes, got):
        kra, kdec = np.array(known_pos).T
        sep = SkyCoord(kra * u.deg, kdec * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg)).arcsec
        if sep.min() <= 1.5:
            matched += 1
            assert not res.created and res.match.by == "position"
            assert res.target_id == known_ids[int(np.argmin(sep))]
            assert res.match.separation_arcsec == pytest.approx(sep.min(), abs=1e-6)
        else:
            assert res.created
            known_pos.append((ra, dec))
            known_ids.append(res.target_id)
    assert 50 < matched < len(probes) - 50  # the case has both kinds
    # The same probes again, by name now: every one is its own or its match's target.
    with db.sessions.begin() as s:
        again = store.upsert_many(s, [TargetSpec(f"P {i}", ra=a, dec=b) for i, (a, b) in enumerate(probes)])
    assert [r.target_id for r in again] == [r.target_id for r in got]
    assert all(r.match.by == "name" for r in again)


def test_merge_ranges_joins_overlapping_and_touching():
    assert repo.merge_ranges([(5, 9), (0, 2), (2, 4), (8, 12), (20, 21)]) == [(0, 4), (5, 12), (20, 21)]
    assert repo.merge_ranges([]) == []
