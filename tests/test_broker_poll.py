"""Broker queries (kind = "poll"): TNS, ALeRCE and Fink REST APIs into the ingest path.

Each service is a loopback HTTP server speaking its public protocol (shapes
from the services' documentation and public clients): TNS form POSTs with
``api_key`` + JSON ``data`` and a ``tns_marker`` User-Agent, ``id_code``
envelopes and ``x-rate-limit-*`` headers; ALeRCE ``/objects`` pages with
``lastmjd`` ranges and ``/objects/{oid}/lightcurve``; Fink ``/api/v1/latests``
with ``startdate``/``stopdate`` and ``n``. Faults (429, 5xx, slow answers) are
injected per path. Results must land as targets + photometry, polling again
must change nothing, and the cursor must survive a restart.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func, select

from tomd.alerts.ingest import IngestSettings, Ingestor
from tomd.brokers.http import quota_exhausted, retry_after
from tomd.brokers.poll import PollStream
from tomd.config import Secret, Stream, load_config
from tomd.daemon import parser_for
from tomd.db import repository as repo
from tomd.db.models import AlertRow, DeadLetter, Photometry, Target, TargetName
from tomd.errors import ConfigError

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=timezone.utc)
MJD_NOW = (NOW - datetime(1858, 11, 17, tzinfo=timezone.utc)) / timedelta(days=1)


# ------------------------------------------------------------ fake services


class FakeService:
    """A loopback HTTP server; ``route(method, path, query, body, headers)`` → (status, headers, obj)."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, bytes, dict]] = []
        self.faults: list[tuple[str, int | str, dict]] = []  # (path prefix, status or "slow", headers)
        self.slow_s = 1.0
        self.closed = threading.Event()  # ends a slow answer's wait
        service = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                service.requests.append((self.command, url.path, query, body, dict(self.headers)))
                for i, (prefix, status, headers) in enumerate(service.faults):
                    if url.path.startswith(prefix):
                        del service.faults[i]
                        if status == "slow":
                            service.closed.wait(service.slow_s)
                            break
                        return self._send(status, headers, {"id_code": status, "id_message": "injected fault"})
                status, headers, obj = service.route(self.command, url.path, query, body, self.headers)
                self._send(status, headers, obj)

            def _send(self, status, headers, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    def paths(self, prefix: str = "") -> list[str]:
        return [p for _, p, _, _, _ in self.requests if p.startswith(prefix)]


class FakeTNS(FakeService):
    API_KEY = "tns-secret-key-123"

    def __init__(self):
        super().__init__()
        self.objects: dict[str, dict] = {}  # objname → object reply
        self.modified: dict[str, datetime] = {}

    def add(self, objname: str, ra: float, dec: float, modified: datetime, ztf: str, n_phot: int = 2):
        self.objects[objname] = {
            "objname": objname, "name_prefix": "AT", "objid": 100000 + len(self.objects),
            "ra": "00:00:00.000", "dec": "+00:00:00.00", "radeg": ra, "decdeg": dec,
            "radeg_err": 2.5e-05, "decdeg_err": 2.5e-05, "redshift": None, "hostname": None, "host_redshift": None,
            "internal_names": f"{ztf}, ATLAS{objname[2:]}", "discoverer_internal_name": ztf,
            "discoverydate": "2026-11-19 03:39:50.400", "discoverymag": 18.9,
            "discmagfilter": {"id": 111, "name": "r", "family": "ZTF"}, "discoverer": "ZTF team",
            "object_type": {"name": None, "id": None}, "reporting_group": {"groupid": 48, "group_name": "ZTF"},
            "discovery_data_source": {"groupid": 48, "group_name": "ZTF"}, "reporter": "ZTF", "reporterid": 1,
            "public": 1, "end_prop_period": None, "source": "bot",
            "photometry": [
                {"obsdate": "2026-11-19 03:39:50.400", "jd": 2461363.6526666 + 0.1 * i, "flux": 18.9 - 0.1 * i,
                 "fluxerr": 0.08, "limflux": "", "flux_unit": {"id": 1, "name": "ABMag"},
                 "filters": {"id": 111, "name": "r"}, "instrument": {"id": 196, "name": "ZTF-Cam"},
                 "telescope": {"id": 66, "name": "P48"}}
                for i in range(n_phot)
            ] + [{"jd": 2461362.6, "flux": "", "fluxerr": "", "limflux": 20.5,
                  "flux_unit": {"id": 1, "name": "ABMag"}, "filters": {"id": 110, "name": "g"}}],
        }
        self.modified[objname] = modified

    def route(self, method, path, query, body, headers):
        limits = {"x-rate-limit-limit": "90", "x-rate-limit-remaining": "80", "x-rate-limit-reset": "30"}
        form = parse_qs(body.decode())
        if form.get("api_key") != [self.API_KEY]:
            return 401, limits, {"id_code": 401, "id_message": "Unauthorized"}
        if not headers.get("User-Agent", "").startswith("tns_marker{"):
            return 403, limits, {"id_code": 403, "id_message": "Forbidden"}
        data = json.loads(form["data"][0])
        if path == "/api/get/search":
            since = datetime.strptime(data["public_timestamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
            hits = sorted((o for n, o in self.objects.items() if self.modified[n] >= since),
                          key=lambda o: -o["objid"])
            size, page = int(data["num_page"]), int(data["page"])
            reply = [{"objname": o["objname"], "prefix": o["name_prefix"], "objid": o["objid"]}
                     for o in hits[page * size:(page + 1) * size]]
            return 200, limits, {"id_code": 200, "id_message": "OK",
                                 "data": {"received_data": data, "reply": reply}}
        if path == "/api/get/object":
            obj = self.objects.get(data["objname"])
            if obj is None:
                return 404, limits, {"id_code": 404, "id_message": "Not Found"}
            return 200, limits, {"id_code": 200, "id_message": "OK", "data": {"received_data": data, "reply": obj}}
        return 404, {}, {"id_code": 404, "id_message": "Not Found"}


class FakeALeRCE(FakeService):
    def __init__(self):
        super().__init__()
        self.objects: list[dict] = []
        self.lightcurves: dict[str, dict] = {}

    def add(self, oid: str, ra: float, dec: float, lastmjd: float, cls: str = "SNIa"):
        self.objects.append({
            "oid": oid, "ndethist": 3, "ncovhist": 40, "mjdstarthist": lastmjd - 2, "mjdendhist": lastmjd,
            "corrected": False, "stellar": False, "ndet": 3, "g_r_max": 0.1, "g_r_mean": 0.05,
            "firstmjd": lastmjd - 2, "lastmjd": lastmjd, "deltajd": 2.0, "meanra": ra, "meandec": dec,
            "sigmara": 0.1, "sigmadec": 0.1, "class": cls, "classifier": "lc_classifier", "probability": 0.7,
            "step_id_corr": "1.2.0",
        })
        self.lightcurves[oid] = {
            "detections": [
                {"mjd": lastmjd - 2 + i, "candid": f"{abs(hash(oid)) % 10**9}{i}", "fid": 1 + i % 2, "pid": 1,
                 "diffmaglim": 20.3, "isdiffpos": 1, "magpsf": 19.0 - 0.2 * i, "sigmapsf": 0.1,
                 "ra": ra, "dec": dec, "rb": 0.9, "drb": 0.99, "has_stamp": True}
                for i in range(3)
            ],
            "non_detections": [{"mjd": lastmjd - 5, "fid": 1, "diffmaglim": 20.1}],
        }

    def route(self, method, path, query, body, headers):
        if path == "/ztf/v1/objects":
            lo, hi = (float(x) for x in query["lastmjd"])
            rows = [o for o in self.objects if lo <= o["lastmjd"] <= hi
                    and all(o.get(k) == v[0] for k, v in query.items() if k in ("class", "classifier"))]
            rows.sort(key=lambda o: (o["lastmjd"], o["oid"]))
            page, size = int(query["page"][0]), int(query["page_size"][0])
            items = rows[(page - 1) * size:page * size]
            has_next = page * size < len(rows)
            return 200, {}, {"total": len(rows), "page": page, "next": page + 1 if has_next else None,
                             "has_next": has_next, "prev": page - 1 or None, "has_prev": page > 1, "items": items}
        if path.startswith("/ztf/v1/objects/") and path.endswith("/lightcurve"):
            oid = path.split("/")[4]
            if oid not in self.lightcurves:
                return 404, {}, {"detail": "Object not found"}
            return 200, {}, self.lightcurves[oid]
        return 404, {}, {"detail": "Not Found"}


class FakeFink(FakeService):
    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []

    def add(self, candid: int, oid: str, ra: float, dec: float, jd: float, cls: str = "Early SN Ia candidate",
            **extra):
        row = {"i:candid": candid, "i:objectId": oid, "i:ra": ra, "i:dec": dec, "i:jd": jd, "i:fid": 2,
               "i:magpsf": 18.7, "i:sigmapsf": 0.07, "i:isdiffpos": "t", "i:drb": 0.98, "i:ndethist": 4,
               "i:diffmaglim": 20.4, "d:cdsxmatch": "Unknown", "d:rf_snia_vs_nonia": 0.81,
               "d:tns": "", "v:classification": cls, "v:lastdate": "2026-11-20 10:00:00"}
        row.update(extra)
        self.rows.append(row)

    def route(self, method, path, query, body, headers):
        if path != "/api/v1/latests" or method != "POST":
            return 404, {}, {"status": "error"}
        q = json.loads(body)

        def jd(text):
            t = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
            return 2440587.5 + t.timestamp() / 86400.0

        lo, hi = jd(q["startdate"]), jd(q["stopdate"])
        rows = [r for r in self.rows if r.get("v:classification") == q["class"] and lo <= r["i:jd"] <= hi]
        rows.sort(key=lambda r: -r["i:jd"])  # latest first
        return 200, {}, rows[: int(q["n"])]


@pytest.fixture
def tns():
    s = FakeTNS()
    yield s
    s.close()


@pytest.fixture
def alerce():
    s = FakeALeRCE()
    yield s
    s.close()


@pytest.fixture
def fink():
    s = FakeFink()
    yield s
    s.close()


# ----------------------------------------------------------------- helpers


def stream(fmt: str, url: str, **kw) -> Stream:
    base = dict(name=fmt.split("-")[0], kind="poll", format=fmt, url=url, interval=0.05, timeout=10.0)
    return Stream(**{**base, **kw})


def poller(db, st: Stream, clock=lambda: NOW) -> PollStream:
    ingestor = Ingestor(db.sessions, IngestSettings(stream=st.name, format=st.format),
                        parser_for(st.format, include_test=False))
    p = PollStream(st, ingestor, clock=clock)
    p.http.backoff_s = 0.01  # keep injected faults quick; waits asked by the service are still honoured
    return p


def counts(db) -> dict[str, int]:
    with db.sessions() as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                for m in (AlertRow, Target, TargetName, Photometry, DeadLetter)}


def names(db) -> dict[str, set[str]]:
    with db.sessions() as s:
        out: dict[str, set[str]] = {}
        for t in s.scalars(select(Target)):
            out[t.name] = {n.name for n in s.scalars(select(TargetName).where(TargetName.target_id == t.id))}
        return out


def cursor(db, name: str) -> str | None:
    with db.sessions() as s:
        return repo.poll_cursor(s, f"broker:{name}")


STOP = threading.Event()


# -------------------------------------------------------------------- TNS


def test_tns_new_objects_become_targets_with_aliases_and_photometry_once(db, tns):
    for i in range(5):
        tns.add(f"2026ab{chr(97 + i)}", 10.0 + i, -5.0 - i, NOW - timedelta(hours=i + 1), f"ZTF26aaaaa{chr(97 + i)}")
    tns.add("2025old", 50.0, 5.0, NOW - timedelta(days=30), "ZTF25oldoldo")  # before the first window
    st = stream("tns-api", tns.url, api_key=Secret(FakeTNS.API_KEY), bot_id=1234, bot_name="tomd_bot",
                page_size=2, lookback=86400.0)
    # A rate-limited search (TNS's 429 with its reset header), then a server error on one object.
    tns.faults += [("/api/get/search", 429, {"x-rate-limit-remaining": "0", "x-rate-limit-reset": "1"}),
                   ("/api/get/object", 503, {})]
    p = poller(db, st)
    assert p.poll_once(STOP)

    c = counts(db)
    assert c["alerts"] == 5 and c["targets"] == 5
    assert c["photometry"] == 5 * 3  # two detections and one upper limit each
    got = names(db)
    assert "AT 2026aba" in got and {"ZTF26aaaaaa", "ATLAS26aba", "2026aba"} <= got["AT 2026aba"]
    assert "AT 2025old" not in got
    assert p.http.waited_s >= 1.0  # the reset TNS asked for was waited out
    # Paged search (page size 2 → pages 0, 1, 2, then an empty 3), the bot's marker and key on every
    # call, the key in no URL.
    searches = [json.loads(parse_qs(b.decode())["data"][0]) for _, path, _, b, _ in tns.requests
                if path == "/api/get/search"]
    assert [s["page"] for s in searches[1:]] == ["0", "1", "2", "3"]  # the first one met the 429
    assert all(s["num_page"] == "2" and s["public_timestamp"] == "2026-11-19 11:50:00" for s in searches)
    assert all(h["User-Agent"] == 'tns_marker{"tns_id": "1234", "type": "bot", "name": "tomd_bot"}'
               for _, _, _, _, h in tns.requests)
    assert all(FakeTNS.API_KEY not in path for _, path, _, _, _ in tns.requests)
    first = cursor(db, "tns")
    assert first == "2026-11-20T12:00:00.000000Z"

    # Polling again over overlapping windows changes nothing.
    p2 = poller(db, st, clock=lambda: NOW + timedelta(minutes=5))
    assert p2.poll_once(STOP)
    assert counts(db) == c

    # A change at TNS (a classification, new photometry) is a new alert on the same target.
    obj = tns.objects["2026aba"]
    obj["photometry"].append({**obj["photometry"][0], "jd": 2461364.9, "flux": 18.1})
    obj["object_type"] = {"name": "SN Ia", "id": 3}
    obj["name_prefix"] = "SN"
    tns.modified["2026aba"] = NOW + timedelta(minutes=7)
    assert poller(db, st, clock=lambda: NOW + timedelta(minutes=10)).poll_once(STOP)
    c2 = counts(db)
    assert (c2["alerts"], c2["targets"], c2["photometry"]) == (6, 5, 16)
    with db.sessions() as s:
        row = s.scalar(select(AlertRow).where(AlertRow.object_id == "SN 2026aba"))
    assert row.fields["object_type"] == "SN Ia" and row.target_id is not None  # the same target, by its TNS name


def test_tns_refusal_is_an_error_not_a_crash_and_the_cursor_stays(db, tns):
    tns.add("2026xyz", 1.0, 2.0, NOW - timedelta(hours=1), "ZTF26xyzxyzx")
    st = stream("tns-api", tns.url, api_key=Secret("wrong-key"), bot_id=1, bot_name="b")
    p = poller(db, st)
    assert not p.poll_once(STOP)
    assert p.stats.failures == 1 and "HTTP 401" in p.stats.last_error
    assert "wrong-key" not in p.stats.last_error
    assert cursor(db, "tns") is None and counts(db)["alerts"] == 0


# ----------------------------------------------------------------- ALeRCE


def test_alerce_full_pages_split_the_window_and_known_objects_are_not_fetched_again(db, alerce):
    for i in range(7):
        alerce.add(f"ZTF26aalerc{i}", 100.0 + i, 20.0, MJD_NOW - 0.5 + 0.05 * i)
    alerce.add("ZTF26aotherx", 120.0, 21.0, MJD_NOW - 0.2, cls="AGN")  # another class: not asked for
    st = stream("alerce-api", alerce.url + "/ztf/v1", page_size=3,
                query={"classifier": "lc_classifier", "class": "SNIa"})
    alerce.faults += [("/ztf/v1/objects", "slow", {}), ("/ztf/v1/objects/ZTF26aalerc3", 500, {})]
    # The slow answer never comes in time (it lasts until the service closes): only the client's
    # timeout ends it, and every other answer has that long to arrive.
    alerce.slow_s = 600.0
    st = replace(st, timeout=2.0)
    p = poller(db, st)
    assert p.poll_once(STOP)
    c = counts(db)
    assert c["alerts"] == 7 and c["targets"] == 7
    assert c["photometry"] == 7 * 4  # three detections + one limit each
    with db.sessions() as s:
        t = s.scalar(select(Target).where(Target.name == "ZTF26aalerc0"))
        bands = {(p.band, p.kind) for p in repo.photometry_of(s, t.id)}
        row = s.scalar(select(AlertRow).where(AlertRow.object_id == "ZTF26aalerc0"))
    assert bands == {("ztfg", "detection"), ("ztfr", "detection"), ("ztfg", "upper_limit")}
    assert row.fields["alerce_class"] == "SNIa" and row.payload["object"]["oid"] == "ZTF26aalerc0"
    # No listing answered more than a page: full windows were split.
    listings = [q for _, path, q, _, _ in alerce.requests if path == "/ztf/v1/objects"]
    assert all(q["page"] == ["1"] for q in listings) and len(listings) > 1
    lightcurves = len(alerce.paths("/ztf/v1/objects/"))

    # Again with a long overlap: listed again, nothing stored twice, no light curve asked again.
    p2 = poller(db, replace(st, overlap=3 * 86400.0), clock=lambda: NOW + timedelta(hours=1))
    assert p2.poll_once(STOP)
    assert counts(db) == c
    assert len(alerce.paths("/ztf/v1/objects/")) == lightcurves


def test_a_malformed_result_is_dead_lettered_and_the_rest_kept(db, alerce):
    alerce.add("ZTF26aaagood", 10.0, 10.0, MJD_NOW - 0.1)
    alerce.add("ZTF26aabroke", 11.0, 11.0, MJD_NOW - 0.2)
    alerce.objects[-1]["meandec"] = 123.0  # impossible declination
    p = poller(db, stream("alerce-api", alerce.url + "/ztf/v1"))
    assert p.poll_once(STOP)
    c = counts(db)
    assert (c["alerts"], c["dead_letters"]) == (1, 1)
    with db.sessions() as s:
        letter = repo.dead_letters(s)[0]
    assert "dec out of range" in letter.error and letter.topic.startswith("alerce:objects/ZTF26aabroke@")
    assert json.loads(letter.raw)["object"]["oid"] == "ZTF26aabroke"  # kept whole for a retry
    assert cursor(db, "alerce") is not None
    # Listed again by the next poll's overlap: not fetched nor dead-lettered a second time.
    fetched = len(alerce.paths("/ztf/v1/objects/ZTF26aabroke"))
    st = stream("alerce-api", alerce.url + "/ztf/v1")
    assert poller(db, st, clock=lambda: NOW + timedelta(minutes=5)).poll_once(STOP)
    assert counts(db) == c and len(alerce.paths("/ztf/v1/objects/ZTF26aabroke")) == fetched
    # A new version of the object (a new detection) is a new result: it parses now.
    alerce.objects[-1].update(meandec=11.0, lastmjd=MJD_NOW + 0.003)
    assert poller(db, st, clock=lambda: NOW + timedelta(minutes=10)).poll_once(STOP)
    assert counts(db)["alerts"] == 2


# ------------------------------------------------------------------- Fink


def jd_of(t: datetime) -> float:
    return 2440587.5 + t.timestamp() / 86400.0


def test_fink_latests_pages_by_time_faults_retried_duplicates_skipped(db, fink):
    for i in range(9):
        fink.add(2900000000000001000 + i, f"ZTF26afink{i:02d}", 30.0 + i, -10.0, jd_of(NOW - timedelta(hours=9 - i)),
                 **({"d:tns": "AT 2026fnk"} if i == 0 else {}))
    fink.add(2900000000000002000, "ZTF26aother0", 60.0, 0.0, jd_of(NOW - timedelta(hours=1)), cls="QSO")
    st = stream("fink-api", fink.url, page_size=4, query={"class": "Early SN Ia candidate"})
    fink.faults += [("/api/v1/latests", 503, {"Retry-After": "0"}), ("/api/v1/latests", 429, {"Retry-After": "1"})]
    p = poller(db, st)
    assert p.poll_once(STOP)
    c = counts(db)
    assert (c["alerts"], c["targets"], c["photometry"]) == (9, 9, 9)
    assert p.http.waited_s >= 1.0  # Retry-After honoured
    assert "AT 2026fnk" in names(db)["ZTF26afink00"]
    with db.sessions() as s:
        a = s.scalar(select(AlertRow).where(AlertRow.key == "2900000000000001003"))
    assert a.source == "fink" and a.band == "ztfr" and a.fields["rf_snia_vs_nonia"] == 0.81
    assert a.fields["classification"] == "Early SN Ia candidate" and a.payload["i:objectId"] == "ZTF26afink03"
    # Every answer held fewer than n alerts, or its window was split.
    bodies = [json.loads(b) for m, path, _, b, _ in fink.requests if path == "/api/v1/latests"]
    assert all(b["n"] == 4 and b["output-format"] == "json" for b in bodies)

    fink.add(2900000000000001100, "ZTF26afink00", 30.0, -10.0, jd_of(NOW + timedelta(minutes=20)))
    p2 = poller(db, st, clock=lambda: NOW + timedelta(minutes=30))
    assert p2.poll_once(STOP)
    c2 = counts(db)
    assert (c2["alerts"], c2["targets"], c2["photometry"]) == (10, 9, 10)  # the new one only, same target


def test_cursor_survives_a_restart_and_moves_only_after_the_commit(db, fink):
    fink.add(2900000000000003001, "ZTF26acurs01", 1.0, 1.0, jd_of(NOW - timedelta(hours=2)))
    st = stream("fink-api", fink.url, query={"class": "Early SN Ia candidate"}, overlap=600.0)
    assert poller(db, st).poll_once(STOP)
    assert cursor(db, "fink") == "2026-11-20T12:00:00.000000Z"

    # A restart (a new PollStream on the same database) starts from the stored cursor less the overlap.
    fink.requests.clear()
    later = NOW + timedelta(hours=1)
    assert poller(db, st, clock=lambda: later).poll_once(STOP)
    first = json.loads(fink.requests[0][3])
    assert first["startdate"] == "2026-11-20 11:50:00" and first["stopdate"] == "2026-11-20 13:00:00"

    # The database refuses the batch (a stop arrives while it waits): the cursor stays.
    fink.add(2900000000000003002, "ZTF26acurs02", 2.0, 2.0, jd_of(later + timedelta(minutes=10)))
    p = poller(db, st, clock=lambda: later + timedelta(minutes=20))
    stop = threading.Event()

    class Down:
        def handle(self, batch):
            from tomd.errors import RetryableError
            stop.set()
            raise RetryableError("database: connection refused")

    p.handler = Down()
    assert not p.poll_once(stop)
    assert cursor(db, "fink") == "2026-11-20T13:00:00.000000Z" and counts(db)["alerts"] == 1
    # Back up: the same window again, stored once.
    assert poller(db, st, clock=lambda: later + timedelta(minutes=20)).poll_once(STOP)
    assert counts(db)["alerts"] == 2 and cursor(db, "fink") == "2026-11-20T13:20:00.000000Z"


def test_run_polls_on_its_interval_survives_an_unreachable_service_and_stops(db, fink):
    fink.add(2900000000000004001, "ZTF26arun001", 3.0, 3.0, jd_of(datetime.now(timezone.utc) - timedelta(hours=1)))
    dead = stream("fink-api", "http://127.0.0.1:9", name="dead", query={"class": "Early SN Ia candidate"})
    live = stream("fink-api", fink.url, name="live", query={"class": "Early SN Ia candidate"})
    a, b = poller(db, dead, clock=None), poller(db, live, clock=None)
    a.http.attempts = 1
    stop = threading.Event()
    threads = [threading.Thread(target=x.run, args=(stop,)) for x in (a, b)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while (b.stats.polls < 2 or a.stats.failures < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert b.stats.polls >= 2 and b.stats.consumed >= 1 and counts(db)["alerts"] == 1
    assert a.stats.failures >= 2 and "connection failed" in a.stats.last_error


# ---------------------------------------------------------- config, headers


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tomd.toml"
    path.write_text(body)
    return path


def test_poll_stream_config(tmp_path):
    (tmp_path / "tns.key").write_text("s3cret\n")
    cfg = load_config(write(tmp_path, """
[[streams]]
name = "tns"
kind = "poll"
format = "tns-api"
interval = "10m"
api_key_file = "tns.key"
bot_id = 1234
bot_name = "tomd_bot"
query = { objtype = [1], classified_sne = 1 }

[[streams]]
name = "alerce-sn"
kind = "poll"
format = "alerce-api"
overlap = "2h"
query = { classifier = "lc_classifier", class = "SNIa", probability = 0.5 }
"""), env={})
    tns_st, al = cfg.streams
    assert (tns_st.kind, tns_st.interval, tns_st.api_key.reveal(), tns_st.bot_id) == ("poll", 600.0, "s3cret", 1234)
    assert "s3cret" not in repr(tns_st) and tns_st.topics == []
    assert (al.overlap, al.query["class"], al.url) == (7200.0, "SNIa", None)


def test_poll_stream_config_errors_are_one_line_each(tmp_path):
    path = write(tmp_path, """
[[streams]]
name = "tns"
kind = "poll"
format = "tns-api"

[[streams]]
name = "fink"
kind = "poll"
format = "ztf-avro"
query = { n = 5 }

[[streams]]
name = "kafka-without-topics"
bootstrap = "localhost:9092"
format = "ztf-avro"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = "\n".join(info.value.problems)
    assert "streams[0].api_key: missing required key for a TNS poll stream" in text
    assert "streams[0].bot_id" in text and "streams[0].bot_name" in text
    assert 'streams[1].format: a poll stream needs one of tns-api, alerce-api, fink-api, got "ztf-avro"' in text
    assert "streams[2].topics: missing required key; expected a list of strings" in text
    assert all("\n" not in p for p in info.value.problems)


def test_rate_limit_headers():
    assert retry_after({"retry-after": "7"}) == 7.0
    assert retry_after({"x-rate-limit-reset": "12", "x-cone-rate-limit-reset": "40"}) == 40.0
    assert 0 < retry_after({"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"}) <= 900.0  # capped
    assert retry_after({}) is None
    assert quota_exhausted({"x-rate-limit-remaining": "0", "x-rate-limit-reset": "25"}) == 25.0
    assert quota_exhausted({"x-rate-limit-remaining": "3", "x-rate-limit-reset": "25"}) is None


def test_one_daemon_at_a_time_polls_a_stream(db, fink):
    if db.kind != "postgresql":
        pytest.skip("several daemons share a stream through PostgreSQL")
    import zlib

    from tomd.brokers.poll import LOCK_SPACE

    fink.add(2900000000000005001, "ZTF26alock01", 4.0, 4.0, jd_of(NOW - timedelta(hours=1)))
    st = stream("fink-api", fink.url, query={"class": "Early SN Ia candidate"})
    other = db.engine.connect()  # another daemon, in the middle of a poll of the same stream
    assert repo.try_advisory_lock(other, LOCK_SPACE, zlib.crc32(b"broker:fink") & 0x7FFFFFFF)
    try:
        p = poller(db, st)
        assert p.poll_once(STOP)
        assert p.stats.skipped == 1 and fink.requests == [] and cursor(db, "fink") is None
    finally:
        repo.advisory_unlock(other, LOCK_SPACE, zlib.crc32(b"broker:fink") & 0x7FFFFFFF)
        other.close()
    assert p.poll_once(STOP)  # its turn now
    assert p.stats.polls == 1 and counts(db)["alerts"] == 1


def test_tns_paging_ignored_by_the_service_does_not_loop(db, tns):
    for i in range(3):
        tns.add(f"2026pg{chr(97 + i)}", 20.0 + i, 5.0, NOW - timedelta(hours=1), f"ZTF26apaging{i}")
    route = tns.route

    def no_paging(method, path, query, body, headers):  # an answer that ignores num_page/page
        status, h, obj = route(method, path, query, body, headers)
        if path == "/api/get/search":
            hits = sorted(tns.objects.values(), key=lambda o: -o["objid"])
            obj["data"]["reply"] = [{"objname": o["objname"], "prefix": "AT", "objid": o["objid"]} for o in hits]
        return status, h, obj

    tns.route = no_paging
    st = stream("tns-api", tns.url, api_key=Secret(FakeTNS.API_KEY), bot_id=1, bot_name="b", page_size=3)
    assert poller(db, st).poll_once(STOP)
    assert counts(db)["alerts"] == 3 and len(tns.paths("/api/get/search")) == 2


def test_the_daemon_runs_a_poll_stream_with_metrics(db, fink, tmp_path):
    """End to end through tomd.daemon (skipped until the daemon builds kind = "poll" runners)."""
    from tomd.config import Config
    from tomd.daemon import Daemon
    from tomd.metrics import instrument

    now = datetime.now(timezone.utc)
    for i in range(3):
        fink.add(2900000000000006000 + i, f"ZTF26adaemn{i}", 5.0 + i, 5.0, jd_of(now - timedelta(hours=2 - i)))
    (tmp_path / "rules").mkdir()
    cfg = Config(streams=[stream("fink-api", fink.url, name="fink-ia", interval=0.2,
                                query={"class": "Early SN Ia candidate"})])
    cfg = replace(cfg, rules=replace(cfg.rules, paths=[str(tmp_path / "rules")]),
                  storage=replace(cfg.storage, url=f"file://{tmp_path}/data"))
    try:
        daemon = Daemon(cfg, engine=db.engine)
    except ConfigError as exc:
        pytest.skip(f"the daemon does not build poll streams yet: {exc}")
    if not isinstance(daemon.runners[0].consumer, PollStream):
        pytest.skip("the daemon does not build poll streams yet")
    daemon.metrics = instrument(daemon)  # wraps the runner's handler: the poll must go through it
    daemon.start()
    try:
        deadline = time.monotonic() + 120
        while counts(db)["alerts"] < 3:
            assert time.monotonic() < deadline, daemon.runners[0].consumer.stats
            time.sleep(0.05)
    finally:
        daemon.stop.set()
        assert daemon.wait() == 0
    assert daemon.summary()["fink-ia"]["alerts"] == 3
    assert cursor(db, "fink-ia") is not None


def test_alerce_objects_of_one_exposure_beyond_a_page_are_paged(db, alerce):
    # One ZTF exposure: many objects share the same lastmjd, so the window cannot split them.
    for i in range(5):
        alerce.add(f"ZTF26aexpos{i}", 200.0 + i * 0.01, -30.0, MJD_NOW - 0.25)
    p = poller(db, stream("alerce-api", alerce.url + "/ztf/v1", page_size=2))
    assert p.poll_once(STOP)
    assert counts(db)["alerts"] == 5
    pages = [q["page"][0] for _, path, q, _, _ in alerce.requests if path == "/ztf/v1/objects"]
    assert {"2", "3"} <= set(pages)


def test_a_tns_object_that_cannot_be_fetched_and_a_broken_fink_row_are_dead_lettered(db, tns, fink):
    tns.add("2026gon", 30.0, 30.0, NOW - timedelta(hours=1), "ZTF26agoneee")
    tns.add("2026kep", 31.0, 30.0, NOW - timedelta(hours=1), "ZTF26akeptee")
    route = tns.route

    def withdrawn(method, path, query, body, headers):  # listed by the search, refused by /get/object
        if path == "/api/get/object" and b"2026gon" in body:
            return 400, {}, {"id_code": 400, "id_message": "Bad request", "data": {"objname": "not found"}}
        return route(method, path, query, body, headers)

    tns.route = withdrawn
    st = stream("tns-api", tns.url, api_key=Secret(FakeTNS.API_KEY), bot_id=1, bot_name="b")
    assert poller(db, st).poll_once(STOP)
    fink.add(2900000000000007001, "ZTF26afinkok", 40.0, 40.0, jd_of(NOW - timedelta(hours=1)))
    fink.add(2900000000000007002, "ZTF26afinkbd", 41.0, 40.0, jd_of(NOW - timedelta(hours=1)), **{"i:fid": 9})
    assert poller(db, stream("fink-api", fink.url, query={"class": "Early SN Ia candidate"})).poll_once(STOP)
    c = counts(db)
    assert (c["alerts"], c["dead_letters"]) == (2, 2)
    with db.sessions() as s:
        errors = sorted((d.stream, d.error) for d in repo.dead_letters(s))
    assert errors[0][0] == "fink" and "unknown filter id: 9" in errors[0][1]
    assert errors[1][0] == "tns" and "2026gon" in errors[1][1] and "HTTP 400" in errors[1][1]
    assert FakeTNS.API_KEY not in errors[1][1]
