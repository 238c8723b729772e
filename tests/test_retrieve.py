"""Data retrieval against the simulated observatory's archive, into a local directory and S3 (moto).

Real parts: SQLite and PostgreSQL (the ``db`` fixture), the in-process
simulated observatory over loopback HTTP (its archive lists frames page by
page, serves small FITS files, hands out expiring presigned-style URLs and
can cut a download midway), and moto's S3 server reached through boto3.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from tests.loopback import Gate
from tests.test_storage import new_bucket, s3_endpoint, store  # noqa: F401  (fixtures)
from tomd import data_cli
from tomd.db import repository as repo
from tomd.db.models import DataProduct, ObservationRequest, OutboxEvent
from tomd.facilities.lco import LCOClient
from tomd.facilities.sim import SimObservatory
from tomd.products import header_meta
from tomd.retrieve import Retriever, RetrieveSettings
from tomd.storage import LocalStore, Store
from tomd.submit import SubmitSettings, Submitter, create_intent
from tomd.targets.model import TargetSpec
from tomd.targets.store import upsert

TEMPLATES = {"1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"],
                        "exposure_time": 120},
             "1m-gri-x3": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"],
                           "exposure_time": 120, "exposure_count": 3}}
# Leases and backoffs of hours: a test that needs one over moves the due time itself (make_due), so no
# check of "not due yet" or "still held" depends on how fast the machine is.
FAST = RetrieveSettings(batch=20, lease_s=3600, max_attempts=3, backoff_base_s=3600, backoff_cap_s=7200,
                        read_timeout_s=60, connect_timeout_s=10, restarts=2)
SUBMIT = SubmitSettings(lease_s=30, backoff_base_s=0.01, backoff_cap_s=0.05, settle_s=0.05, batch=50)


@pytest.fixture
def sim():
    with SimObservatory(pending_s=3600) as s:
        yield s


def client(sim, **kw) -> LCOClient:
    args = dict(url=sim.url, token=sim.token, proposal="SIM2026A-001", templates=TEMPLATES, timeout=60,
                max_attempts=3, backoff_base=0.01, backoff_cap=0.05, rate_limit=1000.0)
    args.update(kw)
    return LCOClient("sim", **args)


def make_target(db, name="SN 2026abc", ra=150.0, dec=-20.0) -> int:
    with db.sessions.begin() as s:
        return upsert(s, TargetSpec(name=name, ra=ra, dec=dec), origin="test").target_id


def submit(db, sim, n=1, *, target="SN 2026abc", template="1m-gri") -> list[int]:
    """n requests submitted to the simulator (pending there): their tomd ids."""
    tid = make_target(db, target)
    with db.sessions.begin() as s:
        ids = [create_intent(s, target_id=tid, facility="sim", template=template, name=f"tomd-{target[-3:]}-{i}")
               for i in range(n)]
    c = client(sim)
    try:
        outs = Submitter(db.sessions, {"sim": c}, SUBMIT).run_once(ids)
    finally:
        c.close()
    assert [o.state for o in outs] == ["pending"] * n
    return ids


def complete(db, sim, rid: int) -> str:
    """The facility completes the request; the status stage marks its data due (what its poll does)."""
    with db.sessions.begin() as s:
        r = repo.get_observation(s, rid)
        sim.set_state(int(r.facility_id), "COMPLETED")
        repo.update_observation(s, rid, {"state": "completed", "facility_state": "COMPLETED"})
        repo.schedule_data_retrieval(s, rid, datetime.now(timezone.utc))
        return r.facility_id


def make_due(db, rid: int) -> None:
    with db.sessions.begin() as s:
        repo.schedule_data_retrieval(s, rid, datetime.now(timezone.utc))


def products(db, **kw) -> list[DataProduct]:
    with db.sessions() as s:
        return repo.query_data_products(s, **kw)


def request(db, rid) -> ObservationRequest:
    with db.sessions() as s:
        return repo.get_observation(s, rid)


def events(db, kind: str) -> list[dict]:
    with db.sessions() as s:
        return [e.payload for e in s.scalars(select(OutboxEvent).where(OutboxEvent.kind == kind)
                                             .order_by(OutboxEvent.id))]


def sim_md5s(sim, rows) -> dict[str, str]:
    return {r.product_id: hashlib.md5(sim.fits_bytes(int(r.product_id))).hexdigest() for r in rows}


def retriever(db, sim, storage, settings=FAST, **kw) -> Retriever:
    c = kw.pop("facility", None) or client(sim, **kw.pop("client_kw", {}))
    return Retriever(db.sessions, {"sim": c}, storage, settings, **kw)


# ------------------------------------------------------------------ tests --


def test_completed_request_frames_all_stored_with_target_and_request(db, sim, store: Store):
    (rid,) = submit(db, sim)
    fid = complete(db, sim, rid)
    seen: list[tuple] = []
    r = retriever(db, sim, store, observer=lambda *a: seen.append(a))
    (out,) = r.run_once()
    assert (out.state, out.listed, out.stored, out.failed) == ("done", 3, 3, 0), out.message
    rows = products(db, request_id=rid)
    assert len(rows) == 3 and {x.state for x in rows} == {"stored"}
    tid = request(db, rid).target_id
    md5s = sim_md5s(sim, rows)
    for x in rows:
        assert (x.facility, x.target_id, x.request_id, x.kind) == ("sim", tid, rid, "image")
        assert x.md5 == md5s[x.product_id] and x.size == len(sim.fits_bytes(int(x.product_id)))
        assert x.storage_key == f"{tid}-SN_2026abc/sim/{fid}/{x.filename}"
        with store.open(x.storage_key) as f:
            assert hashlib.md5(f.read()).hexdigest() == x.md5
        # metadata from the archive listing and from the FITS header read as it streamed by
        assert x.meta["FILTER"] in ("gp", "rp", "ip") and x.meta["OBJECT"] == "SN 2026abc"
        assert x.meta["shape"] == [16, 16] and x.error is None and x.attempts == 1
    evs = events(db, "data.stored")
    assert sorted(e["data_product_id"] for e in evs) == sorted(x.id for x in rows)
    assert {(e["request_id"], e["target_id"], e["facility"]) for e in evs} == {(rid, tid, "sim")}
    req = request(db, rid)
    assert sorted(n for _, n, ok in seen if ok) == sorted(x.size for x in rows)
    # One more look later, for products the archive adds after the first ones (reduced frames).
    later = req.data_due_at - datetime.now(timezone.utc)
    assert timedelta(minutes=55) < later <= timedelta(hours=1) and req.data_attempts == 0

    # Nothing due now: a second run does nothing at all.
    before = len(sim.downloads())
    assert r.run_once() == []
    # The look again (or a re-armed request): the same products listed, none downloaded again, and done.
    make_due(db, rid)
    (again,) = r.run_once()
    assert (again.state, again.already, again.stored) == ("done", 3, 0)
    assert len(sim.downloads()) == before and len(events(db, "data.stored")) == 3
    assert request(db, rid).data_due_at is None
    r.close()


def test_download_cut_midway_is_restarted_and_never_recorded_complete(db, sim, store: Store):
    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    sim.truncate_downloads(1)  # the first download stops after half its Content-Length
    r = retriever(db, sim, store)
    (out,) = r.run_once()
    assert out.state == "done" and out.stored == 3
    rows = products(db, request_id=rid)
    md5s = sim_md5s(sim, rows)
    assert all(x.state == "stored" and x.md5 == md5s[x.product_id] for x in rows)
    assert sorted(x.attempts for x in rows) == [1, 1, 1]  # restarted within the same attempt
    assert len(sim.downloads()) == 4 and len(events(db, "data.stored")) == 3
    r.close()


def test_download_that_keeps_failing_is_recorded_failed_and_retried_later(db, sim, store: Store):
    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    sim.truncate_downloads(3, fraction=0.3)  # the first product: every try of this attempt is cut
    r = retriever(db, sim, store)
    (out,) = r.run_once()
    assert out.state == "retry" and (out.stored, out.failed) == (2, 1)
    (bad,) = [x for x in products(db, request_id=rid) if x.state != "stored"]
    assert bad.state == "failed" and bad.md5 is None and bad.storage_key is None and bad.attempts == 1
    assert "RemoteProtocolError" in bad.error or "IncompleteStream" in bad.error, bad.error
    # No object under its key, no partial object anywhere, no event for it.
    keys = list(store.keys())
    assert len(keys) == 2 and not any(bad.filename in k for k in keys)
    assert bad.id not in [e["data_product_id"] for e in events(db, "data.stored")]
    req = request(db, rid)
    assert req.data_attempts == 1 and req.data_due_at > datetime.now(timezone.utc)  # backing off
    assert r.run_once() == []  # not due yet

    make_due(db, rid)  # time passes
    (out,) = r.run_once()
    assert (out.state, out.stored, out.already) == ("done", 1, 2)
    row = [x for x in products(db, request_id=rid) if x.id == bad.id][0]
    assert (row.state, row.error, row.attempts) == ("stored", None, 2)
    assert row.md5 == sim_md5s(sim, [row])[row.product_id]
    assert request(db, rid).data_due_at > datetime.now(timezone.utc) and request(db, rid).data_attempts == 0
    r.close()


class CuttingProxy:
    """A loopback TCP proxy (tests/netfault.py) that drops the first ``cuts`` connections
    after ``after`` bytes came back from the server: a line cut while a body is in flight."""

    def __init__(self, host: str, port: int, *, after: int, cuts: int):
        from tests.netfault import TcpProxy

        outer = self

        class Proxy(TcpProxy):
            def _pipe(self, src, dst):
                if src.getpeername() != self.target:  # client → server: as it is
                    return super()._pipe(src, dst)
                with outer.lock:
                    limit = outer.after if outer.cuts > 0 else None
                    outer.cuts -= limit is not None
                sent = 0
                try:
                    while limit is None or sent < limit:
                        data = src.recv(min(65536, limit - sent) if limit is not None else 65536)
                        if not data:
                            break
                        dst.sendall(data)
                        sent += len(data)
                except OSError:
                    pass
                for s in (src, dst):
                    try:
                        s.shutdown(2)
                    except OSError:
                        pass

        self.after, self.cuts, self.lock = after, cuts, threading.Lock()
        self.proxy = Proxy(host, port)
        self.port = self.proxy.port

    def close(self) -> None:
        self.proxy.close()


def test_connection_dropped_by_the_network_midway(db, sim, store: Store):
    """The line drops mid-body (a real TCP cut): restarted, never recorded complete, no partial object."""

    from tomd.retrieve import download_client

    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    host, port = sim.url.split("//")[1].split(":")
    proxy = CuttingProxy(host, int(port), after=5000, cuts=4)  # each FITS file is 5760 bytes

    http = download_client(FAST)
    # Downloads (not the listing) go through the proxy.
    c = client(sim)

    class ThroughProxy:
        def __getattr__(self, name):
            return getattr(c, name)

        def data_products(self, facility_id):
            from dataclasses import replace

            return [replace(p, url=p.url.replace(f":{port}/", f":{proxy.port}/")) for p in c.data_products(facility_id)]

    r = retriever(db, sim, store, facility=ThroughProxy(), http=http)
    (out,) = r.run_once()
    # 4 cuts over 3 products with 3 tries each: the first product is cut 3 times (failed), the second once.
    assert (out.state, out.stored, out.failed) == ("retry", 2, 1), out.message
    rows = products(db, request_id=rid)
    (bad,) = [x for x in rows if x.state != "stored"]
    assert bad.state == "failed" and bad.storage_key is None and "RemoteProtocolError" in bad.error, bad.error
    for x in rows:
        if x.state == "stored":
            with store.open(x.storage_key) as f:
                assert hashlib.md5(f.read()).hexdigest() == x.md5 == sim_md5s(sim, [x])[x.product_id]
    assert len(list(store.keys())) == 2 and len(events(db, "data.stored")) == 2
    make_due(db, rid)
    (out,) = r.run_once()  # the line holds now
    assert (out.state, out.stored, out.already) == ("done", 1, 2)
    http.close()
    proxy.close()
    r.close()


def test_expired_download_url_is_listed_again(db, sim, store: Store):
    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    sim.archive(url_ttl_s=3600)
    c = client(sim)
    listed = []

    class ExpiringSoon:
        """The facility as seen after a long wait: the first listing's URLs expire before use."""

        def __getattr__(self, name):
            return getattr(c, name)

        def data_products(self, facility_id):
            out = c.data_products(facility_id)
            listed.append(out)
            if len(listed) == 1:
                sim.expire_urls()
            return out

    r = retriever(db, sim, store, facility=ExpiringSoon())
    (out,) = r.run_once()
    assert out.state == "done" and out.stored == 3, out.message
    assert len(listed) == 2  # listed once more, not once per product
    assert all("expires=" in p.url for p in listed[0])
    statuses = [d.path for d in sim.downloads()]
    assert len(statuses) == 4  # one refused (expired), then three with fresh URLs
    rows = products(db, request_id=rid)
    assert {x.state for x in rows} == {"stored"} and all(x.md5 == sim_md5s(sim, [x])[x.product_id] for x in rows)
    r.close()


