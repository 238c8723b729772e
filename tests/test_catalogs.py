"""Catalog look-ups against loopback servers that speak each service's protocol.

SIMBAD: TAP sync (POST form REQUEST/LANG/QUERY → VOTable), as astroquery +
pyvo send it. NED: the object search (GET objsearch → VOTable main table;
an error VOTable for unknown names). JPL Horizons: the API's text answers
(recorded Ceres answers in tests/data/catalogs). MPC: the Orbits API (GET
with a JSON body → mpc_orb JSON). TNS: the bot API (form-encoded api_key +
data JSON, the tns_marker User-Agent, 401 on bad credentials, the
x-rate-limit-* and x-cone-rate-limit-* headers on every answer, 429 when
spent). Shapes follow the services' public documentation.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import numpy as np
import pytest
from sqlalchemy import text

from tomd.catalogs import (CatalogAmbiguous, CatalogEntry, CatalogError, CatalogNotFound, Catalogs,
                           CatalogUnavailable, lookup)
from tomd.cli import main
from tomd.config import Catalogs as CatalogsConfig, ConfigError, Secret, load_config
from tomd.orbits import Orbit

DATA = Path(__file__).parent / "data" / "catalogs"


# ------------------------------------------------------------ the servers --


@dataclass
class Req:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)  # when the server saw it

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


@dataclass
class Loopback:
    """A ThreadingHTTPServer on 127.0.0.1:0 answering with ``answer(req) -> (status, headers, body)``."""

    answer: object
    requests: list[Req] = field(default_factory=list)
    delay: float = 0.0  # seconds before answering (cut short by close())

    def __post_init__(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                parts = urlsplit(self.path)
                req = Req(self.command, parts.path, parse_qs(parts.query), self.rfile.read(n) if n else b"",
                          {k.lower(): v for k, v in self.headers.items()})
                outer.requests.append(req)
                if outer.delay:
                    outer.closing.wait(outer.delay)
                status, headers, body = outer.answer(req)
                body = body.encode() if isinstance(body, str) else body
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            do_GET = do_POST = _serve

        self.closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


_HELD: list[socket.socket] = []


def closed_port_url(path: str) -> str:
    """A URL where nothing listens (connection refused): the service is down. The port stays bound
    (never listening) for the whole session, so no other test or process can start listening on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return f"http://127.0.0.1:{s.getsockname()[1]}{path}"


# SIMBAD: identifiers as SIMBAD stores them (padded), one basic row per object.
SIMBAD_OBJECTS = {
    "M  31": {"ra": 10.684708333333333, "dec": 41.268750000000004, "otype": "AGN", "rvz_redshift": -0.001001,
              "plx_value": None, "pmra": None, "pmdec": None,
              "ids": ["M  31", "NGC   224", "NAME Andromeda Galaxy", "UGC   454", "2MASX J00424433+4116074"]},
    "* alf Lyr": {"ra": 279.23473479, "dec": 38.78368896, "otype": "dS*", "rvz_redshift": -0.0000681,
                  "plx_value": 130.23, "pmra": 200.94, "pmdec": 286.23,
                  "ids": ["* alf Lyr", "NAME Vega", "HD 172167", "HR  7001"]},
}


def _simbad_norm(ident: str) -> str:
    # SIMBAD matches names with or without their "NAME " prefix, spaces and case ignored.
    return re.sub(r"\s+", "", re.sub(r"^NAME\s+", "", ident.strip(), flags=re.I)).casefold()


def simbad_votable(rows: list[dict]) -> str:
    fields = [("main_id", "char", "meta.id;meta.main"), ("ra", "double", "pos.eq.ra;meta.main"),
              ("dec", "double", "pos.eq.dec;meta.main"), ("otype", "char", "src.class"),
              ("rvz_redshift", "double", "src.redshift"), ("plx_value", "double", "pos.parallax.trig"),
              ("pmra", "double", "pos.pm;pos.eq.ra"), ("pmdec", "double", "pos.pm;pos.eq.dec"),
              ("alias", "char", "meta.id")]
    star = ' arraysize="*"'
    head = "".join(f'<FIELD name="{n}" datatype="{t}"{star if t == "char" else ""} ucd="{u}"/>'
                   for n, t, u in fields)
    body = "".join("<TR>" + "".join(f"<TD>{'' if r.get(n) is None else escape(str(r[n]))}</TD>"
                                    for n, _, _ in fields) + "</TR>" for r in rows)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">'
            '<RESOURCE type="results"><INFO name="QUERY_STATUS" value="OK"/>'
            f"<TABLE>{head}<DATA><TABLEDATA>{body}</TABLEDATA></DATA></TABLE></RESOURCE></VOTABLE>")


def simbad_answer(req: Req):
    if req.method != "POST" or req.path != "/simbad/sim-tap/sync":
        return 404, {}, "not found"
    form = req.form()
    assert form["REQUEST"] == "doQuery" and form["LANG"] == "ADQL"
    m = re.search(r"typed\.id = '((?:[^']|'')*)'", form["QUERY"])
    wanted = _simbad_norm(m.group(1).replace("''", "'"))
    rows = []
    for main_id, o in SIMBAD_OBJECTS.items():
        if any(_simbad_norm(i) == wanted for i in o["ids"]):
            rows += [{"main_id": main_id, **{k: v for k, v in o.items() if k != "ids"}, "alias": i} for i in o["ids"]]
    return 200, {"Content-Type": "application/x-votable+xml"}, simbad_votable(rows)


NED_ERROR = """<?xml version="1.0"?>
<VOTABLE version="1.1">
<RESOURCE type="results">
<INFO name="QUERY_STATUS" value="OK"/>
<PARAM name="queryDateTime" ucd="time.creation" datatype="char" arraysize="*" value="2026-11-28T15:00:00PST"/>
<PARAM name="Error" value=" The object name you entered, {name}, is not currently recognized by NED."/>
</RESOURCE>
</VOTABLE>
"""


def ned_answer(req: Req):
    if req.path != "/cgi-bin/objsearch":
        return 404, {}, "not found"
    assert req.query["of"] == ["xml_main"]
    name = req.query["objname"][0]
    if re.sub(r"\s+", "", name).casefold() in ("m1", "messier001"):
        return 200, {"Content-Type": "text/xml"}, (DATA / "ned_objsearch_m1.xml").read_bytes()
    return 200, {"Content-Type": "text/xml"}, NED_ERROR.format(name=escape(name))


HORIZONS_NO_MATCH = """API VERSION: 1.2
API SOURCE: NASA/JPL Horizons API

*******************************************************************************
JPL/DASTCOM                Small-body Index Search Results

 Comet AND asteroid index search:

    NAME = {name};

 Matching small-bodies:
    No matches found.
*******************************************************************************
"""

HORIZONS_AMBIGUOUS = """API VERSION: 1.2
API SOURCE: NASA/JPL Horizons API

*******************************************************************************
 Multiple major-bodies match string "JUPITER*"

  ID#      Name                               Designation  IAU/aliases/other
  -------  ---------------------------------- -----------  -------------------
        5  Jupiter Barycenter
      599  Jupiter

   Number of matches =   2. Use ID# to make unique selection.
*******************************************************************************
"""


