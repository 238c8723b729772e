"""The example hooks in hooks/, run as the daemon runs them (worker process,
real store: a local directory and S3 on a moto server)."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from tests.test_storage import new_bucket, s3_endpoint  # noqa: F401 - the moto server fixture
from tomd.config import Storage
from tomd.db import repository as repo
from tomd.db.models import HookRun, Notification, Target
from tomd.events import DataStored, ObservationFailed, ObservationStatusChanged
from tomd.hooks.runner import HookRunner, RunnerSettings
from tomd.storage import storage_from_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hooks"))
import data_quality  # noqa: E402  (the example file, for its pure check)


def fits_bytes(*, keywords: dict, data: np.ndarray) -> bytes:
    from astropy.io import fits

    hdu = fits.PrimaryHDU(data.astype(np.float32))
    for k, v in keywords.items():
        hdu.header[k] = v
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


GOOD_KEYS = {"DATE-OBS": "2026-11-28T03:00:00", "EXPTIME": 300.0, "FILTER": "rp"}


def noise(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(1000.0, 30.0, size=(64, 64))


def test_inspect_fits_finds_missing_keywords_bad_pixels_and_blank_frames(tmp_path):
    good = tmp_path / "good.fits"
    good.write_bytes(fits_bytes(keywords=GOOD_KEYS, data=noise()))
    assert data_quality.inspect_fits(good)[0] == []
    bad_data = noise()
    bad_data[:16, :] = np.nan  # a quarter of the frame
    bad = tmp_path / "bad.fits"
    bad.write_bytes(fits_bytes(keywords={"EXPTIME": 300.0}, data=bad_data))
    problems, stats = data_quality.inspect_fits(bad)
    assert problems == ["missing header keyword(s): DATE-OBS, FILTER",
                        "25.0% of pixels are NaN/inf or saturated (limit 5%)"]
    assert stats["nonfinite"] == 16 * 64
    saturated = noise()
    saturated[:10, :] = 70000.0
    sat = tmp_path / "sat.fits"
    sat.write_bytes(fits_bytes(keywords={**GOOD_KEYS, "SATURATE": 65000.0}, data=saturated))
    assert data_quality.inspect_fits(sat)[0] == ["15.6% of pixels are NaN/inf or saturated (limit 5%)"]
    blank = tmp_path / "blank.fits"
    blank.write_bytes(fits_bytes(keywords=GOOD_KEYS, data=np.zeros((8, 8))))
    assert data_quality.inspect_fits(blank)[0] == ["blank image (all finite pixels equal)"]


@pytest.fixture(params=["local", "s3"])
def storage_config(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(url=f"file://{tmp_path / 'store'}")
    endpoint = request.getfixturevalue("s3_endpoint")
    return Storage(url=f"s3://{new_bucket(endpoint)}/tomd", s3_endpoint_url=endpoint, s3_region="us-east-1")


def examples_runner(db, storage: Storage, settings: dict) -> HookRunner:
    # timeout: also how long the worker (at nice 10, slowest on a loaded machine) may take to start and
    # load the files: far above what it needs, nothing here may depend on beating it
    return HookRunner(db.sessions, RunnerSettings(paths=(str(REPO / "hooks"),), retry_backoff=0.05, retry_max=0.1,
                                                  poll=0.1, timeout=240.0, settings=settings),
                      database_url=db.url, storage_config=storage)


def drain(runner: HookRunner, db, deadline_s: float = 240.0) -> None:
    """run_once until no run is new, pending or running: a generous deadline that ends as soon as that holds."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = runner.run_once()
        with db.sessions() as s:
            busy = s.scalar(select(HookRun.id).where(HookRun.state.in_(("pending", "running"))).limit(1))
        if not result.expanded and busy is None:
            return
        time.sleep(0.05)
    raise AssertionError("hook runs still pending")


def add_target(db, name: str) -> int:
    with db.sessions.begin() as s:
        t = Target(name=name, ra=150.0, dec=2.0)
        s.add(t)
        s.flush()
        return t.id


def store_product(db, store, target_id: int, filename: str, data: bytes, *, kind: str = "image") -> None:
    import hashlib

    key = f"{target_id}/lco/1/{filename}"
    stored = store.put(key, io.BytesIO(data))
    with db.sessions.begin() as s:
        row, _ = repo.add_data_product(s, {"target_id": target_id, "facility": "lco", "product_id": filename,
                                           "kind": kind, "filename": filename, "storage_key": key,
                                           "size": stored.size, "md5": hashlib.md5(data).hexdigest(),
                                           "state": "stored"})
        repo.add_event(s, DataStored(row.id, "lco", filename, kind, filename, key, len(data), row.md5 or "",
                                     target_id=target_id), target_id=target_id)