def test_expired_url_answer_is_s3s(sim, db):
    """The simulator's refusal has S3's shape, so the check matches what real presigned URLs return."""
    import httpx

    (rid,) = submit(db, sim)
    fid = complete(db, sim, rid)
    sim.archive(url_ttl_s=3600)
    c = client(sim)
    (p, *_) = c.data_products(fid)
    sim.expire_urls()
    resp = httpx.get(p.url)
    assert resp.status_code == 403 and "<Code>AccessDenied</Code><Message>Request has expired</Message>" in resp.text
    tampered = httpx.get(p.url.replace("signature=", "signature=0"))
    assert tampered.status_code == 403 and "SignatureDoesNotMatch" in tampered.text
    c.close()


def test_frames_listed_over_several_pages(db, sim, store: Store):
    sim.archive(frames_per_config=3)
    (rid,) = submit(db, sim, template="1m-gri-x3")
    tmpl = request(db, rid).request["requests"][0]["configurations"]
    fid = complete(db, sim, rid)
    c = client(sim, page_size=2)
    listing = c.data_products(fid)
    expected = sum(min(3, ic.get("exposure_count", 1)) for cfg in tmpl for ic in cfg["instrument_configs"])
    assert len(listing) == expected == 9
    frames_calls = len([x for x in sim.received if x.path == "/frames/"])
    assert frames_calls == 5  # every page followed (2 frames a page)
    r = retriever(db, sim, store, facility=c)
    (out,) = r.run_once()
    assert out.state == "done" and out.stored == expected
    assert len({x.product_id for x in products(db, request_id=rid)}) == expected
    r.close()


