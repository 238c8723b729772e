"""Data products: skymaps from real LVK notices, uploads, export, plots, CLI.

Database tests run on SQLite and PostgreSQL (``db``); storage on a local
directory and on S3 (moto server) where the backend matters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import select

from tests.test_storage import new_bucket, s3_endpoint, store  # noqa: F401  (fixtures)
from tomd import data_cli
from tomd.db import repository as repo
from tomd.db.models import DataProduct, OutboxEvent, Photometry
from tomd.errors import InputError, NotFoundError
from tomd.products import (
    export_photometry,
    fits_meta,
    list_products,
    parse_photometry,
    plot_light_curve,
    store_skymap,
    upload,
    upload_source,
)
from tomd.storage import LocalStore, Store, seekable
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert

LVK = "lvk/userguide-examples/"


def make_target(db, name: str = "SN 2023ixf", ra: float = 210.910674, dec: float = 54.311650) -> int:
    with db.sessions.begin() as s:
        return upsert(s, TargetSpec(name=name, ra=ra, dec=dec), origin="test").target_id


def events(db, kind: str) -> list[dict]:
    with db.sessions() as s:
        return [e.payload for e in s.scalars(select(OutboxEvent).where(OutboxEvent.kind == kind)
                                             .order_by(OutboxEvent.id))]


def products(db) -> list[DataProduct]:
    with db.sessions() as s:
        rows = list(s.scalars(select(DataProduct).order_by(DataProduct.id)))
        s.expunge_all()
        return rows


def points(db, target_id: int) -> list[Photometry]:
    with db.sessions() as s:
        rows = repo.photometry_of(s, target_id)
        s.expunge_all()
        return rows


# ---------------------------------------------------------------- skymaps --


def lvk_alert(shared_data: Path, name: str, fmt: str):
    from tomd.alerts.parse import parse_message

    (a,) = parse_message(fmt, (shared_data / name).read_bytes(), include_test=True)  # mock events: test=True
    return a


def save_notice(db, a) -> int:
    with db.sessions.begin() as s:
        return repo.save_notice(s, {"source": a.source, "event_id": a.event_id, "notice_type": a.notice_type,
                                    "time": a.time, "test": a.test}).id


def test_skymap_from_lvk_notice_stored_once(db, store: Store, shared_data: Path) -> None:
    a = lvk_alert(shared_data, f"{LVK}MS181101ab-preliminary.avro", "lvk-avro")
    sky = a.localization.skymap
    assert a.localization.skymap_format == "multiorder-fits" and len(sky) == 777_600
    notice_id = save_notice(db, a)
    with db.sessions.begin() as s:
        res = store_skymap(s, store, notice_id, a.source, a.event_id, sky, a.localization.skymap_format,
                           label=a.notice_type)
    md5 = hashlib.md5(sky).hexdigest()
    assert res.created and res.md5 == md5 and res.size == len(sky)
    assert res.storage_key == f"notices/lvk/MS181101ab/preliminary-{md5[:8]}.multiorder.fits"
    (row,) = products(db)
    assert (row.facility, row.kind, row.notice_id, row.state, row.size, row.md5) == \
        ("lvk", "skymap", notice_id, "stored", 777_600, md5)
    assert row.product_id == f"MS181101ab/{md5}" and row.stored_at is not None
    with store.open(row.storage_key) as f:
        assert hashlib.md5(f.read()).hexdigest() == md5
    (ev,) = events(db, "data.stored")
    assert ev["data_product_id"] == row.id and ev["notice_id"] == notice_id and ev["product_kind"] == "skymap"

    # The same skymap again — a replay, the JSON copy of the notice, a later notice type carrying the
    # same map — is neither stored twice nor announced twice.
    for name, fmt in ((f"{LVK}MS181101ab-preliminary.avro", "lvk-avro"),
                      (f"{LVK}MS181101ab-preliminary.json", "lvk-json"),
                      (f"{LVK}MS181101ab-initial.json", "lvk-json")):
        b = lvk_alert(shared_data, name, fmt)
        with db.sessions.begin() as s:
            again = store_skymap(s, store, notice_id, b.source, b.event_id, b.localization.skymap,
                                 b.localization.skymap_format, label=b.notice_type)
        assert not again.created and again.id == row.id
    assert len(products(db)) == 1 and len(events(db, "data.stored")) == 1
    assert list(store.keys("notices/")) == [row.storage_key]


def test_skymap_is_real_fits_readable_from_either_backend(db, store: Store, shared_data: Path) -> None:
    a = lvk_alert(shared_data, "lvk/skyportal/igwn_gwalert_preliminary.json", "lvk-json")
    notice_id = save_notice(db, a)
    with db.sessions.begin() as s:
        res = store_skymap(s, store, notice_id, a.source, a.event_id, a.localization.skymap,
                           a.localization.skymap_format, label=a.notice_type)
    with seekable(store, res.storage_key) as f:  # a processor: a stream, never a local path
        meta = fits_meta(f)
    assert meta["n_hdu"] == 2
    from astropy.io import fits

    with seekable(store, res.storage_key) as f, fits.open(f) as hdul:
        assert hdul[1].header["ORDERING"] == "NUNIQ"  # a multi-order skymap
        assert len(hdul[1].data) > 0


def test_refined_skymap_is_a_new_product(db, store: Store, shared_data: Path) -> None:
    a = lvk_alert(shared_data, f"{LVK}MS181101ab-preliminary.avro", "lvk-avro")
    notice_id = save_notice(db, a)
    sky = a.localization.skymap
    refined = sky[:-10] + b"refined!!!"
    with db.sessions.begin() as s:
        r1 = store_skymap(s, store, notice_id, "lvk", a.event_id, sky, "multiorder-fits", label="PRELIMINARY")
        r2 = store_skymap(s, store, notice_id, "lvk", a.event_id, refined, "multiorder-fits", label="UPDATE")
    assert r1.created and r2.created and r1.storage_key != r2.storage_key
    assert {p.md5 for p in products(db)} == {hashlib.md5(sky).hexdigest(), hashlib.md5(refined).hexdigest()}


def test_skymap_rewritten_when_object_lost(db, tmp_path, shared_data: Path) -> None:
    store = LocalStore(tmp_path / "s")
    a = lvk_alert(shared_data, f"{LVK}MS181101ab-preliminary.avro", "lvk-avro")
    with db.sessions.begin() as s:
        r = store_skymap(s, store, None, "lvk", a.event_id, a.localization.skymap, "multiorder-fits")
    store.delete(r.storage_key)
    with db.sessions.begin() as s:
        again = store_skymap(s, store, None, "lvk", a.event_id, a.localization.skymap, "multiorder-fits")
    assert not again.created and store.exists(r.storage_key)


def test_skymap_rolled_back_transaction_records_nothing(db, tmp_path, shared_data: Path) -> None:
    store = LocalStore(tmp_path / "s")
    a = lvk_alert(shared_data, f"{LVK}MS181101ab-preliminary.avro", "lvk-avro")
    with pytest.raises(RuntimeError), db.sessions.begin() as s:
        store_skymap(s, store, None, "lvk", a.event_id, a.localization.skymap, "multiorder-fits")
        raise RuntimeError("the ingest transaction fails after the skymap was written")
    assert products(db) == [] and events(db, "data.stored") == []
    with db.sessions.begin() as s:  # the replay records it (the object is simply written again)
        assert store_skymap(s, store, None, "lvk", a.event_id, a.localization.skymap, "multiorder-fits").created


# ------------------------------------------------------ photometry uploads --

GOOD_AND_BAD_CSV = """\
# photometry of SN 2023ixf from a night's reduction
mjd,band,mag,mag_err,limit
60083.2000,g,11.20,0.03,
60083.2500,r,11.05,0.02,
60083.3000,r,,,19.5
60083.3500,,11.0,0.02,
abc,r,11.0,0.02,
60083.4000,r,eleven,0.02,
60083.4500,r,11.0,-0.1,
60083.5000,r,11.0
60083.5500,i,,,
60084.2000,i,10.90,0.04,
"""


def test_upload_csv_reports_bad_rows_and_keeps_good_ones(db, store: Store, tmp_path) -> None:
    tid = make_target(db)
    f = tmp_path / "night1.csv"
    f.write_text(GOOD_AND_BAD_CSV)
    rep = upload(db.sessions, store, "SN2023ixf", f)  # any spelling of the name
    assert rep.errors == [
        f"{f}:6: band: missing band",
        f"{f}:7: mjd: expected a number (MJD), got 'abc'",
        f"{f}:8: mag: expected a number, got 'eleven'",
        f"{f}:9: mag_err: an uncertainty cannot be negative (-0.1)",
        f"{f}:10: 3 values for 5 columns",
        f"{f}:11: mag: no mag, flux or limit in this row",
    ]
    assert (rep.rows, rep.stored, rep.duplicates, rep.kind) == (10, 4, 0, "photometry")
    pts = points(db, tid)
    assert [(p.mjd, p.band, p.kind, p.mag, p.limit) for p in pts] == [
        (60083.2, "g", "detection", 11.2, None), (60083.25, "r", "detection", 11.05, None),
        (60083.3, "r", "upper_limit", None, 19.5), (60084.2, "i", "detection", 10.9, None)]
    assert {p.source for p in pts} == {"upload:night1.csv"}
    assert pts[0].dedupe == "upload:night1.csv|g|detection|60083.200000"  # the key ingest uses
    (prod,) = products(db)
    assert (prod.facility, prod.kind, prod.target_id, prod.filename) == ("upload", "photometry", tid, "night1.csv")
    assert prod.md5 == hashlib.md5(f.read_bytes()).hexdigest()
    with store.open(prod.storage_key) as fh:
        assert fh.read() == f.read_bytes()

    again = upload(db.sessions, store, "SN 2023ixf", f)  # the same file again: nothing doubles
    assert (again.stored, again.duplicates) == (0, 4)
    assert not again.product.created
    assert len(points(db, tid)) == 4 and len(products(db)) == 1 and len(events(db, "data.stored")) == 1


def test_upload_times_iso_jd_and_ecsv_scales(db, tmp_path) -> None:
    from astropy.table import Table
    from astropy.time import Time
    import astropy.units as u

    tid = make_target(db)
    store = LocalStore(tmp_path / "s")
    iso = tmp_path / "iso.csv"
    iso.write_text("time,filter,magnitude,err\n2023-05-19T12:00:00,ZTF_g,12.0,0.1\n"
                   "2023-05-20 00:00:00,ZTF_g,12.1,0.1\n2460084.5,ZTF_r,12.2,0.1\n")
    rep = upload(db.sessions, store, "SN 2023ixf", iso)
    assert rep.errors == [] and rep.stored == 3
    got = sorted((p.band, round(p.mjd, 9), p.mag_err) for p in points(db, tid))
    assert got == [("ZTF_g", 60083.5, 0.1), ("ZTF_g", 60084.0, 0.1), ("ZTF_r", 60084.0, 0.1)]

    # An ECSV Time column in TAI is converted to UTC by astropy (37 s in 2023); flux in µJy → nJy.
    t = Table()
    t["time"] = Time([60100.5, 60101.5], format="mjd", scale="tai")
    t["flux"] = [10.0, -2.0] * u.uJy
    t["flux_err"] = [0.5, 0.5] * u.uJy
    t["band"] = ["lsst_r", "lsst_r"]
    t["kind"] = ["forced", "forced"]
    ecsv = tmp_path / "forced.ecsv"
    t.write(ecsv, format="ascii.ecsv")
    rep = upload(db.sessions, store, "SN 2023ixf", ecsv)
    assert rep.errors == [] and rep.stored == 2
    forced = [p for p in points(db, tid) if p.kind == "forced"]
    expect = Time([60100.5, 60101.5], format="mjd", scale="tai").utc.mjd
    assert [p.mjd for p in forced] == pytest.approx(list(expect), abs=1e-9)
    assert forced[0].mjd == pytest.approx(60100.5 - 37 / 86400, abs=1e-9)
    assert [p.flux for p in forced] == pytest.approx([10_000.0, -2_000.0])
    assert forced[0].mag == pytest.approx(31.4 - 2.5 * math.log10(10_000.0))  # m_AB from nJy
    assert forced[1].mag is None  # a negative difference flux is a measurement, not a magnitude


def test_upload_ecsv_bad_row_names_its_line(db, tmp_path) -> None:
    make_target(db)
    f = tmp_path / "lc.ecsv"
    f.write_text("# %ECSV 1.0\n# ---\n# datatype:\n# - {name: mjd, datatype: float64}\n"
                 "# - {name: band, datatype: string}\n# - {name: mag, unit: mag, datatype: float64}\n"
                 "# schema: astropy-2.0\nmjd band mag\n60000.1 g 18.0\n60000.2 g 99.0\n60000.3 \"r\" 18.5\n")
    rep = upload(db.sessions, LocalStore(tmp_path / "s"), "SN 2023ixf", f)
    assert rep.errors == [f"{f}:10: mag: 99.0 is not a plausible AB magnitude (-30..40)"]
    assert rep.stored == 2


def test_file_level_problems_are_one_clear_error(db, tmp_path) -> None:
    make_target(db)
    store = LocalStore(tmp_path / "s")
    f = tmp_path / "nodate.csv"
    f.write_text("band,mag\ng,18\n")
    with pytest.raises(InputError, match=r"nodate.csv:1: no time column"):
        upload(db.sessions, store, "SN 2023ixf", f)
    with pytest.raises(NotFoundError):
        upload(db.sessions, store, "SN 1987A", f)
    with pytest.raises(InputError, match="no such file"):
        upload(db.sessions, store, "SN 2023ixf", tmp_path / "missing.csv")
    g = tmp_path / "weird.xyz"
    g.write_text("x")
    with pytest.raises(InputError, match="--type"):
        upload(db.sessions, store, "SN 2023ixf", g)
    assert products(db) == []


def test_long_file_name_fits_the_source_column(db, tmp_path) -> None:
    tid = make_target(db)
    name = "a-very-long-reduction-output-file-name-from-the-pipeline-v2.csv"
    f = tmp_path / name
    f.write_text("mjd,band,mag,mag_err\n60000.0,g,18.0,0.1\n")
    rep = upload(db.sessions, LocalStore(tmp_path / "s"), "SN 2023ixf", f)  # PostgreSQL enforces the width
    assert rep.stored == 1
    (p,) = points(db, tid)
    assert p.source == upload_source(name) and len(p.source) <= 32 and p.source.startswith("upload:a-very")
    assert upload_source("other-" + name) != p.source


def test_parse_photometry_flux_scaled_columns(tmp_path) -> None:
    f = tmp_path / "f.csv"
    f.write_text("mjd,band,flux_ujy,flux_err_ujy\n60000.0,r,3.631,0.1\n")
    pts, errors, n = parse_photometry(f)
    assert errors == [] and n == 1
    assert pts[0]["flux"] == pytest.approx(3631.0) and pts[0]["mag"] == pytest.approx(31.4 - 2.5 * math.log10(3631))


# ------------------------------------------------------ images and spectra --


def write_fits(path: Path, data, **header) -> Path:
    from astropy.io import fits

    hdu = fits.PrimaryHDU(data)
    for k, v in header.items():
        hdu.header[k.replace("_", "-")] = v
    hdu.writeto(path)
    return path


def test_upload_fits_image_with_header_metadata(db, store: Store, tmp_path) -> None:
    tid = make_target(db)
    f = write_fits(tmp_path / "coj1m011-fa12-20230520-0100-e91.fits", np.zeros((64, 64), dtype=np.float32),
                   DATE_OBS="2023-05-20T11:59:01.123", FILTER="rp", EXPTIME=120.0, INSTRUME="fa12",
                   TELESCOP="1m0-11", OBJECT="SN 2023ixf", RA="14:03:38.56", DEC="+54:18:41.9")
    rep = upload(db.sessions, store, "SN 2023ixf", f, "image")
    assert rep.ok and rep.product.created
    (prod,) = products(db)
    assert (prod.kind, prod.facility, prod.target_id) == ("image", "upload", tid)
    m = prod.meta
    assert (m["DATE-OBS"], m["FILTER"], m["EXPTIME"], m["INSTRUME"], m["TELESCOP"], m["OBJECT"]) == \
        ("2023-05-20T11:59:01.123", "rp", 120.0, "fa12", "1m0-11", "SN 2023ixf")
    assert m["ra_deg"] == pytest.approx(210.91067, abs=1e-4) and m["dec_deg"] == pytest.approx(54.31164, abs=1e-4)
    assert m["shape"] == [64, 64]
    assert prod.storage_key.startswith(f"{tid}-SN_2023ixf/upload/image-") and prod.storage_key.endswith(f.name)
    assert prod.size == f.stat().st_size and prod.md5 == hashlib.md5(f.read_bytes()).hexdigest()
    with seekable(store, prod.storage_key) as fh:  # read back through the store, on either backend
        assert fits_meta(fh)["FILTER"] == "rp"
    (ev,) = events(db, "data.stored")
    assert ev["product_kind"] == "image" and ev["target_id"] == tid and ev["md5"] == prod.md5


def test_upload_spectrum(db, tmp_path) -> None:
    make_target(db)
    store = LocalStore(tmp_path / "s")
    f = write_fits(tmp_path / "spec.fits", np.ones(2048, dtype=np.float32), DATE_OBS="2023-05-21T03:00:00",
                   INSTRUME="FLOYDS", TELESCOP="FTN", OBJECT="SN2023ixf")
    rep = upload(db.sessions, store, "SN 2023ixf", f, "spectroscopy")
    assert rep.product.created and rep.meta["INSTRUME"] == "FLOYDS" and rep.meta["NAXIS"] == 1
    ascii_spec = tmp_path / "spec.txt"
    ascii_spec.write_text("# wavelength flux\n3500 1.0e-15\n3501 1.1e-15\n")
    rep2 = upload(db.sessions, store, "SN 2023ixf", ascii_spec, "spectroscopy")
    assert rep2.product.created
    assert [p.kind for p in products(db)] == ["spectroscopy", "spectroscopy"]
    # a 1-D FITS uploaded as an image is kept but flagged
    rep3 = upload(db.sessions, store, "SN 2023ixf", f, "image")
    assert "spectrum" in rep3.meta["note"]


def test_not_fits_is_refused(db, tmp_path) -> None:
    make_target(db)
    f = tmp_path / "broken.fits"
    f.write_bytes(b"<html>502 Bad Gateway</html>")
    with pytest.raises(InputError, match="broken.fits: cannot read FITS header"):
        upload(db.sessions, LocalStore(tmp_path / "s"), "SN 2023ixf", f)
    assert products(db) == []


# ---------------------------------------------------------------- export --


def seed_light_curve(db, tid: int) -> None:
    rows = []
    for i in range(12):
        t = 60080.0 + 1.5 * i
        for band, off in (("ztfg", 0.0), ("ztfr", 0.25)):
            mag = 19.5 - 2.0 * (1 - math.exp(-i / 3)) + 0.08 * i * (i > 6) + off
            rows.append({"mjd": t + (0.05 if band == "ztfr" else 0), "band": band, "kind": "detection",
                         "mag": mag, "mag_err": 0.04 + 0.01 * (mag - 17), "source": "ztf"})
    rows.append({"mjd": 60077.0, "band": "ztfg", "kind": "upper_limit", "limit": 20.6, "source": "ztf"})
    rows.append({"mjd": 60078.5, "band": "ztfr", "kind": "upper_limit", "limit": 20.4, "source": "ztf"})
    for i, flux in enumerate((-400.0, 150.0, 30_000.0, 52_000.0)):
        rows.append({"mjd": 60076.0 + 2 * i, "band": "lsst_i", "kind": "forced", "flux": flux, "flux_err": 300.0,
                     "mag": 31.4 - 2.5 * math.log10(flux) if flux > 0 else None, "source": "rubin"})
    full = []
    for r in rows:
        base = {"mag": None, "mag_err": None, "flux": None, "flux_err": None, "limit": None, "alert_id": None}
        full.append(base | r | {"target_id": tid, "dedupe": f"{r['source']}|{r['band']}|{r['kind']}|{r['mjd']:.6f}"})
    with db.sessions.begin() as s:
        repo.insert_photometry(s, full)


def test_export_csv_and_ecsv_round_trip(db, tmp_path) -> None:
    tid = make_target(db)
    seed_light_curve(db, tid)
    text = export_photometry(db.sessions, "SN 2023ixf", "csv")
    lines = text.splitlines()
    assert lines[0] == "mjd,time_utc,band,kind,mag,mag_err,flux,flux_err,limit,source"
    assert len(lines) == 1 + len(points(db, tid))
    assert lines[1].startswith("60076.0,2023-05-12T00:00:00.000,lsst_i,forced,,,-400.0,300.0,,rubin")

    ecsv = export_photometry(db.sessions, "SN 2023ixf", "ecsv")
    from astropy.table import Table

    t = Table.read(ecsv, format="ascii.ecsv")
    assert str(t["flux"].unit) == "nJy" and str(t["mag"].unit) == "mag"
    assert t.meta["time_scale"] == "UTC" and t.meta["target"] == "SN 2023ixf"

    # What tomd exports, tomd uploads back unchanged (another target, same points).
    other = make_target(db, "AT 2099zz", 10.0, 10.0)
    f = tmp_path / "export.ecsv"
    f.write_text(ecsv)
    rep = upload(db.sessions, LocalStore(tmp_path / "s"), "AT 2099zz", f)
    assert rep.errors == [] and rep.stored == len(points(db, tid))
    key = lambda p: (round(p.mjd, 6), p.band, p.kind, p.mag and round(p.mag, 9), p.flux, p.limit)  # noqa: E731
    assert sorted(map(key, points(db, other))) == sorted(map(key, points(db, tid)))


def test_export_unknown_target(db) -> None:
    with pytest.raises(NotFoundError):
        export_photometry(db.sessions, "nothing", "csv")


# ------------------------------------------------------------------ plot --


def test_plot_light_curve(db, tmp_path) -> None:
    tid = make_target(db)
    seed_light_curve(db, tid)
    out = plot_light_curve(db.sessions, "SN 2023ixf", tmp_path / "lc.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[0] > 600 and img.shape[1] > 900  # two panels (forced fluxes present), 150 dpi

    plain = make_target(db, "AT 2024abc", 20.0, 20.0)
    with pytest.raises(InputError, match="no photometry"):
        plot_light_curve(db.sessions, "AT 2024abc", tmp_path / "empty.png")
    with db.sessions.begin() as s:
        repo.insert_photometry(s, [{"target_id": plain, "mjd": 60000.0, "band": "g", "kind": "detection",
                                    "mag": 18.0, "mag_err": 0.1, "flux": None, "flux_err": None, "limit": None,
                                    "source": "x", "dedupe": "x|g|detection|60000.000000", "alert_id": None}])
    assert plot_light_curve(db.sessions, "AT 2024abc", tmp_path / "one.pdf").read_bytes()[:4] == b"%PDF"


# ------------------------------------------------------------------- CLI --


def cli(tmp_path, db, argv: list[str]) -> int:
    from tomd.config import Storage

    p = argparse.ArgumentParser(prog="tomd")
    sub = p.add_subparsers(dest="command", required=True)
    data_cli.register(sub)
    target = sub.add_parser("target").add_subparsers(dest="sub", required=True)
    data_cli.register_target_plot(target)
    args = p.parse_args(argv)
    app = SimpleNamespace(config=SimpleNamespace(storage=Storage(url=f"file://{tmp_path}/store")),
                          sessions=db.sessions)
    return args.func(app, args)


def test_cli_upload_list_export_plot(db, tmp_path, capsys) -> None:
    tid = make_target(db)
    f = tmp_path / "night1.csv"
    f.write_text(GOOD_AND_BAD_CSV)
    assert cli(tmp_path, db, ["data", "upload", "SN 2023ixf", str(f)]) == 1  # bad rows: exit 1
    out, err = capsys.readouterr()
    assert f"{f}:6: band: missing band" in err
    assert "4 points stored, 0 already stored, 6 bad rows of 10" in out and "data product #" in out
    img = write_fits(tmp_path / "im.fits", np.zeros((8, 8), dtype=np.float32), FILTER="gp", EXPTIME=60.0)
    assert cli(tmp_path, db, ["data", "upload", "#%d" % tid, str(img)]) == 0
    out, _ = capsys.readouterr()
    assert "image: stored as data product" in out and "FILTER=gp" in out
    assert (tmp_path / "store").is_dir()

    assert cli(tmp_path, db, ["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["target"]) for r in rows] == [("photometry", "SN 2023ixf"), ("image", "SN 2023ixf")]
    assert cli(tmp_path, db, ["data", "list", "--target", "SN2023ixf"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["id", "target", "kind", "facility"] and "im.fits" in out
    assert list_products(db.sessions, "SN 2023ixf")[1]["meta"]["FILTER"] == "gp"

    assert cli(tmp_path, db, ["data", "export", "SN 2023ixf", "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("upload:night1.csv") == 4
    out_png = tmp_path / "lc.png"
    assert cli(tmp_path, db, ["target", "plot", "SN 2023ixf", "-o", str(out_png)]) == 0
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_products_list_filters_by_target(db, tmp_path, shared_data: Path) -> None:
    a_id = make_target(db)
    make_target(db, "AT 2099zz", 10.0, 10.0)
    store = LocalStore(tmp_path / "s")
    f = tmp_path / "p.csv"
    f.write_text("mjd,band,mag,mag_err\n60000.0,g,18.0,0.1\n")
    upload(db.sessions, store, "AT 2099zz", f)
    a = lvk_alert(shared_data, f"{LVK}MS181101ab-preliminary.avro", "lvk-avro")
    with db.sessions.begin() as s:
        store_skymap(s, store, None, "lvk", a.event_id, a.localization.skymap, "multiorder-fits")
    assert [r["target"] for r in list_products(db.sessions)] == ["AT 2099zz", None]
    assert list_products(db.sessions, "SN 2023ixf") == []
    assert [r["kind"] for r in list_products(db.sessions, "AT2099zz")] == ["photometry"]
    assert a_id


# ------------------------------------------------------------- downloads --


def test_store_download_once_and_failures_never_stored(db, store: Store) -> None:
    import io

    from tests.test_storage import ChunkSource
    from tomd.products import store_download
    from tomd.storage import IncompleteStream

    tid = make_target(db)
    data = np.random.default_rng(1).bytes(700_000)
    md5 = hashlib.md5(data).hexdigest()
    calls = []

    def opener(fail_after=None, short=False):
        def open_():
            calls.append(1)
            return ChunkSource(data[:400_000] if short else data, fail_after=fail_after)
        return open_

    kw = dict(facility="lco", product_id="frame-991", filename="coj1m011-fa12-20230520-0100-e91.fits.fz",
              kind="image", target_id=tid, request_label="3456789", size=len(data), md5=md5)

    # A connection cut mid-file: recorded as failed, never stored, nothing in the store, no event.
    with pytest.raises(ConnectionResetError):
        store_download(db.sessions, store, opener=opener(fail_after=200_000), **kw)
    (row,) = products(db)
    assert row.state == "failed" and "ConnectionResetError" in row.meta["error"] and row.md5 is None
    assert list(store.keys()) == [] and events(db, "data.stored") == []
    # A clean close after 400 kB of 700 kB: refused against the announced size.
    with pytest.raises(IncompleteStream):
        store_download(db.sessions, store, opener=opener(short=True), **kw)
    assert products(db)[0].state == "failed" and list(store.keys()) == []

    res = store_download(db.sessions, store, opener=opener(), **kw)  # the retry completes it
    assert res.created and res.md5 == md5
    (row,) = products(db)
    assert (row.state, row.size, row.md5, row.storage_key) == \
        ("stored", len(data), md5, f"{tid}-SN_2023ixf/lco/3456789/coj1m011-fa12-20230520-0100-e91.fits.fz")
    assert "error" not in row.meta and row.stored_at is not None
    with store.open(row.storage_key) as f:
        assert f.read() == data
    (ev,) = events(db, "data.stored")
    assert ev["data_product_id"] == row.id and ev["product_id"] == "frame-991" and ev["facility"] == "lco"

    n = len(calls)
    again = store_download(db.sessions, store, opener=opener(), **kw)
    assert not again.created and len(calls) == n  # already stored: the facility is not asked again
    assert len(events(db, "data.stored")) == 1

    # A hostile file name stays inside its folder.
    evil = store_download(db.sessions, store, opener=lambda: io.BytesIO(b"x"), **(kw | {
        "product_id": "p2", "filename": "../../../etc/cron.d/x", "size": 1, "md5": None}))
    assert evil.storage_key == f"{tid}-SN_2023ixf/lco/3456789/etc_cron.d_x"


def test_upload_compressed_fits_reads_the_image_extension(db, tmp_path) -> None:
    from astropy.io import fits

    make_target(db)
    f = tmp_path / "frame.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros((32, 48), dtype=np.float32), header=fits.Header(
        [("FILTER", "ip"), ("EXPTIME", 30.0), ("DATE-OBS", "2023-05-20T01:02:03")]))]).writeto(f)
    rep = upload(db.sessions, LocalStore(tmp_path / "s"), "SN 2023ixf", f)  # kind from the name: image
    assert rep.kind == "image" and rep.product.created
    assert (rep.meta["FILTER"], rep.meta["EXPTIME"], rep.meta["shape"]) == ("ip", 30.0, [32, 48])