def horizons_answer(req: Req):
    if req.path != "/api/horizons.api":
        return 404, {}, "not found"
    q = {k: v[0] for k, v in req.query.items()}
    assert q["format"] == "text"
    command = q["COMMAND"].strip("\"'").rstrip(";")
    if command.casefold() == "ceres":
        f = {"ELEMENTS": "ceres_elements_range.txt", "OBSERVER": "ceres_ephemerides_range.txt"}[q["EPHEM_TYPE"]]
        return 200, {"Content-Type": "text/plain"}, (DATA / f).read_text()
    if command.casefold() == "jupiter":
        return 200, {"Content-Type": "text/plain"}, HORIZONS_AMBIGUOUS
    return 200, {"Content-Type": "text/plain"}, HORIZONS_NO_MATCH.format(name=command)


# mpc_orb dictionaries as the MPC Orbits API documents them (values of (2062) Aten and C/2012 S1 ISON).
def _block(names, values):
    return {"coefficient_names": names, "coefficient_values": values,
            "coefficient_uncertainties": [1e-8] * len(values), "covariance": {}, "eigenvalues": []}


MPC_ORBS = {
    "2062": {
        "COM": _block(["q", "e", "i", "node", "argperi", "peri_time"],
                      [0.790166373380553, 0.18280496521003, 18.9341894308854, 108.5405811622926, 148.0536882414564,
                       59926.57152603]),
        "KEP": _block(["a", "e", "i", "node", "argperi", "mean_anomaly"],
                      [0.9669250787648711, 0.18280496521003, 18.9341894308854, 108.5405811622926,
                       148.0536882414564, 256.365893]),
        "epoch_data": {"epoch": 59800.0, "timeform": "MJD", "timesystem": "TDT"},
        "system_data": {"refsys": "Ecliptic", "refframe": "ICRF", "EclipticObliquityArcseconds": "84381.448"},
        "categorization": {"orbit_type_int": 1, "orbit_type_str": "Aten", "object_type_int": 0,
                           "object_type_str": "Minor Planet"},
        "magnitude_data": {"G": 0.15, "H": 17.108, "photometric_model": "HG"},
        "designation_data": {"name": "Aten", "permid": "2062", "iau_designation": "(2062)",
                             "unpacked_primary_provisional_designation": "1976 AA",
                             "unpacked_secondary_provisional_designations": []},
    },
    "C/2012 S1": {
        "COM": _block(["q", "e", "i", "node", "argperi", "peri_time"],
                      [0.0128562, 1.0002668, 62.18788, 295.7406523, 345.60135, 56624.74194]),
        "epoch_data": {"epoch": 56999.0, "timeform": "MJD", "timesystem": "TDT"},
        "categorization": {"object_type_str": "Comet"},
        "designation_data": {"name": "ISON", "iau_designation": "C/2012 S1",
                             "unpacked_primary_provisional_designation": "C/2012 S1"},
    },
    # The object of a real Rubin ssSource alert in the shared samples (ssObjectId → "K13L24L").
    # Elements shaped like the MPC's; the values are illustrative, not 2013 LL24's orbit.
    "2013 LL24": {
        "COM": _block(["q", "e", "i", "node", "argperi", "peri_time"],
                      [2.1, 0.15, 12.0, 150.0, 60.0, 60700.0]),
        "KEP": _block(["a", "e", "i", "node", "argperi", "mean_anomaly"],
                      [2.470588235294118, 0.15, 12.0, 150.0, 60.0, 33.0]),
        "epoch_data": {"epoch": 61000.0, "timeform": "MJD", "timesystem": "TDT"},
        "categorization": {"object_type_str": "Minor Planet", "orbit_type_str": "MBA"},
        "designation_data": {"iau_designation": "2013 LL24", "unpacked_primary_provisional_designation": "2013 LL24",
                             "packed_primary_provisional_designation": "K13L24L"},
    },
}


def mpc_answer(req: Req):
    if req.path != "/api/get-orb" or req.method != "GET":
        return 404, {}, "not found"
    desig = json.loads(req.body)["desig"]
    for key, orb in MPC_ORBS.items():
        d = orb["designation_data"]
        if desig.casefold() in {key.casefold(), str(d.get("name", "")).casefold(), str(d.get("permid", "")),
                                str(d.get("unpacked_primary_provisional_designation", "")).casefold()}:
            return 200, {"Content-Type": "application/json"}, json.dumps([{"mpc_orb": [orb]}, 200])
    return 404, {"Content-Type": "application/json"}, json.dumps({"message": f"No orbit found for {desig}"})


TNS_BOT = {"id": 12345, "name": "tomd_bot", "key": "s3cr3t-api-key"}
TNS_OBJECTS = {
    "2023ixf": {"objname": "2023ixf", "name_prefix": "SN", "objid": 131116, "radeg": 210.910674637,
                "decdeg": 54.3116510708, "ra": "14:03:38.562", "dec": "+54:18:41.94", "redshift": 0.000804,
                "hostname": "M101", "object_type": {"name": "SN II", "id": 10},
                "internal_names": "ZTF23aaklqou, ATLAS23npq, PS23dsb", "discoverydate": "2023-05-19 17:27:35.000",
                "discoverymag": 14.9},
    # A second object 20" from SN 2023ixf (illustrative values, not a real TNS entry), for cone searches.
    "2026zzz": {"objname": "2026zzz", "name_prefix": "AT", "objid": 999001, "radeg": 210.912, "decdeg": 54.317,
                "ra": "14:03:38.880", "dec": "+54:19:01.20", "redshift": None, "hostname": "",
                "object_type": {"name": None, "id": 0}, "internal_names": "ZTF26aaaaaaa",
                "discoverydate": "2026-11-01 05:00:00.000", "discoverymag": 19.2},
}


@dataclass
class TnsState:
    rate_limited: bool = False
    # x-rate-limit-remaining to send, one per request (then "89"), and the reset in seconds.
    remaining: list[int] = field(default_factory=list)
    reset: str = "17"
    cone_remaining: list[int] = field(default_factory=list)
    cone_reset: str = "42"


def tns_answer_for(state: TnsState):
    def answer(req: Req):
        ua = req.headers.get("user-agent", "")
        marker = json.loads(ua[len("tns_marker"):]) if ua.startswith("tns_marker") else None
        form = req.form()
        if (marker != {"tns_id": TNS_BOT["id"], "type": "bot", "name": TNS_BOT["name"]}
                or form.get("api_key") != TNS_BOT["key"]):
            return 401, {"Content-Type": "application/json"}, json.dumps({"id_code": 401, "id_message": "Unauthorized"})
        cone = req.path.endswith("/search")
        remaining = state.remaining.pop(0) if state.remaining else 89
        limits = {"x-rate-limit-limit": "90", "x-rate-limit-remaining": "0" if state.rate_limited else str(remaining),
                  "x-rate-limit-reset": state.reset}
        if cone:
            cone_remaining = state.cone_remaining.pop(0) if state.cone_remaining else 9
            limits.update({"x-cone-rate-limit-limit": "10", "x-cone-rate-limit-remaining": str(cone_remaining),
                           "x-cone-rate-limit-reset": state.cone_reset})
        if state.rate_limited:
            return 429, limits, json.dumps({"id_code": 429, "id_message": "Too Many Requests"})
        data = json.loads(form["data"])
        if req.path == "/api/get/object":
            obj = TNS_OBJECTS.get(data["objname"])
            reply = obj if obj else {"objname": {"110": {"message": "No results found.", "message_id": 110}}}
        elif cone:
            ra, dec, r = float(data["ra"]), float(data["dec"]), float(data["radius"])
            reply = [{"objname": o["objname"], "prefix": o["name_prefix"], "objid": o["objid"]}
                     for o in TNS_OBJECTS.values()
                     if abs(o["radeg"] - ra) * 3600 * np.cos(np.radians(dec)) < r and abs(o["decdeg"] - dec) * 3600 < r]
        else:
            return 404, {}, "not found"
        body = {"id_code": 200, "id_message": "OK", "data": {"received": data, "reply": reply}}
        return 200, {"Content-Type": "application/json", **limits}, json.dumps(body)
    return answer