def test_md5_mismatch_is_never_stored(db, sim, store: Store):
    """An archive whose checksum disagrees with the bytes: refused before the object completes."""
    from dataclasses import replace

    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    c = client(sim)

    class WrongChecksums:
        def __getattr__(self, name):
            return getattr(c, name)

        def data_products(self, facility_id):
            return [replace(p, md5="0" * 32) for p in c.data_products(facility_id)]

    r = retriever(db, sim, store, facility=WrongChecksums())
    (out,) = r.run_once()
    assert out.state == "retry" and out.stored == 0
    rows = products(db, request_id=rid)
    assert rows and {x.state for x in rows} == {"failed"} and all("MD5" in x.error for x in rows)
    assert list(store.keys()) == [] and events(db, "data.stored") == []
    r.close()


def test_gives_up_after_the_attempt_limit_and_says_so(db, sim, tmp_path, caplog):
    (rid,) = submit(db, sim)  # never completes: the archive lists nothing
    make_due(db, rid)
    r = retriever(db, sim, LocalStore(tmp_path / "s"), RetrieveSettings(max_attempts=2, backoff_base_s=0.01,
                                                                        backoff_cap_s=0.01))
    with caplog.at_level(logging.INFO, logger="tomd.retrieve"):
        (first,) = r.run_once()
        assert first.state == "retry" and "lists no products yet" in first.message
        time.sleep(0.02)  # the backoff (10 ms) passes
        (second,) = r.run_once()
    assert second.state == "gave_up"
    req = request(db, rid)
    assert req.data_due_at is None and req.data_attempts == 2
    (ev,) = events(db, "data.retrieval_failed")
    assert ev["request_id"] == rid and ev["attempts"] == 2 and "lists no products" in ev["error"]
    assert any("giving up" in m and f"#{rid}" in m for m in caplog.messages)
    assert r.run_once() == []
    r.close()


