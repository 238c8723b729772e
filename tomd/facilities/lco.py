"""LCO / SOAR Observation Portal client (the OCS API), over httpx.

API shapes follow the public portal (observation-portal, developers.lco.global):

- ``POST /api/requestgroups/validate/`` → ``{"request_durations": …, "errors": …}``
- ``POST /api/requestgroups/`` → 201 with the stored group (``id``, ``state``,
  ``requests[].id``), or 400 with DRF field errors nested like the document
- ``GET /api/requestgroups/?name=…&id=…&state=…&limit=&offset=`` → paginated
  ``{"count", "next", "previous", "results"}`` (``name`` matches *contains*,
  so the ambiguity check compares names exactly here)
- ``GET /api/observations/?request_state=PENDING&state=PENDING&state=IN_PROGRESS``
  (paginated): the scheduled observations. A request group says PENDING
  until it ends; only its observation tells that it is scheduled (an
  observation with a start time, state PENDING) or IN_PROGRESS
- ``POST /api/requestgroups/{id}/cancel/``, ``GET /api/proposals/``,
  ``GET /api/instruments/``; archive ``GET /frames/?request_id=`` with
  ``url`` and ``version_set[].md5``
- ``Authorization: Token …``; a bad token is 401/403; 429 carries Retry-After;
  every path ends with a slash.

Every call is bounded (invariant 5, in ``tomd.facilities.http``, shared with
the Gemini and Swift clients): a timeout per HTTP exchange, a limited
number of attempts with exponential backoff and full jitter, a per-facility
rate limit (token bucket shared by every thread using this client), and
Retry-After honoured. Only what is safe is retried inside the client: reads,
validation, cancellation, and any call that certainly never reached the
server (connect failure, 429). A submission that may have reached the server
(timeout or reset after sending, 5xx) raises ``AmbiguousError``: the caller
looks the group up by name before trying again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx

from tomd.errors import AmbiguousError, NotFoundError, PermanentError, RetryableError, redact
from tomd.facilities.base import (
    CheckReport,
    DataProduct,
    FacilityState,
    Intent,
    RequestStatus,
    Site,
    Submitted,
    TemplateError,
    TokenRefused,
    Validation,
    ValidationIssue,
    ValidationRejected,
    pick_template,
)
from tomd.facilities.http import Observer, RateLimiter, lost_words, retry_after_s, scrub, send

log = logging.getLogger(__name__)

# Request (and request group) states of the portal → tomd's common states. A request is
# scheduled or in progress when its observation is (observations API, see LCOClient.statuses):
# those two keep the observation's word.
SCHEDULED_WORD = "PENDING (scheduled)"  # the request PENDING, an observation PENDING with a start time
LCO_STATES: dict[str, str] = {
    "PENDING": "pending",
    SCHEDULED_WORD.upper(): "scheduled",
    "SCHEDULED": "scheduled",
    "IN_PROGRESS": "in_progress",
    "COMPLETED": "completed",
    "WINDOW_EXPIRED": "expired",
    "FAILURE_LIMIT_REACHED": "failed",
    "FAILED": "failed",
    "CANCELED": "cancelled",
    "ABORTED": "failed",
    "NOT_ATTEMPTED": "pending",
}

LCO_SITES: tuple[Site, ...] = (
    Site("ogg", "Haleakala Observatory", 20.7069, -156.2575, 3055.0),
    Site("elp", "McDonald Observatory", 30.6797, -104.0151, 2070.0),
    Site("lsc", "Cerro Tololo", -30.1674, -70.8048, 2198.0),
    Site("cpt", "SAAO Sutherland", -32.3806, 20.8101, 1460.0),
    Site("coj", "Siding Spring Observatory", -31.2733, 149.0706, 1116.0),
    Site("tfn", "Teide Observatory", 28.3003, -16.5118, 2330.0),
    Site("tlv", "Wise Observatory", 30.5958, 34.7633, 875.0),
)
SOAR_SITES: tuple[Site, ...] = (Site("sor", "SOAR, Cerro Pachon", -30.2378, -70.7337, 2713.0),)

OBSERVATION_TYPES = ("NORMAL", "RAPID_RESPONSE", "TIME_CRITICAL")
DEFAULT_ARCHIVE = "https://archive-api.lco.global"


_unknown_words: set[str] = set()
_unknown_lock = threading.Lock()


def map_state(word: str) -> FacilityState:
    """The portal's word → (common state, the word). A word tomd does not know (the portal
    added a state) stays ``pending``, is logged once, and says so in the word kept, so the
    status history shows it."""
    common = LCO_STATES.get(str(word).upper())
    if common is not None:
        return FacilityState(common, word)
    with _unknown_lock:
        first = word not in _unknown_words
        _unknown_words.add(word)
    if first:
        log.warning("LCO portal state %r is unknown to tomd: followed as pending", word)
    return FacilityState("pending", f"{word} (unknown to tomd)"[:64])


# -------------------------------------------------------- request building --

_SIDEREAL_MAP = (("pm_ra", "proper_motion_ra"), ("pm_dec", "proper_motion_dec"), ("parallax", "parallax"))
_SCHEME_FIELDS = {
    "MPC_MINOR_PLANET": ("epochofel", "orbinc", "longascnode", "argofperih", "meandist", "eccentricity",
                         "meananom"),
    "MPC_COMET": ("epochofel", "orbinc", "longascnode", "argofperih", "perihdist", "eccentricity",
                  "epochofperih"),
    "JPL_MAJOR_PLANET": ("epochofel", "orbinc", "longascnode", "argofperih", "meandist", "eccentricity",
                         "meananom", "dailymot"),
}
_TEMPLATE_KEYS = {
    "instrument_type", "proposal", "ipp", "ipp_value", "observation_type", "filters", "filter",
    "exposure_time", "exposure_count", "exposures", "max_airmass", "min_lunar_distance",
    "max_lunar_phase", "acceptability_threshold", "telescope_class", "site", "configuration_type",
    "guiding", "acquisition", "window", "readout_mode", "optimization_type", "configuration_repeats",
    "operator", "extra_params", "archive_url",
}


ACTIVE = {"state": ["PENDING", "IN_PROGRESS"]}  # observations scheduled or being observed


def _cursor(t: datetime) -> str:
    """A ``modified_after`` value; microseconds kept: the cursor must not round away the change it stands for."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration_s(v: Any, where: str) -> float:
    from tomd.config import _Invalid, parse_duration

    try:
        return parse_duration(v)
    except _Invalid as exc:
        raise TemplateError(f"{where}: {exc}") from None