@pytest.fixture
def services():
    from tomd.catalogs.tns import LIMITS

    LIMITS.clear()  # a port reused from an earlier test must not inherit its spent rate limit
    tns_state = TnsState()
    s = {"simbad": Loopback(simbad_answer), "ned": Loopback(ned_answer), "horizons": Loopback(horizons_answer),
         "mpc": Loopback(mpc_answer), "tns": Loopback(tns_answer_for(tns_state))}
    s["tns_state"] = tns_state
    yield s
    for k, v in s.items():
        if isinstance(v, Loopback):
            v.close()


def catalogs_config(services, **over) -> CatalogsConfig:
    c = CatalogsConfig(
        timeout=10.0, cache_ttl=3600.0,  # loopback answers beat it on a loaded machine
        simbad_url=services["simbad"].base + "/simbad/sim-tap", ned_url=services["ned"].base + "/cgi-bin/objsearch",
        horizons_url=services["horizons"].base + "/api/horizons.api", mpc_url=services["mpc"].base + "/api/get-orb",
        tns_url=services["tns"].base + "/api", tns_bot_id=TNS_BOT["id"], tns_bot_name=TNS_BOT["name"],
        tns_api_key=Secret(TNS_BOT["key"]))
    return replace(c, **over)


# ----------------------------------------------------------------- tests --


def test_simbad_position_aliases_type_redshift(services):
    cats = Catalogs(catalogs_config(services))
    e = cats.lookup("simbad", "ngc 224")
    assert e.name == "M 31" and e.ra == pytest.approx(10.684708333) and e.dec == pytest.approx(41.26875)
    assert e.object_type == "AGN" and e.redshift == pytest.approx(-0.001001) and e.distance is None
    assert set(e.aliases) == {"NGC 224", "NAME Andromeda Galaxy", "UGC 454", "2MASX J00424433+4116074"}
    (req,) = services["simbad"].requests
    assert "WHERE typed.id = 'ngc 224'" in req.form()["QUERY"]
    vega = cats.lookup("simbad", "Vega")
    assert vega.parallax == pytest.approx(130.23) and vega.distance == pytest.approx(1000 / 130.23)
    assert vega.pm_ra == pytest.approx(200.94)
    spec = vega.to_spec(query="Vega")
    assert spec.name == "* alf Lyr" and spec.aliases[0] == "Vega" and spec.extras["object_type"] == "dS*"


def test_simbad_quotes_are_escaped_and_unknown_is_not_found(services):
    cats = Catalogs(catalogs_config(services))
    with pytest.raises(CatalogNotFound, match=r"SIMBAD: no object named \"Barnard's galaxy\""):
        cats.lookup("simbad", "Barnard's galaxy")
    assert "typed.id = 'Barnard''s galaxy'" in services["simbad"].requests[0].form()["QUERY"]


def test_ned_object_search(services):
    cats = Catalogs(catalogs_config(services))
    e = cats.lookup("ned", "M1")
    assert (e.name, e.object_type, e.redshift) == ("MESSIER 001", "SNR", None)
    assert (e.ra, e.dec) == (pytest.approx(83.63321), pytest.approx(22.01446))
    q = services["ned"].requests[0].query
    assert q["objname"] == ["M1"] and q["of"] == ["xml_main"]
    with pytest.raises(CatalogNotFound, match="NED: no object named 'NGC 99999'.*not currently recognized"):
        cats.lookup("ned", "NGC 99999")


def test_horizons_elements_map_onto_lco_orbital_elements(services):
    from tomd.facilities.lco import target_document
    from tomd.targets.model import validate

    cats = Catalogs(catalogs_config(services))
    e = cats.lookup("horizons", "Ceres")
    q = {k: v[0] for k, v in services["horizons"].requests[0].query.items()}
    assert q["EPHEM_TYPE"] == "ELEMENTS" and q["CENTER"] == "'500@10'" and q["REF_PLANE"] == "ECLIPTIC"
    assert e.name == "1 Ceres (A801 AA)" and e.scheme == "MPC_MINOR_PLANET"
    spec = validate(e.to_spec(query="Ceres"))
    doc = target_document(spec)
    # The recorded answer's first row: JDTDB 2459740.5, EC, IN, OM, W, MA, A.
    assert doc == {"name": "1 Ceres (A801 AA)", "type": "ORBITAL_ELEMENTS", "scheme": "MPC_MINOR_PLANET",
                   "epochofel": 59740.0, "orbinc": pytest.approx(10.58712597794349),
                   "longascnode": pytest.approx(80.26775296710701), "argofperih": pytest.approx(73.56968535036279),
                   "eccentricity": pytest.approx(0.0785750943150799), "meandist": pytest.approx(2.766380805878023),
                   "meananom": pytest.approx(321.4371287399738)}
    assert spec.aliases == ("Ceres", "1 Ceres", "A801 AA")


@pytest.mark.parametrize("target,names", [
    ("1 Ceres (A801 AA)", ("1 Ceres", "Ceres", "A801 AA")),
    ("C/2020 F3 (NEOWISE)", ("C/2020 F3", "NEOWISE")),
    ("(2024 AB)", ("2024 AB", f"ssObject {int.from_bytes(b'K24A00B', 'big')}")),
    ("Mars (499)", ("Mars",)),
    ("1P/Halley", ()),
])
def test_horizons_target_names_become_aliases(target, names):
    """Alerts of solar-system objects join the target bearing their designation: give it every name."""
    from tomd.catalogs.horizons import names_of

    assert names_of(target) == names


def test_horizons_unknown_and_ambiguous_names(services):
    cats = Catalogs(catalogs_config(services))
    with pytest.raises(CatalogNotFound, match="JPL Horizons: no object named 'Nosuchobject'"):
        cats.lookup("horizons", "Nosuchobject")
    with pytest.raises(CatalogAmbiguous, match=r"(?s)matches several objects.*599  Jupiter"):
        cats.lookup("horizons", "Jupiter")