def test_two_retrievers_never_download_the_same_product_twice(db, sim, tmp_path):
    if db.kind != "postgresql":
        pytest.skip("several daemons share one PostgreSQL database")
    ids = submit(db, sim, 6)
    for rid in ids:
        complete(db, sim, rid)
    store = LocalStore(tmp_path / "store")
    small = RetrieveSettings(**{**FAST.__dict__, "batch": 2})
    rs = [retriever(db, sim, store, small, worker_id=f"w{i}") for i in range(3)]
    outs: list = []
    errors: list = []
    barrier = threading.Barrier(len(rs))

    def work(r):
        try:
            barrier.wait()
            while True:
                got = r.run_once()
                if not got:
                    return
                outs.extend(got)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in rs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(o.request_id for o in outs) == sorted(ids)  # each request handled once
    paths = [d.path for d in sim.downloads()]
    assert len(paths) == len(set(paths)) == 18  # every frame downloaded exactly once
    assert len(events(db, "data.stored")) == 18
    assert {x.state for x in products(db)} == {"stored"}
    for r in rs:
        r.close()


def test_a_product_being_fetched_elsewhere_is_not_fetched_again(db, sim, tmp_path):
    """A request re-armed while a worker downloads it: a second worker skips the product in flight."""
    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    sim.archive(frames_per_config=1)
    store = LocalStore(tmp_path / "store")
    # "a" reaches the facility through a gate that holds its first download until "b" has run (its
    # timeouts outlast any wait for "b": the held download is never given up and fetched again).
    gate = Gate(sim.url, "GET", "/download/*")
    patient = RetrieveSettings(**{**FAST.__dict__, "read_timeout_s": 300.0, "grace_s": 300.0})
    a = retriever(db, sim, store, patient, worker_id="a", client_kw={"url": gate.url})
    b = retriever(db, sim, store, worker_id="b")
    result: list = []
    t = threading.Thread(target=lambda: result.extend(a.run_once()))
    t.start()
    try:
        assert gate.arrived.wait(60), "a never started a download"
        make_due(db, rid)  # a poll re-arms the request while "a" is downloading
        (out_b,) = b.run_once()
    finally:
        gate.release.set()
        t.join(60)
        gate.close()
    assert not t.is_alive()
    (out_a,) = result
    assert any(p.state == "skipped" for p in out_b.products)  # the frame "a" holds
    assert out_b.state == "retry"
    paths = [d.path for d in sim.downloads()]
    assert len(paths) == len(set(paths))  # no frame fetched twice
    assert out_a.state in ("done", "retry", "lost")  # "b" took the re-armed request over: "a" stops
    make_due(db, rid)
    (last,) = b.run_once()
    assert last.state == "done" and last.stored + last.already == len(products(db, request_id=rid))
    paths = [d.path for d in sim.downloads()]
    assert len(paths) == len(set(paths))
    a.close()
    b.close()