def test_data_quality_hook_tags_and_notifies(db, storage_config, monkeypatch):
    monkeypatch.delenv("TOMD_PIPELINE_CMD", raising=False)
    store = storage_from_config(storage_config)
    runner = examples_runner(db, storage_config, {"data_quality": {"channel": "ops"}})
    try:
        runner.start()
        good, bad = add_target(db, "SN good"), add_target(db, "SN bad")
        store_product(db, store, good, "good.fits", fits_bytes(keywords=GOOD_KEYS, data=noise()))
        bad_data = noise()
        bad_data[:16, :] = np.nan
        store_product(db, store, bad, "bad.fits", fits_bytes(keywords={"EXPTIME": 30.0}, data=bad_data))
        store_product(db, store, bad, "spectrum.txt", b"1 2 3\n", kind="spectroscopy")  # not an image: skipped
        drain(runner, db)
        with db.sessions() as s:
            assert repo.tags_of(s, [good, bad]) == {good: ["dq-ok"], bad: ["dq-failed"]}
            (note,) = s.scalars(select(Notification)).all()
            assert s.scalars(select(HookRun.state).where(HookRun.hook == "data_quality.check_fits")).all().count(
                "failed") == 0
        assert note.channel == "ops" and note.target_id == bad
        assert note.message["subject"] == "Data quality: bad.fits of SN bad failed"
        assert "missing header keyword(s): DATE-OBS, FILTER" in note.message["text"]
        assert "25.0% of pixels are NaN/inf or saturated" in note.message["text"]
    finally:
        runner.close()


def test_status_notifier_tells_final_states_and_failures(db, tmp_path):
    runner = examples_runner(db, Storage(url=f"file://{tmp_path / 'store'}"),
                             {"status_notifier": {"channel": "observers"}})
    try:
        runner.start()
        tid = add_target(db, "AT 2026abc")
        with db.sessions.begin() as s:
            for old, new in (("pending", "scheduled"), ("scheduled", "completed")):
                repo.add_event(s, ObservationStatusChanged(7, "tomd-7", "lco", "PAR-1", tid, old, new, new.upper()),
                               target_id=tid)
            repo.add_event(s, ObservationFailed(8, "tomd-8", "lco", "window over", 3, tid), target_id=tid)
        drain(runner, db)
        with db.sessions() as s:
            notes = s.scalars(select(Notification).order_by(Notification.id)).all()
        assert [(n.channel, n.message["subject"], n.message["level"]) for n in notes] == [
            ("observers", "AT 2026abc: lco request tomd-7 is completed", "info"),
            ("observers", "AT 2026abc: request tomd-8 could not be submitted", "error"),
        ]
        assert notes[0].message["text"] == "scheduled → completed (COMPLETED)"
    finally:
        runner.close()


def test_external_pipeline_runs_the_command_on_a_local_copy(db, storage_config, tmp_path):
    out_dir = tmp_path / "reduced"
    out_dir.mkdir()
    # literal braces (a dict here, awk '{print}' elsewhere) reach the program as written
    copy = ("import shutil, sys; d = {'n': 1}; shutil.copy(sys.argv[1], sys.argv[2]); "
            "print('reduced', sys.argv[3], d)")
    settings = {"external_pipeline": {"command": [sys.executable, "-c", copy, "{path}",
                                                  str(out_dir / "{event_id}-{filename}"), "{target}"],
                                      "timeout": 240, "tag": "reduced"}}
    store = storage_from_config(storage_config)
    runner = examples_runner(db, storage_config, settings)
    data = fits_bytes(keywords=GOOD_KEYS, data=noise())
    try:
        runner.start()
        tid = add_target(db, "SN 2026x")
        store_product(db, store, tid, "frame.fits", data)
        drain(runner, db)
        (made,) = out_dir.iterdir()
        assert made.name.endswith("-frame.fits") and made.read_bytes() == data
        with db.sessions() as s:
            assert "reduced" in repo.tags_of(s, [tid])[tid]
    finally:
        runner.close()


def test_external_pipeline_fills_only_its_placeholders():
    import external_pipeline

    values = {"path": "/tmp/x.fits", "filename": "x.fits", "target": "SN 1", "facility": "lco", "kind": "image",
              "event_id": 7}
    assert external_pipeline.expand("{print $1} {path}", values) == "{print $1} /tmp/x.fits"
    assert external_pipeline.expand("{other}-{event_id}{kind}", values) == "{other}-7image"
    assert external_pipeline.expand(3, values) == "3"


def test_external_pipeline_failure_is_retried_then_recorded(db, tmp_path):
    settings = {"external_pipeline": {"command": [sys.executable, "-c",
                                                  "import sys; sys.stderr.write('bad frame\\n'); sys.exit(2)",
                                                  "{path}"]}}
    storage = Storage(url=f"file://{tmp_path / 'store'}")
    runner = examples_runner(db, storage, settings)
    try:
        runner.start()
        tid = add_target(db, "SN fail")
        store_product(db, storage_from_config(storage), tid, "frame.fits", fits_bytes(keywords=GOOD_KEYS,
                                                                                       data=noise()))
        drain(runner, db)
        with db.sessions() as s:
            (run,) = s.scalars(select(HookRun).where(HookRun.hook == "external_pipeline.reduce",
                                                     HookRun.state != "done")).all()
        assert (run.state, run.attempts) == ("failed", 3)
        assert "exited with status 2: bad frame" in run.error
    finally:
        runner.close()