def test_two_body_propagation_matches_the_horizons_ephemeris(services):
    """Elements and ephemeris both through the Horizons protocol: propagated Ceres within 1″ over 30 days."""
    cats = Catalogs(catalogs_config(services))
    orbit = Orbit.from_target(cats.lookup("horizons", "Ceres").to_spec())
    rows = cats.ephemeris("Ceres", 59740.0, 59770.0, "10d")
    q = {k: v[0] for k, v in services["horizons"].requests[-1].query.items()}
    assert q["EPHEM_TYPE"] == "OBSERVER" and q["CENTER"] == "'500'"
    assert len(rows) == 4 and rows[0][0] == pytest.approx(59740.0)
    mjd, ra_h, dec_h = (np.array(c) for c in zip(*rows))
    ra, dec = orbit.radec(mjd)
    sep = np.degrees(np.arccos(np.clip(np.sin(np.radians(dec)) * np.sin(np.radians(dec_h)) + np.cos(np.radians(dec))
                                       * np.cos(np.radians(dec_h)) * np.cos(np.radians(ra - ra_h)), -1, 1))) * 3600
    assert sep.max() < 1.0, sep
    # The test can fail: a day's error in the epoch moves Ceres by minutes of arc.
    shifted = Orbit.from_target({**cats.lookup("horizons", "Ceres").to_spec().__dict__, "epochofel": 59741.0})
    assert np.degrees(np.abs(shifted.radec(mjd)[0] - ra_h)).max() * 3600 > 60


def test_non_sidereal_visibility_follows_the_orbit(services):
    """Rules' visibility for a target with elements equals the sidereal answer at Horizons' positions."""
    from tomd import visibility
    from tomd.rules.context import AlertView, Context, TargetView

    cats = Catalogs(catalogs_config(services))
    spec = cats.lookup("horizons", "Ceres").to_spec()
    row = {"id": 1, "name": spec.name, "type": "non_sidereal", "ra": None, "dec": None, "scheme": spec.scheme,
           **{f: getattr(spec, f) for f in ("epochofel", "orbinc", "longascnode", "argofperih", "eccentricity",
                                             "meandist", "meananom", "perihdist", "epochofperih", "dailymot")}}
    rows = cats.ephemeris("Ceres", 59740.0, 59770.0, "10d")
    for mjd, ra_h, dec_h in rows[1:3]:
        # Geometry only (Sun and Moon ignored): the best airmass over 3 hours, all LCO sites.
        kw = dict(max_airmass=100.0, min_moon_deg=0.0, max_sun_alt=90.0)
        alert = AlertView.__new__(AlertView)
        alert.ra = alert.dec = None
        ctx = Context(alert, TargetView(row, now_mjd=mjd), mjd)
        moving = ctx.visibility("lco", 3.0, **kw)
        fixed = visibility.observability(visibility.FACILITY_SITES["lco"], ra_h, dec_h, mjd, 3.0, **kw)
        assert moving.best_site == fixed.best_site and moving.airmass == pytest.approx(fixed.airmass, rel=1e-3)
        assert ctx.position() == (pytest.approx(ra_h, abs=1e-3), pytest.approx(dec_h, abs=1e-3))
        assert ctx.fn_moon_distance() == pytest.approx(visibility.moon_distance_deg(ra_h, dec_h, mjd), abs=0.01)
        wrong = visibility.observability(visibility.FACILITY_SITES["lco"], (ra_h + 90) % 360, dec_h, mjd, 3.0, **kw)
        assert (wrong.best_site, wrong.airmass) != (moving.best_site, pytest.approx(moving.airmass, rel=1e-3))


@pytest.mark.parametrize("unpacked,packed", [("1995 XA", "J95X00A"), ("2007 TA418", "K07Tf8A"),
                                             ("2013 LL24", "K13L24L"), ("1976 AA", "J76A00A"), ("C/2020 F3", None)])
def test_packed_designations_and_rubin_ids(unpacked, packed):
    from tomd.catalogs.designations import pack_provisional, rubin_ss_object_id

    assert pack_provisional(unpacked) == packed
    if packed == "K13L24L":  # a real Rubin alert's ssObjectId (shared samples, Fink Rubin test data)
        assert rubin_ss_object_id(packed) == 21164719644750924


def test_conic_solutions_agree_across_parabolic_eccentricity():
    base = dict(q=0.5, incl=30.0, node=40.0, argperi=50.0, tp=60000.0)
    t = np.array([59900.0, 59990.0, 60000.0, 60010.0, 60100.0])
    pos = [Orbit(e=e, **base).heliocentric(t) for e in (1 - 1e-7, 1.0, 1 + 1e-7)]
    assert np.abs(pos[0] - pos[1]).max() < 1e-5 and np.abs(pos[2] - pos[1]).max() < 1e-5
    r = np.linalg.norm(pos[1], axis=0)
    assert r[2] == pytest.approx(0.5) and (r >= 0.5 - 1e-12).all()


def test_mpc_orbits_minor_planet_and_comet(services):
    from tomd.facilities.lco import target_document
    from tomd.targets.model import validate

    cats = Catalogs(catalogs_config(services))
    e = cats.lookup("mpc", "Aten")
    req = services["mpc"].requests[0]
    assert req.method == "GET" and json.loads(req.body) == {"desig": "Aten"}
    assert e.name == "(2062) Aten" and e.scheme == "MPC_MINOR_PLANET"
    assert e.aliases == ("Aten", "1976 AA", f"ssObject {int.from_bytes(b'J76A00A', 'big')}")  # Rubin's id
    assert e.elements == {"epochofel": 59800.0, "orbinc": 18.9341894308854, "longascnode": 108.5405811622926,
                          "argofperih": 148.0536882414564, "eccentricity": 0.18280496521003,
                          "meandist": 0.9669250787648711, "meananom": 256.365893}
    c = cats.lookup("mpc", "C/2012 S1")
    assert c.scheme == "MPC_COMET" and c.name == "C/2012 S1" and "ISON" in c.aliases
    doc = target_document(validate(c.to_spec()))
    assert (doc["scheme"], doc["perihdist"], doc["epochofperih"], doc["eccentricity"]) == \
        ("MPC_COMET", 0.0128562, 56624.74194, 1.0002668)
    # An unbound orbit still propagates (hyperbolic branch): finite and near the Sun at perihelion.
    xyz = Orbit.from_target(validate(c.to_spec())).heliocentric(np.array([56624.74194]))
    assert np.linalg.norm(xyz) == pytest.approx(0.0128562, rel=1e-6)
    with pytest.raises(CatalogNotFound, match="MPC: no object named 'Nosuch'"):
        cats.lookup("mpc", "Nosuch")


def test_tns_object_and_cone_search_with_bot_credentials(services):
    cats = Catalogs(catalogs_config(services))
    e = cats.lookup("tns", "SN 2023ixf")
    assert (e.name, e.object_type, e.redshift) == ("SN 2023ixf", "SN II", 0.000804)
    assert e.aliases == ("ZTF23aaklqou", "ATLAS23npq", "PS23dsb") and e.extras["tns_objid"] == 131116
    req = services["tns"].requests[0]
    assert req.method == "POST" and req.path == "/api/get/object"
    assert req.headers["user-agent"] == 'tns_marker{"tns_id":12345,"type":"bot","name":"tomd_bot"}'
    assert req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert json.loads(req.form()["data"])["objname"] == "2023ixf"
    assert cats.tns_near(210.9107, 54.3117, 5.0) == ("SN 2023ixf",)
    assert cats.tns_near(10.0, 10.0, 5.0) == ()
    with pytest.raises(CatalogNotFound, match="TNS: no object named '2099zzz' \\(No results found.\\)"):
        cats.lookup("tns", "2099zzz")