def test_full_cycle_submitted_in_progress_completed_data_stored(db, sim, store: Store):
    """Intent → submitted → IN_PROGRESS → COMPLETED (the status poll marks the data due) → data stored."""
    from tomd.status import Poller

    (rid,) = submit(db, sim, target="SN 2026xyz")
    c = client(sim)
    poller = Poller(db.sessions, {"sim": c}, cadence=None)
    r = retriever(db, sim, store, facility=c)
    gid = int(request(db, rid).facility_id)
    seen = []
    for word in ("IN_PROGRESS", "COMPLETED"):
        sim.set_state(gid, word)
        poller.poll()
        seen.append(request(db, rid).state)
        if word == "IN_PROGRESS":
            assert request(db, rid).data_due_at is None and r.run_once() == []  # nothing to fetch yet
    assert seen == ["in_progress", "completed"]
    assert request(db, rid).data_due_at is not None  # set by the poll, not by the test
    (out,) = r.run_once()
    assert out.state == "done" and out.stored == 3, out.message
    rows = products(db, request_id=rid)
    assert {x.state for x in rows} == {"stored"} and all(store.exists(x.storage_key) for x in rows)
    assert all(x.md5 == sim_md5s(sim, [x])[x.product_id] for x in rows)
    assert all(x.storage_key.startswith(f"{request(db, rid).target_id}-SN_2026xyz/sim/{gid}/") for x in rows)
    # Header metadata read from the frames as they streamed by (what processors and hooks use).
    for x in rows:
        assert x.meta["OBJECT"] == "SN 2026xyz" and x.meta["EXPTIME"] > 0 and x.meta["FILTER"]
        assert datetime.fromisoformat(x.meta["DATE-OBS"]) and x.meta["MJD-OBS"] > 60000
    assert request(db, rid).data_due_at > datetime.now(timezone.utc)  # one look again, later
    poller.poll()  # a later poll changes nothing, and nothing is fetched again
    assert r.run_once() == [] and len(events(db, "data.stored")) == 3
    r.close()