def target_document(target: Any) -> dict[str, Any]:
    """The portal's target: ICRS for sidereal targets, ORBITAL_ELEMENTS otherwise."""
    name = getattr(target, "name", None) or "target"
    scheme = getattr(target, "scheme", None)
    if scheme:
        fields = _SCHEME_FIELDS.get(scheme)
        if fields is None:
            raise TemplateError(f"target {name}: unknown orbital element scheme {scheme!r}")
        doc: dict[str, Any] = {"name": name, "type": "ORBITAL_ELEMENTS", "scheme": scheme}
        for f in _SCHEME_FIELDS["JPL_MAJOR_PLANET"] + ("perihdist", "epochofperih"):
            v = getattr(target, f, None)
            if v is not None:
                doc[f] = v
        missing = [f for f in fields if doc.get(f) is None]
        if missing:
            raise TemplateError(f"target {name}: scheme {scheme} needs {', '.join(missing)}")
        return doc
    ra, dec = getattr(target, "ra", None), getattr(target, "dec", None)
    if ra is None or dec is None:
        raise TemplateError(f"target {name}: needs ra/dec or orbital elements")
    doc = {"name": name, "type": "ICRS", "ra": ra, "dec": dec, "epoch": getattr(target, "epoch", None) or 2000.0}
    for ours, theirs in _SIDEREAL_MAP:
        v = getattr(target, ours, None)
        if v is not None:
            doc[theirs] = v
    return doc


