"""Bulk import and export: bad rows reported by FILE:LINE, good rows kept, round trips."""

from __future__ import annotations

import textwrap

import pytest

from tomd.db import repository as repo
from tomd.targets import store
from tomd.targets.importer import import_file
from tomd.targets.io import export_rows, read_targets, write_csv, write_ecsv

GOOD_AND_BAD = textwrap.dedent("""\
    name,ra,dec,name2,name3,tags,z,host,flag
    SN 2024abc,10:00:24.0,-12:30:00,ZTF24aaaaaaa,,sn;bright,0.031,NGC 3000,true
    # a comment line
    Vega,279.23473479,38.78368896,alf Lyr,HD 172167,standard,,,false
    bad-dec,10.0,95.0,,,,,,
    bad-ra,xx:yy,10.0,,,,,,
    ,10.0,10.0,,,,,,
    short row,1.0
    Polaris,02:31:49.09,+89:15:50.8,,,,,,
    """)


def write(tmp_path, text, name="targets.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bad_rows_are_reported_with_file_line_and_field_good_rows_kept(db, tmp_path):
    path = write(tmp_path, GOOD_AND_BAD)
    report = import_file(db.sessions, path, radius_arcsec=1.5, progress=False)
    assert report.created == 3
    assert len(report.errors) == 4
    assert report.errors[0] == f"{path}:5: dec: expected degrees within [-90, 90], got 95"
    assert report.errors[1].startswith(f"{path}:6: ra: not an angle: 'xx:yy'")
    assert report.errors[2:] == [f"{path}:7: name: required", f"{path}:8: expected 9 columns, got 2"]
    with db.sessions() as s:
        sn = store.resolve(s, "ZTF24aaaaaaa")
        assert sn.name == "SN 2024abc"
        assert sn.ra == pytest.approx(150.1) and sn.dec == pytest.approx(-12.5)
        assert sn.extras == {"z": 0.031, "host": "NGC 3000", "flag": True}
        assert repo.tags_of(s, [sn.id])[sn.id] == ["bright", "sn"]
        vega = store.resolve(s, "HD 172167")
        assert vega.extras == {"flag": False}
        assert store.resolve(s, "polaris").dec == pytest.approx(89.264111, abs=1e-6)


def test_reimport_creates_no_duplicates(db, tmp_path):
    path = write(tmp_path, GOOD_AND_BAD)
    first = import_file(db.sessions, path, radius_arcsec=1.5, progress=False)
    second = import_file(db.sessions, path, radius_arcsec=1.5, progress=False)
    assert first.created == 3 and second.created == 0 and second.unchanged == 3
    with db.sessions() as s:
        assert repo.count_targets(s) == 3


def test_rows_matching_each_other_by_position_merge(db, tmp_path):
    path = write(tmp_path, "name,ra,dec\nA,10.0,10.0\nA-bis,10.0,10.0002\nB,10.0,10.01\n")
    report = import_file(db.sessions, path, radius_arcsec=1.5, progress=False)
    assert (report.created, report.updated) == (2, 1)
    with db.sessions() as s:
        assert store.resolve(s, "A-bis").name == "A"


def test_missing_name_column_is_one_clear_error(tmp_path):
    from tomd.errors import InputError

    path = write(tmp_path, "ra,dec\n1,2\n")
    with pytest.raises(InputError, match=r"targets.csv:1: no 'name' column"):
        list(read_targets(path))


def test_non_sidereal_rows(db, tmp_path):
    path = write(tmp_path, textwrap.dedent("""\
        name,scheme,epochofel,orbinc,longascnode,argofperih,meandist,eccentricity,meananom
        (433) Eros,MPC_MINOR_PLANET,60600.0,10.83,304.3,178.9,1.458,0.2229,310.5
        broken,MPC_MINOR_PLANET,60600.0,10.83,304.3,178.9,1.458,0.2229,
        """))
    report = import_file(db.sessions, path, radius_arcsec=1.5, progress=False)
    assert report.created == 1
    assert report.errors == [f"{path}:3: meananom: required for scheme MPC_MINOR_PLANET (missing: meananom)"]


@pytest.mark.parametrize("fmt", ["csv", "ecsv"])
def test_export_round_trips_with_import(db, tmp_path, fmt):
    src = write(tmp_path, GOOD_AND_BAD)
    import_file(db.sessions, src, radius_arcsec=1.5, progress=False)
    with db.sessions.begin() as s:
        store.upsert(s, store.TargetSpec("Eros", scheme="MPC_MINOR_PLANET", epochofel=60600.0, orbinc=10.83,
                                         longascnode=304.3, argofperih=178.9, meandist=1.458,
                                         eccentricity=0.2229, meananom=310.5, lists=("ssos",),
                                         extras={"n_obs": 12}))
    with db.sessions() as s:
        before = store.describe(s, repo.query_targets(s))
    header, rows = export_rows(before)
    text = write_ecsv(header, rows) if fmt == "ecsv" else write_csv(header, rows)
    out = write(tmp_path, text, f"export.{fmt}")
    # Into an empty database of the other kind of run: same targets come back.
    with db.sessions.begin() as s:
        for t in repo.query_targets(s):
            repo.delete_target(s, t.id)
    report = import_file(db.sessions, out, radius_arcsec=1.5, progress=False)
    assert report.ok and report.created == len(before)
    with db.sessions() as s:
        after = store.describe(s, repo.query_targets(s))

    def key(d):
        return {k: v for k, v in d.items() if k not in ("id", "created_at")}

    assert sorted(map(repr, map(key, after))) == sorted(map(repr, map(key, before)))


def test_a_row_the_database_refuses_does_not_take_its_neighbours(db, tmp_path):
    # PostgreSQL refuses a NUL character in JSON text; SQLite stores it.
    path = tmp_path / "nul.csv"
    path.write_bytes(b"name,ra,dec,note\nA,1,1,fine\nB,2,2,bad\x00byte\nC,3,3,fine\n")
    report = import_file(db.sessions, path, radius_arcsec=1.5, progress=False)
    with db.sessions() as s:
        names = sorted(t.name for t in repo.query_targets(s))
    if db.kind == "postgresql":
        assert names == ["A", "C"]
        assert report.errors == [f"{path}:3: database refused the row: DataError"]
    else:
        assert names == ["A", "B", "C"] and report.ok