def test_run_loop_fetches_when_due_and_stops(db, sim, tmp_path):
    (rid,) = submit(db, sim)
    store = LocalStore(tmp_path / "store")
    r = retriever(db, sim, store, RetrieveSettings(interval_s=30))
    stop = threading.Event()
    t = threading.Thread(target=r.run, args=(stop,))
    t.start()
    complete(db, sim, rid)
    r.wake()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(products(db, state="stored")) < 3:
        time.sleep(0.05)
    stop.set()
    r.wake()
    t.join(60)
    assert not t.is_alive()
    assert len(products(db, state="stored")) == 3
    r.close()


# ------------------------------------------------------------------- CLI --


def cli(tmp_path, db, sim, argv: list[str]) -> int:
    from tomd.config import Facility, Secret, Storage

    p = argparse.ArgumentParser(prog="tomd")
    sub = p.add_subparsers(dest="command", required=True)
    data_cli.register(sub)
    args = p.parse_args(argv)
    config = SimpleNamespace(storage=Storage(url=f"file://{tmp_path}/store"),
                             facilities={"sim": Facility(kind="sim", url=sim.url, proposal="SIM2026A-001",
                                                         timeout=60.0, token=Secret(sim.token))})
    return args.func(SimpleNamespace(config=config, sessions=db.sessions), args)


def test_cli_download_request_and_product_and_list(db, sim, tmp_path, capsys):
    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    sim.truncate_downloads(3)  # the first product fails all its tries
    assert cli(tmp_path, db, sim, ["data", "download", "--request", f"#{rid}"]) == 1
    out, err = capsys.readouterr()
    assert f"request #{rid}: 2 stored now, 0 already stored, 1 not stored" in out
    assert "failed sim-" in err
    (bad,) = [x for x in products(db) if x.state == "failed"]
    assert request(db, rid).data_due_at is not None  # still due: the daemon will try again

    assert cli(tmp_path, db, sim, ["data", "list", "--request", str(rid)]) == 0
    out, err = capsys.readouterr()
    assert "failed (1 tries)" in out and bad.filename in err
    assert cli(tmp_path, db, sim, ["data", "download", str(bad.id)]) == 0
    out, _ = capsys.readouterr()
    assert f"stored {bad.filename}" in out

    assert cli(tmp_path, db, sim, ["data", "download", "--request", request(db, rid).name]) == 0
    out, _ = capsys.readouterr()
    assert "0 stored now, 3 already stored, 0 not stored" in out
    assert request(db, rid).data_due_at is None  # everything stored: nothing left for the daemon
    assert cli(tmp_path, db, sim, ["data", "list", "--request", f"#{rid}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and {r["state"] for r in rows} == {"stored"} and {r["request_id"] for r in rows} == {rid}
    assert cli(tmp_path, db, sim, ["data", "list", "--target", "SN 2026abc", "--request", f"#{rid}"]) == 0


# --------------------------------------------------------------- headers --


def test_header_meta_from_the_first_bytes_of_plain_and_compressed_fits(tmp_path):
    import numpy as np
    from astropy.io import fits

    hdr = fits.Header([("FILTER", "rp"), ("EXPTIME", 90.0), ("DATE-OBS", "2026-11-28T01:02:03.000"),
                       ("RA", "10:00:00.0"), ("DEC", "-20:00:00")])
    plain = io.BytesIO()
    fits.PrimaryHDU(np.zeros((40, 30), dtype=np.int16), header=hdr).writeto(plain)
    m = header_meta(plain.getvalue()[:65536])
    assert (m["FILTER"], m["EXPTIME"], m["shape"]) == ("rp", 90.0, [40, 30])
    assert m["ra_deg"] == pytest.approx(150.0) and m["dec_deg"] == pytest.approx(-20.0)
    fz = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros((64, 48), dtype=np.float32), header=hdr)]).writeto(fz)
    m = header_meta(fz.getvalue()[:65536])
    assert (m["FILTER"], m["shape"]) == ("rp", [64, 48])
    assert header_meta(b"not fits at all") == {} and header_meta(plain.getvalue()[:1000]) == {}