def _instrument_configs(t: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    if "exposures" in t:
        items = t["exposures"]
        if not isinstance(items, list) or not items:
            raise TemplateError(f"{where}.exposures: expected a non-empty list of tables")
    else:
        filters = t.get("filters", [t["filter"]] if "filter" in t else None)
        if not filters:
            raise TemplateError(f"{where}: needs filters (or filter, or exposures)")
        if isinstance(filters, str):
            filters = [filters]
        items = [{"filter": f} for f in filters]
    out = []
    for i, e in enumerate(items):
        if not isinstance(e, Mapping):
            raise TemplateError(f"{where}.exposures[{i}]: expected a table")
        exp_time = e.get("exposure_time", t.get("exposure_time"))
        if exp_time is None:
            raise TemplateError(f"{where}: needs exposure_time")
        ic: dict[str, Any] = {
            "exposure_time": exp_time,
            "exposure_count": e.get("exposure_count", e.get("count", t.get("exposure_count", 1))),
            "mode": e.get("readout_mode", t.get("readout_mode", "")),
            "optical_elements": {},
            "extra_params": {},
        }
        filt = e.get("filter")
        if filt:
            ic["optical_elements"]["filter"] = filt
        for k in ("slit", "grating", "rotation"):
            if k in e:
                ic["optical_elements" if k != "rotation" else "extra_params"][k] = e[k]
        out.append(ic)
    return out


def build_request_group(template: Mapping[str, Any], target: Any, intent: Intent, *,
                        default_proposal: str | None = None, template_name: str = "template",
                        now: datetime | None = None) -> dict[str, Any]:
    """The portal's request group for ``target`` from a config template and an intent.

    Pure: no I/O. The group's ``name`` is the intent's idempotency key. The
    intent's mode overrides the template's ``observation_type``, its priority
    the template's ``ipp``; its window, when given, overrides the template's
    ``window`` duration (default 24 h from ``now``).
    """
    where = template_name if "." in template_name else f"templates.{template_name}"
    unknown = sorted(set(template) - _TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(_TEMPLATE_KEYS))}")
    if not template.get("instrument_type"):
        raise TemplateError(f"{where}: needs instrument_type")
    proposal = template.get("proposal") or default_proposal
    if not proposal:
        raise TemplateError(f"{where}: needs proposal (or the facility's proposal)")
    obs_type = (intent.mode or template.get("observation_type") or "NORMAL").upper()
    if obs_type not in OBSERVATION_TYPES:
        raise TemplateError(f"{where}: observation type {obs_type!r}; expected one of {', '.join(OBSERVATION_TYPES)}")
    now = now or datetime.now(timezone.utc)
    start = intent.window_start or now
    end = intent.window_end or (start + timedelta(seconds=_duration_s(template.get("window", "24h"), f"{where}.window")))
    ipp = template.get("ipp_value", template.get("ipp", 1.0))
    if intent.priority is not None:  # the portal takes IPP values from 0.5 to 2.0
        ipp = min(2.0, max(0.5, float(intent.priority)))
    constraints: dict[str, Any] = {"max_airmass": template.get("max_airmass", 1.6),
                                   "min_lunar_distance": template.get("min_lunar_distance", 30.0)}
    if "max_lunar_phase" in template:
        constraints["max_lunar_phase"] = template["max_lunar_phase"]
    configuration = {
        "type": template.get("configuration_type", "EXPOSE"),
        "instrument_type": template["instrument_type"],
        "target": target_document(target),
        "constraints": constraints,
        "acquisition_config": {"mode": template.get("acquisition", "OFF"), "extra_params": {}},
        "guiding_config": {"mode": template.get("guiding", "ON"), "optional": True, "extra_params": {}},
        "instrument_configs": _instrument_configs(template, where),
    }
    if "configuration_repeats" in template:
        configuration["repeat_duration"] = None
    request: dict[str, Any] = {
        "acceptability_threshold": template.get("acceptability_threshold", 90),
        "configurations": [configuration],
        "windows": [{"start": _iso(start), "end": _iso(end)}],
    }
    if "configuration_repeats" in template:
        request["configuration_repeats"] = template["configuration_repeats"]
    if "optimization_type" in template:
        request["optimization_type"] = template["optimization_type"]
    location: dict[str, Any] = {}
    if template.get("telescope_class"):
        location["telescope_class"] = template["telescope_class"]
    if template.get("site"):
        location["site"] = template["site"]
    if location:
        request["location"] = location
    if template.get("extra_params"):
        request["extra_params"] = dict(template["extra_params"])
    return {
        "name": intent.name,
        "proposal": proposal,
        "ipp_value": ipp,
        "operator": template.get("operator", "SINGLE"),
        "observation_type": obs_type,
        "requests": [request],
    }


