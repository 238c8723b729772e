"""The simulated observatory: a loopback HTTP server speaking the portal's API.

It answers what ``tomd.facilities.lco.LCOClient`` asks of the LCO/SOAR
Observation Portal and its archive, so the real client (and everything above
it) is exercised end to end without a network:

- ``GET  /api/proposals/``, ``GET /api/instruments/``
- ``POST /api/requestgroups/validate/``, ``POST /api/requestgroups/``
- ``GET  /api/requestgroups/?name=&id=&state=&modified_after=&limit=&offset=`` (paginated)
- ``GET  /api/requestgroups/{id}/``, ``POST /api/requestgroups/{id}/cancel/``
- ``GET  /api/observations/?request_group_id=&request_id=&state=&request_state=&modified_after=``
  (paginated) and ``GET /api/requestgroups/{id}/observations/``: the scheduled observations
- ``GET  /frames/?request_id=`` (archive, paginated) and ``GET /download/{frame}/{file}``
  serving tiny valid FITS files made with astropy (never from the network)

Validation errors come back as the portal's DRF documents (nested by field)
with its wording; like the real portal, names are *not* unique, so a blind
retry of a POST makes a duplicate (the tests rely on that). States progress
with time as the portal's do: a request group (and its requests) is PENDING
for ``(pending_s + running_s) / speed`` seconds, then COMPLETED (or
WINDOW_EXPIRED / FAILURE_LIMIT_REACHED when the target name says "expire" /
"fail"), and frames appear when COMPLETED. Like the portal, the group never
says when it is scheduled or observed: its *observation* does (the
observations API). With ``scheduled_s`` an observation (state PENDING, a
start time) appears that long before it starts; with ``running_s`` it is
IN_PROGRESS from ``pending_s`` on, for that long; then it ends with its
group. ``set_state`` forces a state (and its ``modified`` time) at once, e.g.
a COMPLETED group back to PENDING as the portal does when data was bad;
"SCHEDULED" and "IN_PROGRESS" there force the observation, the group staying
PENDING. Listings filter (``modified_after`` as a time) before rendering
and render only the page they answer, so 10,000 groups stay cheap to poll.

Faults on demand (``inject``) or at random (``chaos``): an HTTP status (5xx),
429 with Retry-After, a slow answer, a hang, a dropped connection, and the
nasty ones for exactly-once submission: the request is *stored* and then the
server hangs past the client's timeout, drops the connection, or answers 500.

``python -m tomd.facilities.sim`` (or ``tomd sim``) runs one until Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import math
import random
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tomd.facilities.base import Site

SIM_SITES: tuple[Site, ...] = (
    Site("lsc", "Cerro Tololo (simulated)", -30.1674, -70.8048, 2198.0),
    Site("ogg", "Haleakala (simulated)", 20.7069, -156.2575, 3055.0),
)

_FILTERS = ["U", "B", "V", "R", "I", "up", "gp", "rp", "ip", "zs", "w"]
INSTRUMENTS: dict[str, dict[str, Any]] = {
    "1M0-SCICAM-SINISTRO": {"type": "IMAGE", "class": "1m0", "name": "1.0 meter Sinistro",
                            "optical_elements": {"filters": [{"name": f, "code": f, "schedulable": True}
                                                             for f in _FILTERS]}},
    "0M4-SCICAM-QHY600": {"type": "IMAGE", "class": "0m4", "name": "0.4 meter QHY600",
                          "optical_elements": {"filters": [{"name": f, "code": f, "schedulable": True}
                                                           for f in ("gp", "rp", "ip", "zs", "w")]}},
    "2M0-FLOYDS-SCICAM": {"type": "SPECTRA", "class": "2m0", "name": "2.0 meter FLOYDS",
                          "optical_elements": {"slits": [{"name": s, "code": s, "schedulable": True}
                                                         for s in ("slit_1.2as", "slit_2.0as")]}},
    "SOAR_GHTS_REDCAM": {"type": "SPECTRA", "class": "4m0", "name": "SOAR Goodman red camera",
                         "optical_elements": {"gratings": [{"name": "400 l/mm", "code": "SYZY_400",
                                                            "schedulable": True}]}},
}
OBSERVATION_TYPES = ("NORMAL", "RAPID_RESPONSE", "TIME_CRITICAL")
SCHEME_FIELDS = {
    "MPC_MINOR_PLANET": ("epochofel", "orbinc", "longascnode", "argofperih", "meandist", "eccentricity", "meananom"),
    "MPC_COMET": ("epochofel", "orbinc", "longascnode", "argofperih", "perihdist", "eccentricity", "epochofperih"),
    "JPL_MAJOR_PLANET": ("epochofel", "orbinc", "longascnode", "argofperih", "meandist", "eccentricity",
                         "meananom", "dailymot"),
}
NEVER_VISIBLE = ("According to the constraints of the request, the target is never visible within the time "
                 "window. Check that the target is in the nighttime sky. Consider modifying the time window "
                 "or loosening the airmass or lunar separation constraints. If the target is non sidereal, "
                 "double check that the provided elements are correct.")
REQUIRED = "This field is required."

FAULT_KINDS = ("status", "429", "slow", "hang", "drop", "accept_then_hang", "accept_then_drop", "accept_then_500")


@dataclass
class Fault:
    """One injected misbehaviour, for the next ``count`` matching calls."""

    kind: str  # one of FAULT_KINDS
    count: int = 1
    method: str | None = None  # "POST", "GET" or None for any
    path: str | None = None  # exact path, "PREFIX*" for a prefix, None for any
    status: int = 503
    retry_after: float = 1.0
    delay: float = 1.0  # "slow": seconds before answering

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.path is None:
            return True
        return path.startswith(self.path[:-1]) if self.path.endswith("*") else path == self.path


@dataclass
class _Group:
    doc: dict[str, Any]
    created: float  # monotonic
    created_wall: datetime
    outcome: str
    forced: str | None = None
    forced_at: datetime | None = None
    # One inner request forced apart from its group (LCO: one of several requests COMPLETED
    # while the group is still PENDING): request id → (state, when).
    inner: dict[int, tuple[str, datetime]] = field(default_factory=dict)
    # The observation's forced (state, when), by set_state("SCHEDULED" | "IN_PROGRESS").
    obs: tuple[str, datetime] | None = None


@dataclass
class Received:
    """A call the server received (before any fault): for tests and benchmarks."""

    wall: float  # time.time() at receipt
    method: str
    path: str
    name: str | None = None


class SimObservatory:
    """A simulated LCO-like observatory on a free loopback port.

    ``with SimObservatory() as sim: LCOClient("sim", url=sim.url, token=sim.token)``.
    """

    def __init__(self, *, token: str | None = "sim-token", proposals: tuple[str, ...] = ("SIM2026A-001",),
                 speed: float = 1.0, pending_s: float = 60.0, host: str = "127.0.0.1", port: int = 0,
                 hang_s: float = 5.0, max_page: int = 1000, seed: int | None = None, running_s: float = 0.0,
                 scheduled_s: float = 0.0):
        self.token = token
        self.proposals = tuple(proposals)
        self.speed = speed
        self.pending_s = pending_s
        self.running_s = running_s  # seconds the observation is IN_PROGRESS, from pending_s on (0: none)
        self.scheduled_s = scheduled_s  # seconds before it starts that the observation is scheduled (0: none)
        self.hang_s = hang_s
        self.max_page = max_page
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._groups: dict[int, _Group] = {}
        self._next_group = 1000
        self._next_request = 5000
        self._faults: list[Fault] = []
        self._chaos: tuple[float, tuple[str, ...], tuple[str, ...], random.Random] | None = None
        self.received: deque[Received] = deque(maxlen=100_000)  # bounded for a long-running `tomd sim`
        self._fits_cache: dict[int, bytes] = {}
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._image = self._base_image(seed)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "SimObservatory":
        sim = self

        class Handler(_Handler):
            pass

        Handler.sim = sim
        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="tomd-sim", daemon=True,
                                        kwargs={"poll_interval": 0.1})
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "SimObservatory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the simulator first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls ---------------------------------------------------------

    def inject(self, kind: str, *, count: int = 1, method: str | None = None, path: str | None = None,
               status: int = 503, retry_after: float = 1.0, delay: float = 1.0) -> None:
        """Misbehave on the next ``count`` calls matching ``method`` and ``path`` (exact, or "PREFIX*")."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(Fault(kind, count, method, path, status, retry_after, delay))

    def chaos(self, rate: float, kinds: tuple[str, ...] = FAULT_KINDS, *, methods: tuple[str, ...] = ("GET", "POST"),
              seed: int | None = None) -> None:
        """Misbehave at random on a fraction ``rate`` of calls (0 turns it off)."""
        with self._lock:
            self._chaos = (rate, tuple(kinds), tuple(methods), random.Random(seed)) if rate > 0 else None

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._chaos = None

    def names(self) -> Counter:
        """How many stored request groups carry each name (a duplicate shows as > 1)."""
        with self._lock:
            return Counter(g.doc["name"] for g in self._groups.values())

    def groups(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._render(g) for g in self._groups.values()]

    def set_state(self, group_id: int, state: str) -> None:
        """Force a group (and its requests) into a portal state, e.g. COMPLETED.

        "SCHEDULED" and "IN_PROGRESS" are observation states, as at the portal: the
        group's observation is scheduled (state PENDING with a start time) or
        IN_PROGRESS, and the group stays PENDING (its ``modified`` unchanged)."""
        with self._lock:
            g = self._groups[int(group_id)]
            now = datetime.now(timezone.utc)
            if state in ("SCHEDULED", "IN_PROGRESS"):
                g.obs = ("PENDING" if state == "SCHEDULED" else "IN_PROGRESS", now)
                if self._state(g)[0] != "PENDING":
                    g.forced, g.forced_at = "PENDING", now
                return
            if state == "PENDING":
                g.obs = None  # back to PENDING (e.g. reopened): a new observation must be scheduled
            g.forced, g.forced_at = state, now

    def unschedule(self, group_id: int) -> None:
        """The scheduler drops the group's observation (state CANCELED, modified now): the
        request is PENDING and unscheduled again, as when a better-placed request took its slot."""
        with self._lock:
            g = self._groups[int(group_id)]
            g.obs = ("CANCELED", datetime.now(timezone.utc))

    def set_request_state(self, request_id: int, state: str) -> None:
        """Force one inner request into a state (its group's ``modified`` moves with it)."""
        with self._lock:
            for g in self._groups.values():
                if any(r["id"] == int(request_id) for r in g.doc["requests"]):
                    g.inner[int(request_id)] = (state, datetime.now(timezone.utc))
                    return
        raise KeyError(f"no request {request_id}")

    def submissions(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.method == "POST" and r.path == "/api/requestgroups/"]

    # -- behaviour -------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(method, path):
                    f.count -= 1
                    if f.count <= 0:
                        self._faults.remove(f)
                    return f
            if self._chaos is not None:
                rate, kinds, methods, rng = self._chaos
                if method in methods and path.startswith(("/api/", "/frames/")) and rng.random() < rate:
                    kind = rng.choice(kinds)
                    if kind.startswith("accept_then") and not (method == "POST" and path == "/api/requestgroups/"):
                        kind = "drop"
                    return Fault(kind, status=rng.choice((500, 502, 503)), retry_after=0.2, delay=0.2)
        return None

    def _state(self, g: _Group) -> tuple[str, datetime]:
        """(state, when it was entered): PENDING while scheduled and observed, then the outcome.

        The portal's request groups say PENDING until they end: never IN_PROGRESS
        (the observation says that, ``_observation``)."""
        if g.forced:
            return g.forced, g.forced_at or g.created_wall
        if self.speed <= 0:
            return "PENDING", g.created_wall
        age = time.monotonic() - g.created
        done = (self.pending_s + self.running_s) / self.speed
        if age < done:
            return "PENDING", g.created_wall
        return g.outcome, datetime.fromtimestamp(g.created_wall.timestamp() + done, timezone.utc)

    def _observation(self, g: _Group) -> dict[str, Any] | None:
        """The group's current observation as the observations API shows it, or None (not scheduled).

        One observation per group (its first request), on the natural timeline
        (``scheduled_s``, ``running_s``) or as ``set_state`` forced it; it ends
        with its group (COMPLETED, or FAILED / NOT_ATTEMPTED / CANCELED)."""
        group_state, group_when = self._state(g)
        after = self.pending_s / self.speed if self.speed > 0 else math.inf
        start = datetime.fromtimestamp(g.created_wall.timestamp() + min(after, 1e10), timezone.utc)
        if g.obs is not None:
            state, when = g.obs
            if state == "PENDING":
                start = max(start, when + timedelta(minutes=10))
            else:
                start = min(start, when)
        elif g.forced or self.speed <= 0:
            return None
        else:
            age = time.monotonic() - g.created
            sched, running = self.scheduled_s / self.speed, self.running_s / self.speed
            if age < after - sched or (sched <= 0 and running <= 0):
                return None
            if age < after:
                state, when = "PENDING", datetime.fromtimestamp(g.created_wall.timestamp() + after - sched,
                                                                timezone.utc)
            else:
                state, when = "IN_PROGRESS", start
        if group_state != "PENDING":  # the group ended: so did its observation
            state = {"COMPLETED": "COMPLETED", "CANCELED": "CANCELED", "FAILURE_LIMIT_REACHED": "FAILED"}.get(
                group_state, "NOT_ATTEMPTED")
            when = max(when, group_when)
        r = g.doc["requests"][0]
        duration = timedelta(seconds=max(60.0, self.running_s / self.speed if self.speed > 0 else 60.0))
        iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
        return {"id": r["id"] * 10 + 1, "site": "lsc", "enclosure": "doma", "telescope": "1m0a",
                "start": iso(start), "end": iso(start + duration), "priority": 10, "state": state,
                "modified": iso(when), "created": iso(when),
                "request": {"id": r["id"], "state": group_state, "acceptability_threshold":
                            r.get("acceptability_threshold", 90), "configurations": r.get("configurations", [])},
                "request_group_id": g.doc["id"], "name": g.doc["name"], "proposal": g.doc.get("proposal"),
                "ipp_value": g.doc.get("ipp_value"), "observation_type": g.doc.get("observation_type"),
                "submitter": "sim", "configuration_statuses": []}

    def observations(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        """The observations API's listing, filtered as the portal's ObservationFilter does, newest first."""
        with self._lock:
            groups = list(self._groups.values())
            if "request_group_id" in q:
                wanted = {int(v) for v in q["request_group_id"] if v.isdigit()}
                groups = [g for g in groups if g.doc["id"] in wanted]
            found = [o for o in (self._observation(g) for g in groups) if o is not None]
        if "request_id" in q:
            found = [o for o in found if str(o["request"]["id"]) in q["request_id"]]
        if "state" in q:
            found = [o for o in found if o["state"] in q["state"]]
        if "request_state" in q:
            found = [o for o in found if o["request"]["state"] in q["request_state"]]
        if "proposal" in q:
            found = [o for o in found if o["proposal"] == q["proposal"][-1]]
        if "modified_after" in q:
            try:
                since = datetime.fromisoformat(q["modified_after"][-1].replace("Z", "+00:00"))
            except ValueError:
                return []
            since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
            found = [o for o in found
                     if datetime.fromisoformat(o["modified"].replace("Z", "+00:00")) >= since]
        return sorted(found, key=lambda o: -o["id"])

    def _modified(self, g: _Group, when: datetime) -> datetime:
        """A group changes when it, or one of its requests, does."""
        return max([when, *(t for _, t in g.inner.values())])

    def _render(self, g: _Group) -> dict[str, Any]:
        state, when = self._state(g)
        doc = json.loads(json.dumps(g.doc))
        doc["state"] = state
        doc["modified"] = self._modified(g, when).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for r in doc["requests"]:
            if r["id"] in g.inner and not g.forced:
                r_state, r_when = g.inner[r["id"]]
                r["state"], r["modified"] = r_state, r_when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            else:
                r["state"], r["modified"] = state, stamp
        return doc

    def validate(self, rg: Any) -> tuple[dict[str, Any], float]:
        """(errors as the portal nests them, estimated duration in seconds)."""
        if not isinstance(rg, dict):
            return {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {type(rg).__name__}."]}, 0.0
        errors: dict[str, Any] = {}
        name = rg.get("name")
        if not name:
            errors["name"] = [REQUIRED]
        elif not isinstance(name, str) or len(name) > 50:
            errors["name"] = ["Ensure this field has no more than 50 characters."]
        proposal = rg.get("proposal")
        if not proposal:
            errors["proposal"] = [REQUIRED]
        elif proposal not in self.proposals:
            errors["proposal"] = [f'Invalid pk "{proposal}" - object does not exist.']
        otype = rg.get("observation_type", "NORMAL")
        if otype not in OBSERVATION_TYPES:
            errors["observation_type"] = [f'"{otype}" is not a valid choice.']
        ipp = rg.get("ipp_value", 1.0)
        if not isinstance(ipp, (int, float)) or isinstance(ipp, bool):
            errors["ipp_value"] = ["A valid number is required."]
        elif ipp < 0.5:
            errors["ipp_value"] = ["Ensure this value is greater than or equal to 0.5."]
        elif ipp > 2.0:
            errors["ipp_value"] = ["Ensure this value is less than or equal to 2.0."]
        requests = rg.get("requests")
        duration = 0.0
        if not requests or not isinstance(requests, list):
            errors["requests"] = [REQUIRED] if not requests else ["Expected a list of items."]
            return errors, duration
        req_errors = []
        for r in requests:
            e, d = self._validate_request(r if isinstance(r, dict) else {})
            duration += d
            req_errors.append(e)
        if any(req_errors):
            errors["requests"] = req_errors
        return errors, duration

    def _validate_request(self, r: dict[str, Any]) -> tuple[dict[str, Any], float]:
        e: dict[str, Any] = {}
        now = datetime.now(timezone.utc)
        windows = r.get("windows") or []
        if not windows:
            e["windows"] = [REQUIRED]
        w_errs = []
        for w in windows:
            we: dict[str, Any] = {}
            try:
                start = datetime.fromisoformat(str(w.get("start")).replace("Z", "+00:00"))
                end = datetime.fromisoformat(str(w.get("end")).replace("Z", "+00:00"))
            except ValueError:
                we["start"] = ["Datetime has wrong format. Use one of these formats instead: "
                               "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."]
            else:
                if end <= start:
                    we["end"] = ["Window end time must be after start time"]
                elif end <= now:
                    we["end"] = ["Window end time must be in the future"]
            w_errs.append(we)
        if any(w_errs):
            e["windows"] = w_errs
        confs = r.get("configurations") or []
        if not confs:
            e["configurations"] = [REQUIRED]
        c_errs, duration, never_visible = [], 90.0, False
        for c in confs:
            ce, d, vis = self._validate_configuration(c if isinstance(c, dict) else {})
            duration += d
            never_visible |= not vis
            c_errs.append(ce)
        if any(c_errs):
            e["configurations"] = c_errs
        elif never_visible:
            e["non_field_errors"] = [NEVER_VISIBLE]
        return e, duration

    def _validate_configuration(self, c: dict[str, Any]) -> tuple[dict[str, Any], float, bool]:
        e: dict[str, Any] = {}
        itype = c.get("instrument_type")
        inst = INSTRUMENTS.get(itype or "")
        if not itype:
            e["instrument_type"] = [REQUIRED]
        elif inst is None:
            e["instrument_type"] = [f"Invalid instrument type {itype}. Valid instruments may include: "
                                    + ", ".join(INSTRUMENTS)]
        duration = 0.0
        ic_errs = []
        for ic in c.get("instrument_configs") or []:
            ie: dict[str, Any] = {}
            t = ic.get("exposure_time")
            if not isinstance(t, (int, float)) or isinstance(t, bool):
                ie["exposure_time"] = [REQUIRED if t is None else "A valid number is required."]
            elif t < 0:
                ie["exposure_time"] = ["Ensure this value is greater than or equal to 0."]
            n = ic.get("exposure_count", 1)
            if not isinstance(n, int) or n < 1:
                ie["exposure_count"] = ["Ensure this value is greater than or equal to 1."]
            elif isinstance(t, (int, float)):
                duration += n * (t + 30.0)
            if inst is not None:
                elems = ic.get("optical_elements") or {}
                for kind, values in inst["optical_elements"].items():
                    key = kind[:-1]  # filters → filter
                    codes = {v["code"] for v in values}
                    if elems.get(key) is None:
                        ie.setdefault("optical_elements", {})[key] = [f"Must set optical element of type {key} "
                                                                      f"for instrument type {itype}"]
                    elif elems[key] not in codes:
                        ie.setdefault("optical_elements", {})[key] = [
                            f"Invalid {key} '{elems[key]}' for instrument type {itype}. "
                            f"Valid {key}s are: {', '.join(sorted(codes))}"]
            ic_errs.append(ie)
        if not ic_errs:
            e["instrument_configs"] = [REQUIRED]
        elif any(ic_errs):
            e["instrument_configs"] = ic_errs
        te, visible = self._validate_target(c.get("target") or {}, c.get("constraints") or {})
        if te:
            e["target"] = te
        max_airmass = (c.get("constraints") or {}).get("max_airmass", 1.6)
        if not isinstance(max_airmass, (int, float)) or not 1.0 <= max_airmass <= 25.0:
            e["constraints"] = {"max_airmass": ["Ensure this value is greater than or equal to 1.0 and less "
                                                "than or equal to 25.0."]}
        return e, duration, visible

    def _validate_target(self, t: dict[str, Any], constraints: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        e: dict[str, Any] = {}
        if not t.get("name"):
            e["name"] = [REQUIRED]
        ttype = t.get("type")
        if ttype == "ICRS":
            for key, lo, hi in (("ra", 0.0, 360.0), ("dec", -90.0, 90.0)):
                v = t.get(key)
                if v is None:
                    e[key] = [REQUIRED]
                elif not isinstance(v, (int, float)):
                    e[key] = ["A valid number is required."]
                elif v < lo:
                    e[key] = [f"Ensure this value is greater than or equal to {lo:g}."]
                elif v > hi:
                    e[key] = [f"Ensure this value is less than or equal to {hi:g}."]
            if e or not isinstance(constraints.get("max_airmass", 1.6), (int, float)):
                return e, True
            # Best altitude over the sites: 90° - |dec - lat|; airmass ≈ sec(zenith angle).
            max_airmass = float(constraints.get("max_airmass", 1.6))
            zmax = math.degrees(math.acos(min(1.0, 1.0 / max_airmass))) if max_airmass >= 1 else 0.0
            visible = any(abs(t["dec"] - s.lat) <= zmax for s in SIM_SITES)
            return e, visible
        if ttype == "ORBITAL_ELEMENTS":
            scheme = t.get("scheme")
            if scheme not in SCHEME_FIELDS:
                e["scheme"] = [f'"{scheme}" is not a valid choice.' if scheme else REQUIRED]
            else:
                for f in SCHEME_FIELDS[scheme]:
                    if t.get(f) is None:
                        e[f] = [REQUIRED]
            return e, True
        e["type"] = [f'"{ttype}" is not a valid choice.' if ttype else REQUIRED]
        return e, True

    def store(self, rg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            gid = self._next_group
            self._next_group += 1
            doc = json.loads(json.dumps(rg))
            doc["id"] = gid
            now = datetime.now(timezone.utc)
            doc["created"] = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            doc["submitter"] = "sim"
            for r in doc["requests"]:
                r["id"] = self._next_request
                self._next_request += 1
            tname = str(doc["requests"][0]["configurations"][0]["target"].get("name", "")).lower()
            outcome = ("WINDOW_EXPIRED" if "expire" in tname else
                       "FAILURE_LIMIT_REACHED" if "fail" in tname else "COMPLETED")
            g = _Group(doc, time.monotonic(), now, outcome)
            self._groups[gid] = g
            return self._render(g)

    def list_groups(self, q: dict[str, list[str]]) -> list[dict[str, Any]]:
        return [self._render_locked(g) for g in self._select(q)]

    def _select(self, q: dict[str, list[str]]) -> list[_Group]:
        """The groups a listing's filters keep, newest first (filtered before rendering: a
        listing of 10,000 groups renders only the page it answers)."""
        with self._lock:
            hits = [(g, st, self._modified(g, when)) for g in self._groups.values() for st, when in [self._state(g)]]
        if "name" in q:
            needle = q["name"][-1].lower()
            hits = [h for h in hits if needle in str(h[0].doc["name"]).lower()]  # "contains", as the portal
        if "id" in q:
            ids = {int(i) for v in q["id"] for i in v.split(",") if i.strip().isdigit()}
            hits = [h for h in hits if h[0].doc["id"] in ids]
        if "state" in q:
            hits = [h for h in hits if h[1] in q["state"]]
        if "request_id" in q:
            rid = int(q["request_id"][-1]) if q["request_id"][-1].lstrip("-").isdigit() else None
            hits = [h for h in hits if any(r["id"] == rid for r in h[0].doc["requests"])]
        if "modified_after" in q:
            raw = q["modified_after"][-1].replace("Z", "+00:00")
            try:
                since = datetime.fromisoformat(raw)
            except ValueError:
                return []
            since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
            hits = [h for h in hits if h[2] >= since]
        return [h[0] for h in sorted(hits, key=lambda h: -h[0].doc["id"])]

    def _render_locked(self, g: _Group) -> dict[str, Any]:
        with self._lock:
            return self._render(g)

    def add_groups(self, docs: list[dict[str, Any]], *, state: str | None = None) -> list[int]:
        """Store many request groups at once, without validation (benchmarks); optionally forced
        into ``state`` now. Returns their ids."""
        out = []
        for d in docs:
            out.append(self.store(d)["id"] if state is None else self._store_quiet(d, state))
        return out

    def _store_quiet(self, rg: dict[str, Any], state: str) -> int:
        with self._lock:
            gid = self._next_group
            self._next_group += 1
            doc = json.loads(json.dumps(rg))
            doc["id"] = gid
            now = datetime.now(timezone.utc)
            doc["created"] = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            doc["submitter"] = "sim"
            for r in doc["requests"]:
                r["id"] = self._next_request
                self._next_request += 1
            self._groups[gid] = _Group(doc, time.monotonic(), now, "COMPLETED", state, now)
            return gid

    # -- archive ---------------------------------------------------------------
    # Frames of COMPLETED requests, as the LCO science archive lists them. Like
    # the real archive (whose ``url`` is a presigned S3 URL), download URLs
    # can expire: with ``archive(url_ttl_s=…)`` each carries ``issued`` and
    # ``expires`` (Unix seconds) and a signature, and a late download gets S3's
    # 403 "Request has expired" document. ``expire_urls()`` expires every URL
    # handed out so far; ``truncate_downloads(n)`` makes the next n downloads
    # announce the full Content-Length and close the connection midway.

    def archive(self, *, url_ttl_s: float | None = None, frames_per_config: int | None = None,
                image_shape: tuple[int, int] | None = None) -> "_Archive":
        """The archive's settings (created on first use); keyword arguments change them."""
        with self._lock:
            arch = self.__dict__.get("_archive_state")
            if arch is None:
                arch = self.__dict__["_archive_state"] = _Archive(secret=random.randbytes(16))
            if url_ttl_s is not None:
                arch.url_ttl_s = url_ttl_s if url_ttl_s > 0 else None
            if frames_per_config is not None:
                arch.frames_per_config = max(1, int(frames_per_config))
            if image_shape is not None:
                arch.image_shape = (int(image_shape[0]), int(image_shape[1]))
            return arch

    def expire_urls(self) -> None:
        """Every download URL handed out until now answers 403 "Request has expired"."""
        arch = self.archive()
        with self._lock:
            arch.expired_before = time.time()
            if arch.url_ttl_s is None:
                arch.url_ttl_s = 7 * 86400.0  # URLs must carry their issue time from now on

    def truncate_downloads(self, count: int = 1, *, fraction: float = 0.5) -> None:
        """The next ``count`` downloads send the full Content-Length but only ``fraction`` of the body."""
        arch = self.archive()
        with self._lock:
            arch.truncate, arch.truncate_fraction = int(count), float(fraction)

    def downloads(self) -> list[Received]:
        """The download calls received (expired, cut and faulted ones included)."""
        with self._lock:
            return [r for r in self.received if r.method == "GET" and r.path.startswith("/download/")]

    def frames(self, request_id: int) -> list[dict[str, Any]]:
        arch = self.archive()
        with self._lock:
            hit = [(g, r) for g in self._groups.values() for r in g.doc["requests"] if r["id"] == request_id]
            if not hit or self._state(hit[0][0])[0] != "COMPLETED":
                return []
            g, r = hit[0]
        out = []
        n = 0
        for c in r["configurations"]:
            for ic in c["instrument_configs"]:
                for k in range(min(arch.frames_per_config, int(ic.get("exposure_count", 1)))):
                    n += 1
                    fid = request_id * 1000 + n
                    filt = (ic.get("optical_elements") or {}).get("filter", "")
                    when = g.created_wall + timedelta(minutes=2 * n)
                    data = self._fits(fid, c["target"].get("name", ""), filt, request_id, date_obs=when,
                                      exptime=float(ic.get("exposure_time", 0.0) or 0.0),
                                      instrument=str(c.get("instrument_type", "")))
                    fname = f"sim-{request_id}-{n:03d}-e91.fits"
                    url = self._download_url(arch, fid, fname)
                    md5 = hashlib.md5(data).hexdigest()
                    out.append({"id": fid, "basename": fname[:-5], "filename": fname, "url": url,
                                "filesize": len(data), "request_id": request_id, "OBJECT": c["target"].get("name"),
                                "FILTER": filt, "SITEID": "lsc", "INSTRUME": c.get("instrument_type"),
                                "DATE_OBS": when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                                "configuration_type": c.get("type", "EXPOSE"), "reduction_level": 91,
                                "version_set": [{"id": fid, "key": md5[:8], "md5": md5, "extension": ".fits",
                                                 "url": url, "created": g.doc["created"]}]})
        return out

    def _download_url(self, arch: "_Archive", fid: int, fname: str) -> str:
        url = f"{self.url}/download/{fid}/{fname}"
        if arch.url_ttl_s is None:
            return url
        issued = time.time()
        expires = issued + arch.url_ttl_s
        sig = arch.sign(f"{fid}/{fname}", issued, expires)
        return f"{url}?{urlencode({'issued': f'{issued:.6f}', 'expires': f'{expires:.6f}', 'signature': sig})}"

    def download(self, path: str, q: dict[str, list[str]]) -> tuple[int, bytes, str, int | None]:
        """(status, body, content type, bytes to send before cutting the line or None) for a download."""
        arch = self.archive()
        segs = path.split("/")
        try:
            fid = int(segs[2])
        except (IndexError, ValueError):
            fid = -1
        data = self.fits_bytes(fid)
        if data is None:
            return 404, json.dumps({"detail": "Not found."}).encode(), "application/json", None
        if "expires" in q or arch.url_ttl_s is not None:
            now = time.time()
            try:
                issued, expires = float(q["issued"][-1]), float(q["expires"][-1])
                good = hmac.compare_digest(arch.sign("/".join(segs[2:4]), issued, expires), q["signature"][-1])
            except (KeyError, ValueError, IndexError):
                good, issued, expires = False, 0.0, 0.0
            if not good:
                return 403, _s3_error("SignatureDoesNotMatch", "The request signature we calculated does not "
                                      "match the signature you provided. Check your key and signing method."), \
                    "application/xml", None
            if now > expires or issued < arch.expired_before:
                stamp = datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                return 403, _s3_error("AccessDenied", "Request has expired", X_Amz_Expires=str(int(arch.url_ttl_s or 0)),
                                      Expires=stamp, ServerTime=datetime.now(timezone.utc).strftime(
                                          "%Y-%m-%dT%H:%M:%SZ")), "application/xml", None
        cut = None
        with self._lock:
            if arch.truncate > 0:
                arch.truncate -= 1
                cut = int(len(data) * arch.truncate_fraction)
        return 200, data, "application/fits", cut

    def _base_image(self, seed: int | None):
        import numpy as np

        rng = np.random.default_rng(seed)
        return (rng.normal(1000.0, 10.0, (16, 16))).astype("int16")

    def _fits(self, frame_id: int, obj: str, filt: str, request_id: int, *, date_obs: datetime | None = None,
              exptime: float = 0.0, instrument: str = "") -> bytes:
        with self._lock:
            if frame_id in self._fits_cache:
                return self._fits_cache[frame_id]
        from astropy.io import fits

        import numpy as np

        shape = self.archive().image_shape
        image = self._image if shape is None else np.resize(self._image, shape)
        hdu = fits.PrimaryHDU(image + (frame_id % 7))
        hdu.header["OBJECT"] = obj[:68]
        hdu.header["FILTER"] = filt
        hdu.header["REQNUM"] = request_id
        hdu.header["SITEID"] = "lsc"
        hdu.header["ORIGIN"] = "tomd simulated observatory"
        if instrument:
            hdu.header["INSTRUME"] = instrument[:68]
        # What real LCO frames carry and processors read (data-quality hooks, photometry).
        when = date_obs or datetime.now(timezone.utc)
        hdu.header["DATE-OBS"] = when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        hdu.header["MJD-OBS"] = round(when.timestamp() / 86400.0 + 40587.0, 8)
        hdu.header["EXPTIME"] = exptime
        buf = io.BytesIO()
        hdu.writeto(buf)
        data = buf.getvalue()
        with self._lock:
            self._fits_cache[frame_id] = data
        return data

    def fits_bytes(self, frame_id: int) -> bytes | None:
        with self._lock:
            return self._fits_cache.get(frame_id)


@dataclass
class _Archive:
    """The simulated archive's settings and one-shot faults (``SimObservatory.archive()``)."""

    secret: bytes
    url_ttl_s: float | None = None  # None: download URLs never expire
    expired_before: float = 0.0  # URLs issued before this Unix time are expired
    frames_per_config: int = 3  # frames per instrument configuration (at most its exposure_count)
    image_shape: tuple[int, int] | None = None  # larger frames than the default 16 x 16 (streaming tests)
    truncate: int = 0  # downloads left to cut midway
    truncate_fraction: float = 0.5

    def sign(self, what: str, issued: float, expires: float) -> str:
        msg = f"{what}|{issued:.6f}|{expires:.6f}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:32]


def _s3_error(code: str, message: str, **extra: str) -> bytes:
    """An S3 error document, as a presigned URL's host answers."""
    from xml.sax.saxutils import escape

    rid = random.randbytes(8).hex().upper()
    more = "".join(f"<{k.replace('_', '-')}>{escape(v)}</{k.replace('_', '-')}>" for k, v in extra.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message>'
            f"{more}<RequestId>{rid}</RequestId><HostId>tomd-sim</HostId></Error>").encode()


class _Cut(bytes):
    """A body whose announced length (``len``, hence Content-Length) is the whole file's.

    ``_send`` writes the bytes it holds (a part) and announces the full
    length; the handler then closes the connection, so the client sees a
    body that ends early, as when a line drops mid-download.
    """

    full: int

    def __new__(cls, data: bytes, full: int) -> "_Cut":
        obj = super().__new__(cls, data)
        obj.full = full
        return obj

    def __len__(self) -> int:
        return self.full


class _Rendered:
    """Groups rendered only when a page slices them."""

    def __init__(self, sim: SimObservatory, groups: list[_Group]):
        self.sim, self.groups = sim, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: slice) -> list[dict[str, Any]]:
        with self.sim._lock:
            return [self.sim._render(g) for g in self.groups[k]]


class _Handler(BaseHTTPRequestHandler):
    sim: SimObservatory
    protocol_version = "HTTP/1.1"
    server_version = "tomd-sim/1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    # -- plumbing --------------------------------------------------------------

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None,
              ctype: str = "application/json") -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self, method: str) -> None:
        sim = self.sim
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = ValueError
        name = body.get("name") if isinstance(body, dict) else None
        with sim._lock:
            sim.received.append(Received(time.time(), method, path, name))
        fault = sim._take_fault(method, path)
        if fault is not None:
            if fault.kind == "status":
                return self._send(fault.status, {"detail": "Server Error (simulated)"})
            if fault.kind == "429":
                return self._send(429, {"detail": f"Request was throttled. Expected available in "
                                                  f"{int(math.ceil(fault.retry_after))} seconds."},
                                  {"Retry-After": f"{fault.retry_after:g}"})
            if fault.kind == "slow":
                sim._stopping.wait(fault.delay)
            elif fault.kind == "hang":
                sim._stopping.wait(sim.hang_s)
                return self._drop()
            elif fault.kind == "drop":
                return self._drop()
        status, doc, headers, blob, ctype = self._route(method, path, query, body)
        if fault is not None and fault.kind.startswith("accept_then"):
            # The work is done (a request group stored); the answer never arrives.
            if fault.kind == "accept_then_hang":
                sim._stopping.wait(sim.hang_s)
                return self._drop()
            if fault.kind == "accept_then_drop":
                return self._drop()
            return self._send(500, {"detail": "Server Error (simulated, after storing)"})
        self._send(status, doc, headers, blob, ctype)

    def _route(self, method: str, path: str, q: dict[str, list[str]], body: Any):
        sim = self.sim
        if path.startswith("/download/"):
            # Presigned-style: no token needed (the signature in the URL is the authority).
            status, data, ctype, cut = sim.download(path, q)
            if cut is not None:
                self.close_connection = True  # after the part is written: the client sees a short body
                return status, None, None, _Cut(data[:cut], len(data)), ctype
            return status, None, None, data, ctype
        if not path.endswith("/"):
            # Django's APPEND_SLASH cannot redirect a POST; the portal wants trailing slashes.
            return 404, {"detail": f"Not found: {path} (the API's paths end with '/')"}, None, None, "application/json"
        if sim.token is not None and self.headers.get("Authorization") != f"Token {sim.token}":
            detail = "Invalid token." if self.headers.get("Authorization") else \
                "Authentication credentials were not provided."
            return 403, {"detail": detail}, None, None, "application/json"
        if body is ValueError:
            return 400, {"detail": "JSON parse error"}, None, None, "application/json"
        ok = lambda status, doc: (status, doc, None, None, "application/json")  # noqa: E731
        if method == "GET" and path == "/api/proposals/":
            return ok(200, self._page([{"id": p, "title": "Simulated follow-up", "active": True, "pi": "sim",
                                        "timeallocation_set": [{"instrument_types": list(INSTRUMENTS),
                                                                "std_allocation": 100.0, "std_time_used": 0.0,
                                                                "rr_allocation": 10.0, "rr_time_used": 0.0,
                                                                "tc_allocation": 10.0, "tc_time_used": 0.0}]}
                                       for p in sim.proposals], q))
        if method == "GET" and path == "/api/instruments/":
            return ok(200, INSTRUMENTS)
        if method == "POST" and path == "/api/requestgroups/validate/":
            errors, duration = sim.validate(body)
            return ok(200, {"request_durations": {"duration": duration} if not errors else {}, "errors": errors})
        if method == "POST" and path == "/api/requestgroups/":
            errors, _ = sim.validate(body)
            if errors:
                return ok(400, errors)
            return ok(201, sim.store(body))
        if method == "GET" and path == "/api/requestgroups/":
            return ok(200, self._page(_Rendered(sim, sim._select(q)), q))
        segs = [s for s in path.split("/") if s]
        if len(segs) >= 3 and segs[:2] == ["api", "requestgroups"] and segs[2].isdigit():
            gid = int(segs[2])
            with sim._lock:
                g = sim._groups.get(gid)
            if g is None:
                return ok(404, {"detail": "Not found."})
            if method == "GET" and len(segs) == 3:
                with sim._lock:
                    return ok(200, sim._render(g))
            if method == "GET" and segs[3:] == ["observations"]:
                return ok(200, sim.observations({"request_group_id": [str(gid)]}))
            if method == "POST" and segs[3:] == ["cancel"]:
                with sim._lock:
                    state, _ = sim._state(g)
                    if state != "PENDING":
                        return ok(400, {"errors": [f"Cannot cancel a request group in state {state}"]})
                    g.forced, g.forced_at = "CANCELED", datetime.now(timezone.utc)
                    return ok(200, sim._render(g))
        if method == "GET" and path == "/api/observations/":
            return ok(200, self._page(sim.observations(q), q))
        if method == "GET" and path == "/frames/":
            rid = q.get("request_id", ["-1"])[-1]
            return ok(200, self._page(sim.frames(int(rid)) if rid.lstrip("-").isdigit() else [], q))
        return ok(404, {"detail": "Not found."})

    def _page(self, items: list[Any], q: dict[str, list[str]]) -> dict[str, Any]:
        """DRF LimitOffsetPagination."""
        try:
            limit = max(1, min(int(q.get("limit", ["10"])[-1]), self.sim.max_page))
            offset = max(0, int(q.get("offset", ["0"])[-1]))
        except ValueError:
            limit, offset = 10, 0
        page = items[offset:offset + limit]

        def link(off: int) -> str:
            params = {k: v for k, v in q.items() if k not in ("limit", "offset")}
            params["limit"], params["offset"] = [str(limit)], [str(off)]
            return f"{self.sim.url}{urlsplit(self.path).path}?{urlencode(params, doseq=True)}"

        return {"count": len(items), "next": link(offset + limit) if offset + limit < len(items) else None,
                "previous": link(max(0, offset - limit)) if offset > 0 else None, "results": page}


# ------------------------------------------------------------------ command --


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    p.add_argument("--token", default="sim-token", help='API token to accept (default "sim-token"; "" accepts any)')
    p.add_argument("--proposal", action="append", help="proposal ids (default SIM2026A-001)")
    p.add_argument("--speed", type=float, default=1.0, help="time runs this many times faster (default 1)")
    p.add_argument("--pending", type=float, default=60.0, help="seconds a request stays PENDING at speed 1")
    p.add_argument("--running", type=float, default=0.0,
                   help="then seconds its observation is IN_PROGRESS at speed 1 (default 0: straight to COMPLETED)")
    p.add_argument("--scheduled", type=float, default=0.0,
                   help="seconds before it starts that the observation is scheduled, at speed 1 (default 0)")
    p.add_argument("--chaos", type=float, default=0.0, help="fraction of calls that misbehave at random")


def serve(args: argparse.Namespace, *, out=sys.stdout) -> int:
    sim = SimObservatory(token=args.token or None, proposals=tuple(args.proposal or ("SIM2026A-001",)),
                         speed=args.speed, pending_s=args.pending, host=args.host, port=args.port,
                         running_s=getattr(args, "running", 0.0), scheduled_s=getattr(args, "scheduled", 0.0))
    with sim:
        if args.chaos:
            sim.chaos(args.chaos)
        print(f"simulated observatory at {sim.url} (token {args.token!r}, proposals "
              f"{', '.join(sim.proposals)}); Ctrl-C stops it", file=out, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tomd.facilities.sim", description="Run the simulated observatory.")
    add_arguments(p)
    return serve(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