def test_stopping_releases_the_request_for_another_daemon(db, sim, tmp_path):
    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    r = retriever(db, sim, LocalStore(tmp_path / "s"))
    r.stop_event.set()  # the daemon is stopping as the run starts
    (out,) = r.run_once()
    assert out.state == "stopped" and out.stored == 0 and sim.downloads() == []
    req = request(db, rid)
    assert req.data_due_at <= datetime.now(timezone.utc) and req.data_attempts == 0  # due at once, no attempt spent
    other = retriever(db, sim, LocalStore(tmp_path / "s"))
    (out,) = other.run_once()
    assert out.state == "done" and out.stored == 3 and other.ready() is True
    r.close()
    other.close()


def test_a_large_frame_streams_through_without_being_held_in_memory(db, sim, tmp_path):
    """A 16 MB frame goes to the store in chunks: the retriever's peak allocation stays far below its size."""
    import tracemalloc

    sim.archive(frames_per_config=1, image_shape=(4096, 2048))  # int16: 16 MiB of data per frame
    (rid,) = submit(db, sim)
    fid = complete(db, sim, rid)
    c = client(sim)
    size = c.data_products(fid)[0].size  # the simulator makes (and keeps) its files now, outside the measure
    assert size > 16 * 2**20
    r = retriever(db, sim, LocalStore(tmp_path / "s"), facility=c)
    tracemalloc.start()
    try:
        (out,) = r.run_once()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.state == "done" and out.stored == 3
    print(json.dumps({"frame_bytes": size, "frames": 3, "peak_traced_bytes": peak}))
    assert peak < size / 2, f"peak {peak} bytes for {size}-byte frames"
    rows = products(db, request_id=rid)
    assert all(x.size == size and x.md5 == sim_md5s(sim, [x])[x.product_id] for x in rows)
    assert rows[0].meta["shape"] == [4096, 2048]
    r.close()


def test_a_facility_without_an_archive_is_settled_at_once(db, sim, tmp_path):
    """Gemini and Swift data arrive outside this interface: their completions are not retried for days."""
    (rid,) = submit(db, sim)
    make_due(db, rid)
    c = client(sim)
    c.kind = "gemini"  # the client of a facility whose data go through another archive
    r = retriever(db, sim, LocalStore(tmp_path / "s"), facility=c)
    (out,) = r.run_once()
    assert out.state == "done" and "no archive" in out.message
    assert request(db, rid).data_due_at is None and events(db, "data.retrieval_failed") == []
    assert not [x for x in sim.received if x.path == "/frames/"]
    r.close()


def test_settings_from_the_data_section(tmp_path):
    from tomd.config import load_config

    f = tmp_path / "tomd.toml"
    f.write_text('[data]\ninterval = "30s"\nmax_attempts = 4\nbackoff = "2m"\nbackoff_max = "1h"\n'
                 'timeout = "20s"\nmin_rate_kbps = 200\n')
    s = RetrieveSettings.from_config(load_config(f, env={}).data)
    assert (s.interval_s, s.max_attempts, s.backoff_base_s, s.backoff_cap_s, s.read_timeout_s, s.min_rate_bps) == \
        (30.0, 4, 120.0, 3600.0, 20.0, 200_000.0)
    from tomd.config import Config

    assert RetrieveSettings.from_config(Config().data) == RetrieveSettings()  # the defaults agree
    f.write_text('[data]\nmax_attempts = 0\n')
    with pytest.raises(Exception, match=r"data\.max_attempts"):
        load_config(f, env={})