def test_tns_rate_limit_and_bad_credentials(services):
    from tomd.catalogs.tns import Credentials, RateLimits, Tns

    services["tns_state"].rate_limited = True
    cats = Catalogs(catalogs_config(services))
    with pytest.raises(CatalogUnavailable, match="TNS is unavailable: rate limit reached; try again in 17 s") as exc:
        cats.lookup("tns", "2023ixf")
    assert exc.value.retry_after == 17.0
    # The 429 said the window is spent for 17 s (> the 10 s timeout): the next call is refused without
    # asking, with what is left of the window (counted down: less by however long the machine took since).
    with pytest.raises(CatalogUnavailable, match="rate limit reached; try again in (1[0-7]|[89]) s") as exc:
        cats.tns_near(1.0, 2.0)
    assert 8.0 < exc.value.retry_after <= 17.0 and len(services["tns"].requests) == 1
    # A process that had not heard of it asks, and a refused cone search carries the cone search's own reset.
    fresh = Tns(catalogs_config(services).tns_url, 10.0, Credentials(TNS_BOT["id"], TNS_BOT["name"], TNS_BOT["key"]),
                limits=RateLimits())
    with pytest.raises(CatalogUnavailable) as exc:
        fresh.near(1.0, 2.0)
    assert exc.value.retry_after == 42.0 and len(services["tns"].requests) == 2
    services["tns_state"].rate_limited = False
    from tomd.catalogs.tns import LIMITS

    LIMITS.clear()  # the credential checks below must reach the server
    wrong = Catalogs(catalogs_config(services, tns_api_key=Secret("wrong-key")))
    with pytest.raises(CatalogError, match="TNS: HTTP 401 Unauthorized: check the bot id") as exc:
        wrong.lookup("tns", "2023ixf")
    assert "wrong-key" not in str(exc.value)
    no_bot = Catalogs(catalogs_config(services, tns_bot_id=None, tns_api_key=None))
    with pytest.raises(CatalogError, match="needs a bot"):
        no_bot.lookup("tns", "2023ixf")


def test_tns_waits_for_a_spent_window_that_resets_within_the_timeout(services):
    """remaining 0 with reset 1 s: the next call (even from another client of the same bot) waits, then asks."""
    state = services["tns_state"]
    state.remaining, state.reset = [0], "1"
    Catalogs(catalogs_config(services)).lookup("tns", "2023ixf")
    other = Catalogs(catalogs_config(services))  # no cache: it must ask TNS again
    assert other.lookup("tns", "2023ixf").name == "SN 2023ixf"
    first, second = services["tns"].requests
    assert second.at - first.at >= 0.9  # not before TNS's reset


def test_tns_refuses_without_asking_when_the_reset_is_beyond_the_timeout(services):
    state = services["tns_state"]
    state.remaining, state.reset = [0], "600"
    cats = Catalogs(catalogs_config(services))  # 600 s: far beyond the 10 s timeout
    cats.lookup("tns", "2023ixf")
    with pytest.raises(CatalogUnavailable, match="TNS is unavailable: rate limit reached; try again in 600 s") as exc:
        cats.lookup("tns", "2023ixf")
    assert 590 < exc.value.retry_after <= 600 and len(services["tns"].requests) == 1


def test_tns_cone_search_window_is_separate(services):
    """A spent cone-search window stops position searches only; object look-ups go on."""
    state = services["tns_state"]
    state.cone_remaining, state.cone_reset = [0], "300"
    cats = Catalogs(catalogs_config(services))
    assert cats.tns_near(210.9107, 54.3117, 5.0) == ("SN 2023ixf",)
    assert cats.lookup("tns", "2023ixf").name == "SN 2023ixf"
    with pytest.raises(CatalogUnavailable, match="try again in (300|2[0-9][0-9]) s"):  # what is left of 300 s
        cats.tns_near(10.0, 10.0, 5.0)
    assert [r.path for r in services["tns"].requests] == ["/api/get/search", "/api/get/object"]


def test_cached_only_never_touches_the_network(services, db):
    from tomd.catalogs import CatalogNotCached
    from tomd.config import Config

    config = catalogs_config(services)
    cats = Catalogs(config, db.sessions)
    with pytest.raises(CatalogNotCached, match="SIMBAD: 'object:m31' is not in the catalog cache"):
        cats.lookup("simbad", "M31", cached_only=True)
    with pytest.raises(CatalogNotCached):
        cats.tns_near(210.9107, 54.3117, cached_only=True)
    assert services["simbad"].requests == [] and services["tns"].requests == []
    warm = cats.lookup("simbad", "M31")
    # The service goes down: the cached answer is still there, without a connection attempt.
    down = Catalogs(replace(config, simbad_url=closed_port_url("/simbad/sim-tap")), db.sessions)
    assert down.lookup("simbad", "m 31", cached_only=True) == warm
    with pytest.raises(CatalogNotCached):
        down.lookup("simbad", "Vega", cached_only=True)  # not "unavailable": nothing was tried
    full = replace(Config(), catalogs=config)
    assert lookup("simbad", "M31", config=full, sessions=db.sessions, cached_only=True) == warm
    with pytest.raises(CatalogNotCached):
        Catalogs(config).lookup("simbad", "M31", cached_only=True)  # no database, no cache
    assert len(services["simbad"].requests) == 1


def test_rule_feature_with_cached_only_reads_the_cache_and_never_waits_for_a_service(services, db):
    """The README's feature recipe, through the rules' expression engine: a cold cache gives a missing value
    (the clause is false, no request is made even though the service would hang), a warm one the redshift."""
    from tomd.alerts.model import Alert
    from tomd.catalogs import CatalogNotCached
    from tomd.config import Config
    from tomd.rules.context import AlertView, Context, TargetView, mjd_of
    from tomd.rules.expr import compile_expression

    hanging = Loopback(lambda req: (200, {}, ""), delay=30.0)
    try:
        path = urlsplit(catalogs_config(services).simbad_url).path
        config = replace(Config(), catalogs=catalogs_config(services, simbad_url=hanging.base + path))

        def host_redshift(ctx):
            if ctx.target.name is None:
                return None
            try:
                return lookup("simbad", ctx.target.name, config=config, sessions=db.sessions,
                              cached_only=True).redshift
            except CatalogNotCached:
                return None

        now = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)
        alert = Alert(source="ztf", key="1", time=now, ra=10.6847, dec=41.2688, mag=17.5, band="ztfg")
        target = TargetView({"id": 1, "name": "M31", "ra": 10.6847, "dec": 41.2688}, names=["M31"],
                            now_mjd=mjd_of(now))
        ctx = Context(AlertView(alert, 1), target, mjd_of(now), features={"host_z": host_redshift})
        comp = compile_expression("feature.host_z < 0", ["host_z"])
        assert comp.first_false(*ctx.args()) == 0  # missing: false, and no error
        assert hanging.requests == []
        # Warmed outside ingest (a hook, `tomd target add --from simbad`), with the service up.
        Catalogs(catalogs_config(services), db.sessions).lookup("simbad", "M31")
        ctx = Context(AlertView(alert, 1), target, mjd_of(now), features={"host_z": host_redshift})
        assert comp.first_false(*ctx.args()) == -1  # z = -0.001001 < 0
        assert hanging.requests == []
    finally:
        hanging.close()