# ------------------------------------------------------------ error shapes --


def flatten_errors(errors: Any, path: str = "") -> list[ValidationIssue]:
    """DRF's nested error document → one issue per message, with its field path.

    ``{"requests": [{"configurations": [{"target": {"ra": ["…"]}}]}]}`` →
    ``requests[0].configurations[0].target.ra: …``. Empty entries of a list
    (``{}`` for a valid element) are skipped; ``non_field_errors`` and
    ``detail`` name the enclosing path.
    """
    out: list[ValidationIssue] = []
    if isinstance(errors, Mapping):
        for key, value in errors.items():
            sub = path if key in ("non_field_errors", "detail", "__all__") else (f"{path}.{key}" if path else str(key))
            out.extend(flatten_errors(value, sub))
    elif isinstance(errors, list):
        if all(isinstance(e, str) for e in errors):
            out.extend(ValidationIssue(path, e) for e in errors)
        else:
            for i, e in enumerate(errors):
                if isinstance(e, str):
                    out.append(ValidationIssue(path, e))
                elif e:
                    out.extend(flatten_errors(e, f"{path}[{i}]"))
    elif errors not in (None, "", {}):
        out.append(ValidationIssue(path, str(errors)))
    return out


# ------------------------------------------------------------------ client --


_OPERATIONS = frozenset({"frames", "proposals", "instruments", "observations"})


def api_operation(method: str, url: str) -> str:
    """A bounded metric label for a portal call: validate, submit, cancel, list, get, frames, ..."""
    parts = [p for p in urlsplit(url).path.split("/") if p and p != "api"]
    if parts[:1] == ["requestgroups"]:
        if parts[-1] in ("validate", "cancel"):
            return parts[-1]
        if len(parts) == 1:
            return "submit" if method == "POST" else "list"
        return "get"
    return parts[0] if parts and parts[0] in _OPERATIONS else "other"