def test_products_the_archive_adds_later_are_fetched_at_the_second_look(db, sim, tmp_path):
    """LCO's reduced frames follow the raw ones: the look again finds them; a look with nothing new ends it."""
    sim.archive(frames_per_config=1)
    (rid,) = submit(db, sim, template="1m-gri-x3")  # 3 exposures per filter
    complete(db, sim, rid)
    r = retriever(db, sim, LocalStore(tmp_path / "s"))
    (first,) = r.run_once()
    assert (first.state, first.stored) == ("done", 3) and request(db, rid).data_due_at is not None
    sim.archive(frames_per_config=3)  # the archive now lists every exposure: 6 more frames
    make_due(db, rid)  # the second look falls due
    (second,) = r.run_once()
    assert (second.state, second.already, second.stored) == ("done", 3, 6)
    assert request(db, rid).data_due_at is not None  # new ones came: one more look
    make_due(db, rid)
    (third,) = r.run_once()
    assert (third.stored, third.already) == (0, 9) and request(db, rid).data_due_at is None
    assert len(products(db, request_id=rid, state="stored")) == 9 and len(events(db, "data.stored")) == 9
    r.close()


def test_a_download_slower_than_the_minimum_rate_is_cut(db, sim, tmp_path):
    """A body that trickles in (1 kB every 50 ms through a loopback proxy) is cut, never stored."""
    import socket as sk

    (rid,) = submit(db, sim)
    complete(db, sim, rid)
    sim.archive(frames_per_config=1)
    host, port = sim.url.split("//")[1].split(":")

    lst = sk.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    closing = threading.Event()

    def pipe(src, dst, slow):
        try:
            while not closing.is_set():
                data = src.recv(1024 if slow else 65536)
                if not data:
                    break
                dst.sendall(data)
                if slow:
                    time.sleep(0.05)
        except OSError:
            pass
        for s_ in (src, dst):
            try:
                s_.shutdown(2)
            except OSError:
                pass

    def accept():
        while not closing.is_set():
            try:
                cl, _ = lst.accept()
            except OSError:
                return
            up = sk.create_connection((host, int(port)))
            threading.Thread(target=pipe, args=(cl, up, False), daemon=True).start()
            threading.Thread(target=pipe, args=(up, cl, True), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    c = client(sim)

    class Throttled:
        def __getattr__(self, name):
            return getattr(c, name)

        def data_products(self, facility_id):
            from dataclasses import replace

            return [replace(p, url=p.url.replace(f":{port}/", f":{lst.getsockname()[1]}/"))
                    for p in c.data_products(facility_id)]

    slow = RetrieveSettings(**{**FAST.__dict__, "grace_s": 0.1, "min_rate_bps": 1e9, "restarts": 0})
    r = retriever(db, sim, LocalStore(tmp_path / "s"), slow, facility=Throttled())
    try:
        (out,) = r.run_once()
    finally:
        closing.set()
        lst.close()
    assert out.state == "retry" and out.stored == 0
    rows = products(db, request_id=rid)
    assert rows and all(x.state == "failed" and "too slow" in x.error for x in rows), [x.error for x in rows]
    assert list(LocalStore(tmp_path / "s").keys()) == []
    r.close()


def test_failed_runs_reach_on_error_and_the_log_says_it_once_then_in_one_line(tmp_path, caplog):
    """A database without tables: every run fails. Each failure reaches ``on_error`` (the
    daemon's tomd_database_errors_total{component="retriever"}), the log holds one traceback,
    then one-line repeats at most every 30 s, and readiness says why."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import sessionmaker

    engine = create_engine(f"sqlite:///{tmp_path}/empty.db")
    r = Retriever(sessionmaker(engine), {}, LocalStore(str(tmp_path / "data")), RetrieveSettings(interval_s=0.02))
    seen: list[BaseException] = []
    r.on_error = seen.append
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="tomd.retrieve")
    t = threading.Thread(target=r.run, args=(stop,))
    t.start()
    deadline = time.monotonic() + 30
    while len(seen) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(10)
    engine.dispose()
    assert len(seen) >= 20 and all(isinstance(e, OperationalError) for e in seen)
    failures = [rec for rec in caplog.records if "data retrieval run" in rec.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR and failures[0].exc_info
    assert "no such table" in r.ready()