@pytest.mark.parametrize("service,path", [("simbad", "/simbad/sim-tap"), ("ned", "/cgi-bin/objsearch"),
                                          ("horizons", "/api/horizons.api"), ("mpc", "/api/get-orb"),
                                          ("tns", "/api")])
def test_service_down_is_retryable_and_names_the_service(services, service, path):
    cats = Catalogs(catalogs_config(services, **{f"{service}_url": closed_port_url(path)}))
    name = {"simbad": "M31", "ned": "M1", "horizons": "Ceres", "mpc": "Aten", "tns": "2023ixf"}[service]
    title = {"simbad": "SIMBAD", "ned": "NED", "horizons": "JPL Horizons", "mpc": "MPC", "tns": "TNS"}[service]
    with pytest.raises(CatalogUnavailable, match=f"^{title} is unavailable: connection failed"):
        cats.lookup(service, name)


@pytest.mark.parametrize("service", ["simbad", "ned", "horizons", "mpc", "tns"])
def test_5xx_and_timeouts_are_retryable(services, service):
    down = Loopback(lambda req: (503, {"Content-Type": "text/plain"}, "Service Temporarily Unavailable"))
    slow = Loopback(lambda req: (200, {}, ""), delay=600.0)  # answers long after the timeout (or at close)
    path = urlsplit(getattr(catalogs_config(services), f"{service}_url")).path
    name = {"simbad": "M31", "ned": "M1", "horizons": "Ceres", "mpc": "Aten", "tns": "2023ixf"}[service]
    try:
        cats = Catalogs(catalogs_config(services, **{f"{service}_url": down.base + path}))
        with pytest.raises(CatalogUnavailable, match="HTTP 503|unavailable"):
            cats.lookup(service, name)
        cats = Catalogs(catalogs_config(services, timeout=0.5, **{f"{service}_url": slow.base + path}))
        t0 = time.monotonic()
        with pytest.raises(CatalogUnavailable, match="timed out"):
            cats.lookup(service, name)
        assert time.monotonic() - t0 < 300  # it did not wait for the answer (a loose bound: a loaded machine)
    finally:
        down.close()
        slow.close()


def test_cache_hit_makes_no_second_request_and_expires(services, db):
    config = catalogs_config(services)
    first = Catalogs(config, db.sessions)
    a = first.lookup("simbad", "M31")
    assert first.lookup("simbad", "m 31") == a  # same normalised name: from the cache
    other_process = Catalogs(config, db.sessions)
    assert other_process.lookup("simbad", "M31") == a
    assert len(services["simbad"].requests) == 1
    other_process.lookup("simbad", "Vega")
    assert len(services["simbad"].requests) == 2
    # Failures are not cached: a name TNS does not know yet may appear within the hour.
    with pytest.raises(CatalogNotFound):
        first.lookup("tns", "2099zzz")
    with pytest.raises(CatalogNotFound):
        first.lookup("tns", "2099zzz")
    assert len(services["tns"].requests) == 2
    with db.sessions.begin() as s:
        s.execute(text("UPDATE catalog_cache SET fetched_at = :t WHERE service = 'simbad'"),
                  {"t": datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)})
    assert first.lookup("simbad", "M31") == a
    assert len(services["simbad"].requests) == 3  # older than the TTL (1 h): asked again, and stored again
    assert first.lookup("simbad", "M31") == a and len(services["simbad"].requests) == 3
    # Ephemerides are cached per object and time range.
    first.ephemeris("Ceres", 59740.0, 59770.0, "10d")
    first.ephemeris("Ceres", 59740.0, 59770.0, "10d")
    assert len(services["horizons"].requests) == 1


def test_entry_json_round_trip():
    e = CatalogEntry("mpc", "(2062) Aten", aliases=("Aten",), scheme="MPC_MINOR_PLANET",
                     elements={"epochofel": 59800.0}, extras={"mpc_H": 17.1})
    assert CatalogEntry.from_json(json.loads(json.dumps(e.to_json()))) == e


def test_plain_function_for_hooks_and_features(services, db, tmp_path):
    from tomd.config import Config

    config = replace(Config(), catalogs=catalogs_config(services))
    assert lookup("simbad", "Vega", config=config, sessions=db.sessions).name == "* alf Lyr"
    assert lookup("simbad", "Vega", config=config, sessions=db.sessions).name == "* alf Lyr"
    assert len(services["simbad"].requests) == 1


# ------------------------------------------------------------ config, CLI --


def write_config(tmp_path, db, services=None, extra=""):
    path = tmp_path / "tomd.toml"
    cats = ""
    if services is not None:
        c = catalogs_config(services)
        cats = (f'[catalogs]\ntimeout = "10s"\ncache_ttl = "1d"\nsimbad_url = "{c.simbad_url}"\n'
                f'horizons_url = "{c.horizons_url}"\nmpc_url = "{c.mpc_url}"\ntns_url = "{c.tns_url}"\n'
                f'ned_url = "{c.ned_url}"\ntns_bot_id = {TNS_BOT["id"]}\ntns_bot_name = "{TNS_BOT["name"]}"\n'
                f'tns_api_key = "${{TNS_KEY}}"\n')
    path.write_text(f'[database]\nurl = "{db.url}"\n[storage]\nurl = "file://{tmp_path}/data"\n'
                    f'[rules]\npaths = ["{tmp_path}/rules"]\n[hooks]\npaths = ["{tmp_path}/hooks"]\n'
                    f'[metrics]\nlisten = "127.0.0.1:0"\n{cats}{extra}')
    return path