class LCOClient:
    """The Observation Portal (LCO network or SOAR) as a ``Facility``."""

    def __init__(self, name: str, *, url: str, token: Any = None, proposal: str | None = None,
                 templates: Mapping[str, Mapping[str, Any]] | None = None, timeout: float = 30.0,
                 rate_limit: float = 5.0, kind: str = "lco", archive_url: str | None = None,
                 max_attempts: int = 4, backoff_base: float = 0.5, backoff_cap: float = 10.0,
                 transport: httpx.BaseTransport | None = None, sites: Sequence[Site] | None = None,
                 page_size: int = 100):
        self.name = name
        self.kind = kind
        self.base = url.rstrip("/")
        self.archive = (archive_url or (DEFAULT_ARCHIVE if urlsplit(url).hostname == "observe.lco.global"
                                         else self.base)).rstrip("/")
        self.proposal = proposal
        self.templates = {k: dict(v) for k, v in (templates or {}).items()}
        self.timeout = float(timeout)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.page_size = page_size
        self._no_observations_api = False  # the portal answered 404 there once: said once in the log
        self.limiter = RateLimiter(rate_limit)
        self._sites = tuple(sites) if sites is not None else (SOAR_SITES if kind == "soar" else LCO_SITES)
        headers = {"Accept": "application/json", "User-Agent": "tomd"}
        self._secret = token.reveal() if hasattr(token, "reveal") else token
        if self._secret:
            headers["Authorization"] = f"Token {self._secret}"
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), headers=headers, transport=transport,
                                  follow_redirects=False)
        # Told of every HTTP call: observer(facility, operation, code, seconds), code the HTTP status or
        # "timeout" / "error". The daemon plugs tomd.metrics.Metrics.observe_facility_call in here.
        self.observer: Observer | None = None

    @classmethod
    def from_config(cls, name: str, cfg: Any, **kw: Any) -> "LCOClient":
        """From a ``tomd.config.Facility``; ``kw`` overrides (url for an in-process sim, transport...)."""
        args = dict(url=cfg.url, token=cfg.token, proposal=cfg.proposal, templates=cfg.templates,
                    timeout=cfg.timeout, rate_limit=cfg.rate_limit, kind=cfg.kind)
        args.update(kw)
        return cls(name, **args)

    # -- Facility protocol ----------------------------------------------------

    def sites(self) -> Sequence[Site]:
        return self._sites

    def map_state(self, word: str) -> FacilityState:
        return map_state(word)

    def build_request(self, template: str | Mapping[str, Any], target: Any, intent: Intent) -> dict[str, Any]:
        """From a configured template's name, or an inline template's fields."""
        fields, where = pick_template(self.name, self.templates, template)
        return build_request_group(fields, target, intent, default_proposal=self.proposal, template_name=where)

    def validate(self, request: Mapping[str, Any]) -> Validation:
        body = self._json("POST", "/api/requestgroups/validate/", json=request, safe=True)
        issues = tuple(flatten_errors(body.get("errors") or {}))
        durations = body.get("request_durations") or {}
        duration = durations.get("duration") if isinstance(durations, Mapping) else None
        return Validation(ok=not issues, issues=issues, duration_s=duration)

    def submit(self, request: Mapping[str, Any]) -> Submitted:
        body = self._json("POST", "/api/requestgroups/", json=request, safe=False)
        return Submitted(facility_id=str(body["id"]), state=map_state(body.get("state", "PENDING")),
                         name=body.get("name", request.get("name", "")))

    def find_by_name(self, name: str) -> list[RequestStatus]:
        # The portal's name filter means "contains": compare exactly here.
        return [self._status(g) for g in self._pages("/api/requestgroups/", {"name": name}) if g.get("name") == name]

    def statuses(self, facility_ids: Sequence[str], since: datetime | None = None) -> dict[str, RequestStatus]:
        """Status of many request groups.

        The portal filters by one ``id`` at a time, so with ``since`` (the last
        poll's cursor, on the portal's clock) one paginated ``modified_after``
        listing answers for all of them (ids absent from it did not change),
        in pages of 1000 groups: 10,000 changed groups cost about
        ten calls. The listing is ordered by id, and a group only ever enters
        it (``modified`` grows), so a page boundary can repeat a group but
        never skip one. Without ``since`` each group is read on its own
        (rate-limited): meant for a handful.
        """
        wanted = {str(i) for i in facility_ids}
        out: dict[str, RequestStatus] = {}
        if not wanted:
            return out
        # Observations first: one that ends between the two reads then shows as the group's end,
        # never as "pending again".
        first = self._observations(wanted, {"modified_after": _cursor(since)} if since is not None else ACTIVE)
        self._group_statuses(wanted, since, out)
        self._with_observations(wanted, since, out, first)
        return out

    def _group_statuses(self, wanted: set[str], since: datetime | None, out: dict[str, RequestStatus]) -> None:
        if since is not None:
            url: str | None = self.base + "/api/requestgroups/"
            # Microseconds kept: the cursor must not round away the change it stands for.
            after = _cursor(since)
            # 1000 per page (the portal caps a page at its own maximum and says so in `next`).
            query: Mapping[str, Any] | None = {"modified_after": after, "limit": 1000}
            seen = 0
            while url:
                body = self._json("GET", url, params=query, safe=True, absolute=True)
                results = body.get("results", []) if isinstance(body, Mapping) else body
                for g in results:
                    if str(g.get("id")) in wanted:
                        out[str(g["id"])] = self._status(g)
                seen += len(results)
                nxt = body.get("next") if isinstance(body, Mapping) else None
                if not nxt or not results or seen > 10_000_000:
                    break
                url, query = self._same_origin(nxt, self.base), None
            return
        for fid in sorted(wanted):
            try:
                out[fid] = self._status(self._json("GET", f"/api/requestgroups/{int(fid)}/", safe=True))
            except NotFoundError:
                continue

    def _observations(self, wanted: set[str], query: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]] | None:
        """Observations of PENDING requests by followed group (None: the portal has no observations API)."""
        if self._no_observations_api:
            return None
        try:
            return self._by_group(self._pages("/api/observations/", {"request_state": "PENDING", **query},
                                              limit=1000), wanted)
        except NotFoundError:
            log.warning("%s: the portal has no observations API (HTTP 404): scheduled and in-progress "
                        "requests show as pending", self.name)
            self._no_observations_api = True
            return None

    def _with_observations(self, wanted: set[str], since: datetime | None, out: dict[str, RequestStatus],
                           first: dict[str, list[Mapping[str, Any]]] | None) -> None:
        """Scheduled and in-progress requests, from the observations API, into ``out``.

        A request group says PENDING from submission until it ends, and its
        ``modified`` does not move when the scheduler places it; its observation
        does: state PENDING with a start time (scheduled), IN_PROGRESS, then an
        end. Paginated listings (1000 per page) answer for every followed group
        at once, so the cost grows in pages, not in requests:

        - with ``since``: the observations of PENDING requests modified since
          then (one listing). A group among them is scheduled or in progress
          when one of its observations is active (PENDING, IN_PROGRESS), else
          pending again (the scheduler dropped it, it failed, it was not
          attempted). Groups absent from it did not change.
        - the active observations of PENDING requests (one listing), when
          ``since`` is None, or when a group itself changed while PENDING (a
          reopening, an inner request done) and its observations did not.

        A group whose own word is not PENDING keeps it (it ended). A portal
        without the observations API (404) is followed on group states only.
        """
        if first is None:
            return  # no observations API
        if since is None:
            changed, active = {}, first
        else:
            changed, active = first, {}
            if any(f not in changed and str(g.state.word).upper() == "PENDING" for f, g in out.items()):
                active = self._observations(wanted, ACTIVE) or {}
        for fid in wanted:
            group = out.get(fid)
            if group is not None and str(group.state.word).upper() != "PENDING":
                continue  # the group's own word stands: it ended
            listed = changed.get(fid) or active.get(fid)
            if not listed:
                continue  # not scheduled, nothing changed: the group's word (if reported) stands
            live = [o for o in listed if o.get("state") in ("PENDING", "IN_PROGRESS")]
            if any(o.get("state") == "IN_PROGRESS" for o in live):
                state = map_state("IN_PROGRESS")
            elif live:
                state = map_state(SCHEDULED_WORD)
            else:
                state = map_state("PENDING")  # scheduled no longer
            stamps = [str(o["modified"]) for o in listed if o.get("modified")]
            modified = max(stamps + ([group.modified] if group is not None and group.modified else []), default=None)
            if group is not None:
                out[fid] = replace(group, state=state, modified=modified)
            else:
                rids = tuple(sorted({str(o["request"]["id"]) if isinstance(o.get("request"), Mapping)
                                     else str(o["request"]) for o in listed if o.get("request") is not None}))
                out[fid] = RequestStatus(facility_id=fid, name=str(listed[0].get("name") or ""), state=state,
                                         modified=modified, request_ids=rids)

    @staticmethod
    def _by_group(observations: Any, wanted: set[str]) -> dict[str, list[Mapping[str, Any]]]:
        """Observations of the followed groups, by group id (``request_group_id``, at the top or in ``request``)."""
        out: dict[str, list[Mapping[str, Any]]] = {}
        for o in observations:
            if not isinstance(o, Mapping):
                continue
            gid = o.get("request_group_id")
            if gid is None and isinstance(o.get("request"), Mapping):
                gid = o["request"].get("request_group_id")
            if gid is not None and str(gid) in wanted:
                out.setdefault(str(gid), []).append(o)
        return out

    def cancel(self, facility_id: str) -> RequestStatus:
        body = self._json("POST", f"/api/requestgroups/{int(facility_id)}/cancel/", json={}, safe=True)
        return self._status(body)

    def data_products(self, facility_id: str) -> list[DataProduct]:
        """The archive's frames of every request in the group (every page), each once.

        A frame's ``url`` is the archive's download link (on the LCO archive,
        a presigned S3 URL that expires: list again for a fresh one); its md5
        is the one of the version that URL serves (else the newest version).
        """
        group = self._json("GET", f"/api/requestgroups/{int(facility_id)}/", safe=True)
        out: list[DataProduct] = []
        seen: set[str] = set()
        for req in group.get("requests", []):
            for f in self._pages("/frames/", {"request_id": req["id"]}, base=self.archive):
                if "id" not in f or str(f["id"]) in seen:  # a page boundary that moved under us
                    continue
                seen.add(str(f["id"]))
                versions = [v for v in f.get("version_set") or [] if isinstance(v, Mapping)]
                url = f.get("url") or ""
                version = next((v for v in versions if url and v.get("url") == url), None) or \
                    (max(versions, key=lambda v: str(v.get("created") or "")) if versions else None)
                size = f.get("filesize")
                out.append(DataProduct(
                    product_id=str(f["id"]), filename=f.get("filename") or f.get("basename", str(f["id"])),
                    url=url or (version.get("url") or "" if version else ""),
                    md5=(version or {}).get("md5") or None, size=size if isinstance(size, int) else None,
                    kind="spectroscopy" if f.get("configuration_type") == "SPECTRUM" else "image",
                    meta={k: f[k] for k in ("DATE_OBS", "FILTER", "OBJECT", "SITEID", "INSTRUME", "reduction_level",
                                            "request_id", "configuration_type") if k in f}))
        return out

    def check(self) -> CheckReport:
        problems: list[str] = []
        proposals: list[str] = []
        instruments: list[str] = []
        try:
            proposals = [p["id"] for p in self._pages("/api/proposals/", {}) if p.get("active", True)]
            if self.proposal and self.proposal not in proposals:
                problems.append(f"proposal {self.proposal} is not among this token's active proposals "
                                f"({', '.join(proposals) or 'none'})")
            inst = self._json("GET", "/api/instruments/", safe=True)
            instruments = sorted(inst) if isinstance(inst, Mapping) else []
            for tname, t in self.templates.items():
                it = t.get("instrument_type")
                if it and instruments and it not in instruments:
                    problems.append(f"template {tname}: instrument type {it} is not offered")
                tp = t.get("proposal")
                if tp and tp not in proposals:
                    problems.append(f"template {tname}: proposal {tp} is not among this token's active proposals")
        except (PermanentError, RetryableError, NotFoundError) as exc:  # a 404: wrong URL, or no such API
            problems.append(str(exc))
        return CheckReport(self.name, not problems, tuple(proposals), tuple(instruments), tuple(problems))

    def close(self) -> None:
        self._http.close()

    # -- HTTP -----------------------------------------------------------------

    def _pages(self, path: str, params: Mapping[str, Any], *, base: str | None = None, limit: int | None = None):
        """Every result of a paginated listing, following ``next``."""
        url: str | None = (base or self.base) + path
        query: Mapping[str, Any] | None = {**params, "limit": limit or self.page_size}
        seen = 0
        while url:
            body = self._json("GET", url, params=query, safe=True, absolute=True)
            results = body.get("results", []) if isinstance(body, Mapping) else body
            yield from results
            seen += len(results)
            nxt = body.get("next") if isinstance(body, Mapping) else None
            if not nxt or not results or seen > 1_000_000:
                return
            url, query = self._same_origin(nxt, base or self.base), None

    @staticmethod
    def _same_origin(nxt: str, base: str) -> str:
        """Follow ``next`` but never off to another host (a proxy may rewrite it)."""
        n, b = urlsplit(nxt), urlsplit(base)
        if n.netloc and n.netloc != b.netloc:
            return f"{b.scheme}://{b.netloc}{n.path}" + (f"?{n.query}" if n.query else "")
        return nxt if n.netloc else f"{b.scheme}://{b.netloc}{nxt}"

    def _json(self, method: str, path: str, *, json: Any = None, params: Any = None, safe: bool,
              absolute: bool = False) -> Any:
        url = path if absolute else self.base + path
        resp = self._send(method, url, json=json, params=params, safe=safe)
        try:
            return resp.json()
        except ValueError:
            raise RetryableError(f"{self.name}: {method} {self._show(url)}: answer is not JSON "
                                 f"(HTTP {resp.status_code})") from None

    def _show(self, url: str) -> str:
        return redact(urlsplit(url).path)

    def _send(self, method: str, url: str, *, json: Any, params: Any, safe: bool) -> httpx.Response:
        what = f"{self.name}: {method} {self._show(url)}"

        def answer(resp: httpx.Response) -> httpx.Response | RetryableError:
            status = resp.status_code
            if status < 300:
                return resp
            if status >= 500:
                if not safe:
                    raise AmbiguousError(f"{what}: HTTP {status} from the facility; the request may exist")
                return RetryableError(f"{what}: HTTP {status} from the facility", retry_after=retry_after_s(resp))
            if status == 400:
                try:
                    body = resp.json()
                except ValueError:
                    body = resp.text[:500]
                if isinstance(body, Mapping) and "errors" in body and len(body) <= 2:
                    body = body["errors"]
                raise ValidationRejected(self.name, [replace(i, message=scrub(i.message, self._secret))
                                                     for i in flatten_errors(body)])
            if status == 404:
                raise NotFoundError(f"{what}: not found at the facility (HTTP 404)")
            raise PermanentError(f"{what}: HTTP {status}: {scrub(resp.text[:300], self._secret)}")

        return send(self, api_operation(method, url),
                    lambda: self._http.request(method, url, json=json, params=params), what=what, answer=answer,
                    sent=None if safe else lambda exc: AmbiguousError(
                        f"{what}: {lost_words(exc)} after sending; the request may exist"),
                    refused=lambda status: TokenRefused(f"{self.name} refused the API token (HTTP {status}): "
                                                        f"check facilities.{self.name}.token"),
                    throttled="rate limited by the facility")

    def _status(self, group: Mapping[str, Any]) -> RequestStatus:
        reqs = group.get("requests") or []
        extra: dict[str, Any] = {}
        if "completed_request_ids" in RequestStatus.__dataclass_fields__:
            # Inner requests done while the group goes on (operator MANY): their data can be fetched now.
            extra["completed_request_ids"] = tuple(str(r["id"]) for r in reqs
                                                   if "id" in r and str(r.get("state", "")).upper() == "COMPLETED")
        return RequestStatus(
            facility_id=str(group["id"]), name=group.get("name", ""),
            state=map_state(group.get("state", "PENDING")), modified=group.get("modified"),
            request_ids=tuple(str(r["id"]) for r in reqs if "id" in r), **extra,
        )