def test_config_section_validates_tns_credentials(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[catalogs]\ntimeout = "never"\ntns_bot_id = 5\nsimbad_url = "ftp://x"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    text_ = str(exc.value)
    assert "catalogs.timeout" in text_ and "catalogs.simbad_url" in text_
    assert "catalogs.tns_bot_name: missing required key when tns_bot_id is set" in text_
    assert "catalogs.tns_api_key" in text_
    path.write_text('[catalogs]\ncache_ttl = "2h"\ntns_bot_id = 5\ntns_bot_name = "b"\ntns_api_key = "k"\n')
    c = load_config(path, env={}).catalogs
    assert c.cache_ttl == 7200.0 and c.tns_api_key.reveal() == "k" and "k'" not in repr(c)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_target_add_from_simbad_merges_into_existing_target(services, db, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TNS_KEY", TNS_BOT["key"])
    cfg = str(write_config(tmp_path, db, services))
    code, out, err = run(capsys, "-c", cfg, "target", "add", "Andromeda", "--ra", "10.68471", "--dec", "41.26875")
    assert code == 0 and "created target #" in out, err
    code, out, err = run(capsys, "-c", cfg, "target", "add", "NGC 224", "--from", "simbad", "--tag", "galaxy")
    assert code == 0, err
    assert "SIMBAD: M 31 (AGN, z=-0.001001), ra 10.684708 dec +41.268750" in out
    assert "matched existing target" in out and "Andromeda by position" in out
    assert "added names: M 31, NGC 224" in out
    code, out, _ = run(capsys, "-c", cfg, "target", "show", "m31", "--json")
    shown = json.loads(out)
    assert shown["name"] == "Andromeda" and shown["ra"] == pytest.approx(10.68471)  # the stored position stays
    assert {"M 31", "NGC 224", "NAME Andromeda Galaxy", "UGC 454"} <= set(shown["aliases"])
    assert shown["tags"] == ["galaxy"] and shown["extras"]["object_type"] == "AGN"
    # Again: from the cache, nothing new.
    code, out, _ = run(capsys, "-c", cfg, "target", "add", "NGC 224", "--from", "simbad")
    assert code == 0 and "matched existing target" in out and len(services["simbad"].requests) == 1


def test_cli_target_add_from_horizons_tns_and_errors(services, db, tmp_path, monkeypatch, capsys):
    from tomd.facilities.lco import target_document
    from tomd.targets.store import resolve

    monkeypatch.setenv("TNS_KEY", TNS_BOT["key"])
    cfg = str(write_config(tmp_path, db, services))
    code, out, err = run(capsys, "-c", cfg, "target", "add", "Ceres", "--from", "horizons", "--list", "solar")
    assert code == 0, err
    assert "JPL Horizons: 1 Ceres (A801 AA) (minor planet), MPC_MINOR_PLANET elements at MJD 59740.0" in out
    assert "created target" in out
    with db.sessions() as s:
        t = resolve(s, "ceres")
        assert t.type == "non_sidereal" and t.meandist == pytest.approx(2.766380805878023)
        doc = target_document(t)
    assert doc["type"] == "ORBITAL_ELEMENTS" and doc["scheme"] == "MPC_MINOR_PLANET" and doc["epochofel"] == 59740.0
    # A TNS name whose survey alias is already a target merges into it.
    run(capsys, "-c", cfg, "target", "add", "ZTF23aaklqou", "--ra", "210.91067", "--dec", "54.31165")
    code, out, err = run(capsys, "-c", cfg, "target", "add", "2023ixf", "--from", "tns")
    assert code == 0 and "TNS: SN 2023ixf (SN II, z=0.000804)" in out and "matched existing target" in out, err
    # Mistakes and outages are one line, exit 1, no traceback.
    code, _, err = run(capsys, "-c", cfg, "target", "add", "Nosuch", "--from", "simbad")
    assert code == 1 and err.strip() == "tomd: SIMBAD: no object named 'Nosuch'"
    code, _, err = run(capsys, "-c", cfg, "target", "add", "M31", "--from", "simbad", "--ra", "1")
    assert code == 1 and "do not also give --ra" in err
    services["tns_state"].rate_limited = True
    code, _, err = run(capsys, "-c", cfg, "target", "add", "2023abc", "--from", "tns")
    assert code == 1 and err.strip() == "tomd: TNS is unavailable: rate limit reached; try again in 17 s"
    down = str(write_config(tmp_path, db, services, extra=""))
    text_ = Path(down).read_text().replace(catalogs_config(services).simbad_url, closed_port_url("/sim-tap"))
    Path(down).write_text(text_)
    code, _, err = run(capsys, "-c", down, "target", "add", "Vega", "--from", "simbad")
    assert code == 1 and err.strip() == "tomd: SIMBAD is unavailable: connection failed" and "Traceback" not in err


def test_cli_target_add_from_tns_near_a_position(services, db, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TNS_KEY", TNS_BOT["key"])
    cfg = str(write_config(tmp_path, db, services))
    run(capsys, "-c", cfg, "target", "add", "ZTF23aaklqou", "--ra", "210.91067", "--dec", "54.31165")
    code, out, err = run(capsys, "-c", cfg, "target", "add", "--from", "tns", "--near", "14:03:38.6", "54.3117",
                         "--radius", "60", "--tag", "tns")
    assert code == 0, err
    assert 'TNS: 2 objects within 60": SN 2023ixf, AT 2026zzz' in out
    assert "matched existing target" in out and "ZTF23aaklqou by" in out  # SN 2023ixf joined the survey's target
    assert "created target" in out and "AT 2026zzz" in out
    search = json.loads(services["tns"].requests[0].form()["data"])
    assert (search["ra"], search["dec"], search["radius"], search["units"]) == ("210.910833", "54.311700", "60",
                                                                               "arcsec")
    code, out, _ = run(capsys, "-c", cfg, "target", "show", "SN 2023ixf", "--json")
    shown = json.loads(out)
    assert shown["name"] == "ZTF23aaklqou" and "tns" in shown["tags"] and "SN 2023ixf" in shown["aliases"]
    code, out, _ = run(capsys, "-c", cfg, "target", "show", "ZTF26aaaaaaa", "--json")
    assert json.loads(out)["name"] == "AT 2026zzz"
    # Nothing there, and mistakes: one line, exit 1.
    code, _, err = run(capsys, "-c", cfg, "target", "add", "--from", "tns", "--near", "10", "10")
    assert code == 1 and err.strip() == 'tomd: TNS: no object reported within 5" of ra 10.000000 dec +10.000000'
    code, _, err = run(capsys, "-c", cfg, "target", "add", "--from", "simbad", "--near", "10", "10")
    assert code == 1 and "add --from tns" in err
    code, _, err = run(capsys, "-c", cfg, "target", "add", "X", "--from", "tns", "--near", "10", "10")
    assert code == 1 and "do not also give NAME ('X')" in err
    code, _, err = run(capsys, "-c", cfg, "target", "add", "--from", "tns", "--near", "10", "nonsense")
    assert code == 1 and "--near" in err and "Traceback" not in err
    code, _, err = run(capsys, "-c", cfg, "target", "add", "--from", "tns", "--near", "10", "10", "--radius", "0")
    assert code == 1 and "--radius" in err
    code, _, err = run(capsys, "-c", cfg, "target", "add", "--from", "tns")
    assert code == 1 and "give a NAME" in err
    services["tns_state"].cone_remaining, services["tns_state"].cone_reset = [0], "300"
    run(capsys, "-c", cfg, "target", "add", "--from", "tns", "--near", "1", "1")
    code, _, err = run(capsys, "-c", cfg, "target", "add", "--from", "tns", "--near", "2", "2")
    assert code == 1 and "TNS is unavailable: rate limit reached; try again in" in err


def test_rubin_solar_system_alert_joins_the_target_made_from_the_mpc(services, db, tmp_path, capsys, shared_data,
                                                                     monkeypatch):
    """The whole flow: MPC orbit → target (with Rubin's ssObjectId as a name) → a Rubin ssSource alert joins it
    (never a sidereal target at the same place) → rules see a moving target → LCO gets ORBITAL_ELEMENTS."""
    from sqlalchemy import select

    from tomd.alerts.ingest import FileMessage, IngestSettings, Ingestor
    from tomd.alerts.parse import parse_message
    from tomd.db import repository as repo
    from tomd.db.models import AlertRow
    from tomd.facilities.lco import target_document
    from tomd.rules.context import AlertView, Context, TargetView
    from tomd.targets import store
    from tomd.targets.model import TargetSpec

    path = shared_data / "lsst/fink-broker-rubin_test_data_9_0/169298432645136561_169298432645136561.avro"
    (alert,) = parse_message("auto", path.read_bytes())
    assert alert.kind == "solar_system" and alert.fields["ssObjectId"] == 21164719644750924
    monkeypatch.setenv("TNS_KEY", TNS_BOT["key"])
    cfg = str(write_config(tmp_path, db, services))
    code, out, err = run(capsys, "-c", cfg, "target", "add", "2013 LL24", "--from", "mpc")
    assert code == 0 and "created target" in out, err
    with db.sessions.begin() as s:
        store.upsert(s, TargetSpec("field star", ra=alert.ra, dec=alert.dec))
    ing = Ingestor(db.sessions, IngestSettings(stream="rubin", format="auto"), lambda d: parse_message("auto", d))
    ing.handle([FileMessage(str(path), 0, path.read_bytes())])
    with db.sessions() as s:
        target = store.resolve(s, "2013 LL24")
        assert s.scalars(select(AlertRow)).one().target_id == target.id
        row = repo.target_rows(s, [target.id])[target.id]
        doc = target_document(target)
    assert doc["type"] == "ORBITAL_ELEMENTS" and doc["meandist"] == pytest.approx(2.470588235294118)
    mjd = 61005.3
    ctx = Context(AlertView(alert), TargetView(row, now_mjd=mjd), mjd)
    assert ctx.target.orbit is not None
    ra, dec = ctx.position()
    assert (ra, dec) != (alert.ra, alert.dec)  # from the orbit, not from the alert
    v = ctx.visibility("lco", 24.0)
    assert v.reason or v.visible


def test_two_processes_caching_the_same_answer_both_succeed(db):
    """The second writer of a key waits for the first (unique key), then replaces its answer: no error."""
    from tomd.db import repository as repo

    inserted, done = threading.Event(), []

    def first():
        with db.sessions.begin() as s:
            repo.catalog_cache_put(s, "simbad", "object:m31", {"who": "first"})
            inserted.set()
            time.sleep(0.5)  # still uncommitted while the second one writes

    def second():
        assert inserted.wait(60)
        with db.sessions.begin() as s:
            repo.catalog_cache_put(s, "simbad", "object:m31", {"who": "second"})
        done.append(True)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done == [True]
    with db.sessions() as s:
        payload, _ = repo.catalog_cache_get(s, "simbad", "object:m31")
        n = s.execute(text("SELECT count(*) FROM catalog_cache")).scalar_one()
    assert (payload, n) == ({"who": "second"}, 1)


def test_plain_function_reads_the_daemons_config_by_default(services, db, tmp_path, monkeypatch):
    import tomd.catalogs as catalogs

    monkeypatch.setattr(catalogs, "_DEFAULT_CONFIG", [])
    monkeypatch.setattr(catalogs, "_SHARED", {})
    monkeypatch.setenv("TNS_KEY", TNS_BOT["key"])
    monkeypatch.setenv("TOMD_CONFIG", str(write_config(tmp_path, db, services)))
    assert lookup("tns", "2023ixf").name == "SN 2023ixf"
    assert lookup("tns", "2023ixf").name == "SN 2023ixf"
    assert len(services["tns"].requests) == 1  # cached in the config's database
    with db.sessions() as s:
        assert s.execute(text("SELECT count(*) FROM catalog_cache WHERE service = 'tns'")).scalar_one() == 1


@dataclass(frozen=True)
class _Fixed:
    """A stand-in orbit: an object fixed at a geocentric (ra, dec, distance in au)."""

    ra: float
    dec: float
    au: float

    def geocentric(self, mjd):
        r, d = np.radians(self.ra), np.radians(self.dec)
        v = self.au * np.array([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])
        return np.repeat(v[:, None], len(np.atleast_1d(mjd)), axis=1)


@pytest.mark.parametrize("au", [0.0026, 1.0])
def test_moving_target_altitude_includes_each_sites_parallax(au):
    """A near-Earth object's altitude from a site: topocentric, as astropy's AltAz gives it."""
    import astropy.units as u
    from astropy.coordinates import GCRS, AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    from tomd import visibility

    iers.conf.auto_download = False
    site, mjd = visibility.SITES["lsc"], 61005.25  # a grid time
    t = Time(mjd, format="mjd", scale="utc")
    loc = EarthLocation.from_geodetic(site.lon * u.deg, site.lat * u.deg, site.height * u.m)
    lst = t.sidereal_time("apparent", longitude=site.lon * u.deg).deg
    obj = _Fixed((lst + 50.0) % 360.0, -10.0, au)  # about 35° up in the west
    with iers.conf.set_temp("iers_degraded_accuracy", "ignore"):
        ref = SkyCoord(ra=obj.ra * u.deg, dec=obj.dec * u.deg, distance=au * u.au,
                       frame=GCRS(obstime=t)).transform_to(AltAz(obstime=t, location=loc)).alt.deg
        geo = SkyCoord(ra=obj.ra * u.deg, dec=obj.dec * u.deg, distance=1e6 * u.au,
                       frame=GCRS(obstime=t)).transform_to(AltAz(obstime=t, location=loc)).alt.deg
    v = visibility.observability_orbit(["lsc"], obj, mjd, 0.01, max_airmass=100.0, min_moon_deg=0.0,
                                       max_sun_alt=90.0)
    alt = np.degrees(np.arcsin(1.0 / v.airmass))
    assert alt == pytest.approx(ref, abs=0.02)
    if au < 0.01:  # at the Moon's distance the parallax is most of a degree: the test can tell
        assert abs(geo - ref) > 0.5


def test_cli_newer_catalog_elements_replace_older_ones(services, db, tmp_path, monkeypatch, capsys):
    from tomd.db.models import OutboxEvent

    monkeypatch.setenv("TNS_KEY", TNS_BOT["key"])
    cfg = str(write_config(tmp_path, db, services))
    code, _, err = run(capsys, "-c", cfg, "target", "add", "Ceres", "--scheme", "MPC_COMET", "--epochofel", "59000",
                       "--orbinc", "10.6", "--longascnode", "80.3", "--argofperih", "73.6", "--perihdist", "2.55",
                       "--eccentricity", "0.0786", "--epochofperih", "59180")
    assert code == 0, err
    code, out, err = run(capsys, "-c", cfg, "target", "add", "Ceres", "--from", "horizons")
    assert code == 0, err
    assert "matched existing target" in out and "by name" in out
    assert "orbital elements replaced by the catalog's, epoch MJD 59740.0 (were at MJD 59000.0)" in out
    code, out, _ = run(capsys, "-c", cfg, "target", "show", "Ceres", "--json")
    shown = json.loads(out)
    assert (shown["scheme"], shown["epochofel"], shown["perihdist"]) == ("MPC_MINOR_PLANET", 59740.0, None)
    assert shown["meananom"] == pytest.approx(321.4371287399738)
    with db.sessions() as s:
        kinds = [e.kind for e in s.query(OutboxEvent).order_by(OutboxEvent.id)]
    assert kinds.count("target.updated") >= 1
    # The same epoch again: nothing to replace.
    code, out, _ = run(capsys, "-c", cfg, "target", "add", "Ceres", "--from", "horizons")
    assert code == 0 and "replaced" not in out
