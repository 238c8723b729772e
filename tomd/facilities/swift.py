"""Swift TOO request client (the TOO API that swifttools' ``swift_too`` speaks), over httpx.

The API, as swifttools (Swift-SOT/swifttools, ``swift_too``) uses it: every
call is ``POST https://www.swift.psu.edu/toop/submit_json.php`` with one form
field ``jwt``, a JSON Web Token (HS256, signed with the user's *shared secret*,
which itself never travels) whose payload is::

    {"api_name": "Swift_TOO_Request", "api_version": "1.2", "api_data": {"username": ..., ...}}

- ``Swift_TOO_Request``: a TOO. ``api_data`` holds the form's fields:
  source_name, source_type, ra, dec (J2000 degrees), poserr (arcmin),
  instrument (XRT/UVOT/BAT), urgency (1 within 4 h, 2 within 24 h, 3 days to a
  week, 4 week to a month), obs_type (Spectroscopy, Light Curve, Position,
  Timing), brightness (opt_mag + opt_filt, xrt_countrate, bat_countrate,
  other_brightness), immediate_objective, science_just, exposure,
  exp_time_just, exp_time_per_visit, num_of_visits, monitoring_freq,
  xrt_mode (PC/WT/Auto), uvot_mode ("0x9999" = filter of the day), uvot_just,
  GRB fields (grb_detector, grb_triggertime), GI fields (proposal,
  proposal_id, proposal_pi, proposal_trigger_just), tiling fields, and
  ``validate_only`` (the server checks without submitting) / ``debug``.
- The answer is JSON, ``{"api_name": "Swift_TOO_Status", "api_data": {"status":
  "Queued", "jobnumber": N, "errors": [], "warnings": [], ...}}``: requests
  are queued jobs. ``Swift_TOO_Status`` with ``jobnumber`` polls the job until
  it is ``Accepted`` (with the new ``too_id``) or ``Rejected`` (with ``errors``).
- ``Swift_TOO_Requests`` with ``detail``, ``limit``, ``too_id`` lists the
  user's TOOs with what the Swift team decided (``decision``, ``done``,
  ``date_begin``/``date_end``, approved exposure and modes).

How tomd maps it:

- ``validate``: local checks of the form's rules, then the server's own
  ``validate_only`` run (a job like any other). ``submit``: queue, then poll
  the job for up to ``job_wait`` seconds; Accepted → submitted (the TOO id is
  the facility id), Rejected → rejected in the API's words. A job still queued
  after ``job_wait``, a timeout or reset after sending, or a 5xx on the POST
  raise ``AmbiguousError``: the submitter then looks the request up by name.
- The name (idempotency key): the TOO form has no name field of its own, so
  the key rides at the end of ``immediate_objective`` as ``[tomd NAME]``
  (read by the Swift team, harmless), and ``find_by_name`` lists the user's
  recent TOOs (``lookup_limit``) and matches that tag exactly.
- States: the job's Queued/Processing/Accepted → pending; then the TOO's
  decision: Approved → scheduled, done → completed, Rejected/Declined →
  failed; the word kept is Swift's.
- Not offered by the API: cancelling (``cancel`` raises, write to the Swift
  team) and data listing (``data_products`` is empty: Swift data go to the
  Swift quick-look site and HEASARC by observation id).
- Bad credentials: the server cannot verify the token, and says so in the
  status errors (or with HTTP 401/403); both become ``TokenRefused``.

Residual window, said plainly: a job that the server had queued but not yet
processed when the look-up runs is invisible to ``Swift_TOO_Requests``. The
submitter looks only after ``settle_s`` and after ``job_wait`` of polling, and
the JWT of a document is deterministic (same request → same token; swifttools
polls a queued request by posting the same token again, which implies the TOO
API answers a repeated token with the same job; exactly-once here does not
depend on that).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
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
from tomd.facilities.http import Observer, RateLimiter, lost_words, retry_after_s, send

log = logging.getLogger(__name__)

DEFAULT_URL = "https://www.swift.psu.edu/toop/submit_json.php"
API_VERSION = "1.2"
INSTRUMENTS = ("XRT", "UVOT", "BAT")
OBS_TYPES = ("Spectroscopy", "Light Curve", "Position", "Timing")
XRT_MODES = {"PC": "PC", "WT": "WT", "AUTO": "Auto", "7": "PC", "6": "WT", "0": "Auto"}
MONITORING_UNITS = ("second", "minute", "hour", "day", "week", "month", "year", "orbit")
# Intent modes (the LCO words tomd's rules use) → Swift urgency.
MODE_URGENCY = {"TIME_CRITICAL": 1, "RAPID_RESPONSE": 2, "NORMAL": None}

# Job words and decision words → tomd's common states (matched on the first word, lower case).
SWIFT_STATES: dict[str, str] = {
    "queued": "pending", "processing": "pending", "accepted": "pending", "awaiting": "pending",
    "pending": "pending", "approved": "scheduled", "observing": "in_progress", "done": "completed",
    "completed": "completed", "rejected": "failed", "declined": "failed", "expired": "expired",
    "cancelled": "cancelled", "canceled": "cancelled", "withdrawn": "cancelled",
}

_TEMPLATE_KEYS = {
    "instrument", "urgency", "obs_type", "source_type", "exposure", "exp_time_per_visit", "num_of_visits",
    "monitoring_freq", "immediate_objective", "science_just", "exp_time_just", "xrt_mode", "uvot_mode", "uvot_just",
    "poserr", "opt_mag", "opt_filt", "xrt_countrate", "bat_countrate", "other_brightness", "grb_detector",
    "grb_triggertime", "proposal", "proposal_id", "proposal_pi", "proposal_trigger_just", "tiling",
    "number_of_tiles", "exposure_time_per_tile", "tiling_justification", "slew_in_place", "debug",
}
_AUTH_WORDS = re.compile(r"(?i)shared.?secret|jwt|signature|not authori[sz]ed|authenticat|credential|"
                         r"unknown user|username")


def map_state(word: str) -> FacilityState:
    first = (word or "").strip().split(" ")[0].lower()
    return FacilityState(SWIFT_STATES.get(first, "pending"), word)


def name_tag(name: str) -> str:
    return f"[tomd {name}]"


# -------------------------------------------------------------------- JWT --


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def encode_jwt(payload: Mapping[str, Any], secret: str) -> str:
    """HS256 JWT, deterministic: the same payload and secret give the same token."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode())
    signing = header + b"." + body
    return (signing + b"." + _b64(hmac.new(secret.encode(), signing, hashlib.sha256).digest())).decode()


# -------------------------------------------------------- request building --


def _need(t: Mapping[str, Any], key: str, where: str) -> Any:
    v = t.get(key)
    if v in (None, ""):
        raise TemplateError(f"{where}: needs {key}")
    return v


def build_too(template: Mapping[str, Any], target: Any, intent: Intent, *,
              template_name: str = "template") -> dict[str, Any]:
    """The TOO request's fields (without username) for ``target``. Pure: no I/O.

    The intent's mode sets the urgency (TIME_CRITICAL 1, RAPID_RESPONSE 2,
    or a digit 1-4; NORMAL keeps the template's, default 3). The TOO form has
    no window: Swift schedules by urgency. The idempotency key is appended
    to ``immediate_objective``.
    """
    where = template_name if "." in template_name else f"templates.{template_name}"
    unknown = sorted(set(template) - _TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(_TEMPLATE_KEYS))}")
    name = getattr(target, "name", None) or "target"
    ra, dec = getattr(target, "ra", None), getattr(target, "dec", None)
    if ra is None or dec is None:
        raise TemplateError(f"target {name}: Swift TOO requests need ra/dec")
    urgency = template.get("urgency", 3)
    if intent.mode:
        mode = intent.mode.strip().upper()
        if mode in MODE_URGENCY:
            urgency = MODE_URGENCY[mode] or urgency
        elif mode in ("1", "2", "3", "4"):
            urgency = int(mode)
        else:
            raise TemplateError(f"{where}: mode {intent.mode!r}; expected TIME_CRITICAL, RAPID_RESPONSE, NORMAL or 1-4")
    objective = str(template.get("immediate_objective") or "").strip()
    doc: dict[str, Any] = {
        "source_name": str(name), "source_type": str(_need(template, "source_type", where)),
        "ra": round(float(ra), 6), "dec": round(float(dec), 6),
        "instrument": str(template.get("instrument", "XRT")).upper(),
        "urgency": urgency,
        "obs_type": _need(template, "obs_type", where),
        "science_just": str(_need(template, "science_just", where)),
        "exp_time_just": str(_need(template, "exp_time_just", where)),
        "immediate_objective": f"{objective} {name_tag(intent.name)}".strip(),
        "num_of_visits": int(template.get("num_of_visits", 1)),
        "xrt_mode": XRT_MODES.get(str(template.get("xrt_mode", "PC")).upper(), str(template.get("xrt_mode"))),
        "uvot_mode": str(template.get("uvot_mode", "0x9999")),
    }
    visits = doc["num_of_visits"]
    if "exposure" in template:
        doc["exposure"] = int(template["exposure"])
    if "exp_time_per_visit" in template:
        doc["exp_time_per_visit"] = int(template["exp_time_per_visit"])
        doc.setdefault("exposure", doc["exp_time_per_visit"] * visits)
    if "exposure" not in doc:
        raise TemplateError(f"{where}: needs exposure (or exp_time_per_visit)")
    for k in sorted(_TEMPLATE_KEYS - set(doc) - {"urgency", "exposure", "exp_time_per_visit", "num_of_visits"}):
        if template.get(k) not in (None, ""):
            doc[k] = template[k]
    return doc


def check_too(doc: Mapping[str, Any]) -> list[ValidationIssue]:
    """The TOO form's own rules (as swifttools checks them), before asking the server."""
    issues: list[ValidationIssue] = []

    def bad(path: str, msg: str) -> None:
        issues.append(ValidationIssue(path, msg))

    for k in ("source_name", "source_type", "ra", "dec", "obs_type", "science_just", "exp_time_just",
              "num_of_visits", "exposure"):
        if doc.get(k) in (None, ""):
            bad(k, "required")
    try:
        if not 0.0 <= float(doc.get("ra", 0)) < 360.0:
            bad("ra", "expected degrees 0..360")
        if not -90.0 <= float(doc.get("dec", 0)) <= 90.0:
            bad("dec", "expected degrees -90..90")
    except (TypeError, ValueError):
        bad("ra", "expected numbers of degrees")
    if doc.get("obs_type") not in OBS_TYPES:
        bad("obs_type", f"{doc.get('obs_type')!r}; expected one of {', '.join(OBS_TYPES)}")
    if doc.get("instrument") not in INSTRUMENTS:
        bad("instrument", f"{doc.get('instrument')!r}; expected one of {', '.join(INSTRUMENTS)}")
    if doc.get("urgency") not in (1, 2, 3, 4):
        bad("urgency", f"{doc.get('urgency')!r}; expected 1 (within 4 h), 2 (24 h), 3 (days), 4 (weeks)")
    if doc.get("xrt_mode") not in ("PC", "WT", "Auto"):
        bad("xrt_mode", f"{doc.get('xrt_mode')!r}; expected PC, WT or Auto")
    try:
        if int(doc.get("exposure") or 0) <= 0:
            bad("exposure", "expected a positive number of seconds")
    except (TypeError, ValueError):
        bad("exposure", "expected a number of seconds")
    visits = doc.get("num_of_visits") or 1
    if isinstance(visits, int) and visits > 1:
        if not doc.get("exp_time_per_visit"):
            bad("exp_time_per_visit", "required when num_of_visits > 1")
        freq = str(doc.get("monitoring_freq") or "").strip().split()
        if len(freq) != 2 or freq[1].lower().rstrip("s") not in MONITORING_UNITS:
            bad("monitoring_freq", f"required when num_of_visits > 1, like '2 days'; units: {', '.join(MONITORING_UNITS)}")
    if not ((doc.get("opt_mag") is not None and doc.get("opt_filt")) or doc.get("xrt_countrate") is not None
            or doc.get("bat_countrate") is not None or doc.get("other_brightness")):
        bad("opt_mag", "at least one brightness is required (opt_mag with opt_filt, xrt_countrate, bat_countrate "
                       "or other_brightness)")
    if str(doc.get("source_type", "")).upper() == "GRB" and not (doc.get("grb_triggertime") and doc.get("grb_detector")):
        bad("grb_triggertime", "a GRB needs grb_triggertime and grb_detector")
    if "9999" not in str(doc.get("uvot_mode", "0x9999")) and not doc.get("uvot_just"):
        bad("uvot_just", "required when uvot_mode is not the filter of the day (0x9999)")
    if doc.get("proposal") and not (doc.get("proposal_id") and doc.get("proposal_pi") and doc.get("proposal_trigger_just")):
        bad("proposal_id", "a GI trigger needs proposal_id, proposal_pi and proposal_trigger_just")
    if doc.get("tiling") and not doc.get("tiling_justification"):
        bad("tiling_justification", "required with tiling")
    return issues


def entry_state(entry: Mapping[str, Any]) -> FacilityState:
    """A listed TOO's state: done, else the Swift team's decision, else waiting for one."""
    if str(entry.get("done", "")).lower() in ("1", "true", "yes"):
        return map_state("Done")
    return map_state(str(entry.get("decision") or "Awaiting decision"))


def _status_of(body: Any) -> dict[str, Any]:
    """The job status inside an answer (a Swift_TOO_Status, or a full result carrying one)."""
    if not isinstance(body, Mapping):
        return {}
    data = body.get("api_data") if "api_data" in body else body
    if not isinstance(data, Mapping):
        return {}
    if body.get("api_name", "Swift_TOO_Status") == "Swift_TOO_Status":
        return dict(data)
    st = data.get("status")
    if isinstance(st, Mapping):
        out = dict(st.get("api_data", st))
        out.setdefault("too_id", data.get("too_id"))
        return out
    return {"status": st, "too_id": data.get("too_id"), "errors": data.get("errors", [])}


# ------------------------------------------------------------------ client --


class SwiftClient:
    """The Swift TOO API as a ``Facility``."""

    def __init__(self, name: str, *, url: str | None = None, username: str | None = None, token: Any = None,
                 templates: Mapping[str, Mapping[str, Any]] | None = None, timeout: float = 30.0,
                 rate_limit: float = 1.0, job_wait: float = 60.0, poll_s: float = 1.0, lookup_limit: int = 100,
                 max_attempts: int = 4, backoff_base: float = 0.5, backoff_cap: float = 10.0,
                 tls_verify: bool = True, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.name = name
        self.kind = "swift"
        self.url = url or DEFAULT_URL
        self.username = username
        self._secret = token.reveal() if hasattr(token, "reveal") else token
        self.templates = {k: dict(v) for k, v in (templates or {}).items()}
        self.timeout = float(timeout)
        self.job_wait, self.poll_s = float(job_wait), float(poll_s)
        self.lookup_limit = int(lookup_limit)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.limiter = RateLimiter(rate_limit)
        self._sleep = sleep
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), transport=transport, verify=tls_verify,
                                  headers={"User-Agent": "tomd", "Accept": "application/json"},
                                  follow_redirects=False)
        # Told of every HTTP call, as LCOClient's: observer(facility, operation, code, seconds), code
        # the HTTP status or "timeout" / "error" (tomd.metrics.Metrics.observe_facility_call).
        self.observer: Observer | None = None

    @classmethod
    def from_config(cls, name: str, cfg: Any, **kw: Any) -> "SwiftClient":
        args = dict(url=cfg.url, username=getattr(cfg, "username", None), token=cfg.token, templates=cfg.templates,
                    timeout=cfg.timeout, rate_limit=cfg.rate_limit, job_wait=getattr(cfg, "job_wait", 60.0),
                    tls_verify=getattr(cfg, "tls_verify", True))
        args.update(kw)
        return cls(name, **args)

    # -- Facility protocol ----------------------------------------------------

    def sites(self) -> Sequence[Site]:
        return ()  # a satellite in low Earth orbit: no ground site for visibility

    def map_state(self, word: str) -> FacilityState:
        return map_state(word)

    def build_request(self, template: str | Mapping[str, Any], target: Any, intent: Intent) -> dict[str, Any]:
        fields, where = pick_template(self.name, self.templates, template)
        return build_too(fields, target, intent, template_name=where)

    def validate(self, request: Mapping[str, Any]) -> Validation:
        issues = check_too(request)
        if issues:
            return Validation(ok=False, issues=tuple(issues))
        st = self._job({**request, "validate_only": True}, safe=True, what="validation")
        word = str(st.get("status", ""))
        if word == "Rejected":
            self._raise_if_auth(st)
            return Validation(ok=False, issues=tuple(_issues(st)))
        if word in ("Queued", "Processing"):
            raise RetryableError(f"{self.name}: validation job {st.get('jobnumber')} not processed within "
                                 f"{self.job_wait:g}s")
        return Validation(ok=True)

    def submit(self, request: Mapping[str, Any]) -> Submitted:
        name = _name_from(request)
        st = self._job(dict(request), safe=False, what="submission")
        word = str(st.get("status", ""))
        if word == "Rejected":
            self._raise_if_auth(st)
            raise ValidationRejected(self.name, _issues(st))
        if word == "Accepted" and st.get("too_id") not in (None, ""):
            return Submitted(facility_id=str(st["too_id"]), state=map_state("Accepted"), name=name)
        raise AmbiguousError(f"{self.name}: TOO job {st.get('jobnumber', '?')} is {word or 'of unknown state'} "
                             f"after {self.job_wait:g}s; it will be looked up by name")

    def find_by_name(self, name: str) -> list[RequestStatus]:
        tag = name_tag(name)
        return [self._status(e) for e in self._entries({"detail": True, "limit": self.lookup_limit})
                if tag in str(e.get("immediate_objective") or "")]

    def statuses(self, facility_ids: Sequence[str], since: datetime | None = None) -> dict[str, RequestStatus]:
        """One look-up per TOO id (the API filters by one ``too_id``), rate-limited."""
        out: dict[str, RequestStatus] = {}
        for fid in sorted({str(i) for i in facility_ids}):
            if not fid.isdigit():
                continue
            for e in self._entries({"detail": True, "too_id": int(fid)}):
                if str(e.get("too_id")) == fid:
                    out[fid] = self._status(e)
        return out

    def cancel(self, facility_id: str) -> RequestStatus:
        raise PermanentError(f"{self.name}: the Swift TOO API cannot withdraw a request; write to the Swift team "
                             f"about TOO {facility_id}")

    def data_products(self, facility_id: str) -> list[DataProduct]:
        """Nothing: Swift data go to the quick-look site and HEASARC by observation id, outside this API."""
        return []

    def check(self) -> CheckReport:
        problems: list[str] = []
        if not self.username:
            problems.append(f"facilities.{self.name}.username: missing (the Swift TOO API user name)")
        if not self._secret:
            problems.append(f"facilities.{self.name}.token: missing (the TOO API shared secret)")
        for tname, t in sorted(self.templates.items()):
            for k in ("source_type", "obs_type", "science_just", "exp_time_just"):
                if not t.get(k):
                    problems.append(f"facilities.{self.name}.templates.{tname}: needs {k}")
        if not problems:
            try:
                self._entries({"limit": 1})
            except (PermanentError, RetryableError, NotFoundError) as exc:  # a 404: wrong URL
                problems.append(str(exc))
        return CheckReport(self.name, not problems, (), INSTRUMENTS, tuple(problems))

    def close(self) -> None:
        self._http.close()

    # -- API calls --------------------------------------------------------------

    def _job(self, data: Mapping[str, Any], *, safe: bool, what: str) -> dict[str, Any]:
        """Queue a Swift_TOO_Request and poll its job until it is decided or ``job_wait`` passes."""
        st = _status_of(self._call("Swift_TOO_Request", data, safe=safe))
        deadline = time.monotonic() + self.job_wait
        while str(st.get("status")) in ("Queued", "Processing") and st.get("jobnumber") is not None:
            if time.monotonic() >= deadline:
                return st
            self._sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
            try:
                polled = _status_of(self._call("Swift_TOO_Status", {"jobnumber": st["jobnumber"]}, safe=True))
            except RetryableError:
                if time.monotonic() >= deadline:
                    return st
                continue
            if polled.get("status"):
                st = {**st, **polled}
        if not st.get("status"):
            exc = AmbiguousError if not safe else RetryableError
            raise exc(f"{self.name}: the {what} answer carries no status")
        return st

    def _entries(self, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        body = self._call("Swift_TOO_Requests", query, safe=True)
        data = body.get("api_data", body) if isinstance(body, Mapping) else {}
        if not isinstance(data, Mapping):
            data = {}
        # A refusal comes back as a bare Swift_TOO_Status; a listing carries its status inside.
        st = _status_of(body) if isinstance(body, Mapping) and body.get("api_name") == "Swift_TOO_Status" else (
            _status_of(data["status"]) if isinstance(data.get("status"), Mapping) else {})
        if str(st.get("status")) == "Rejected":
            self._raise_if_auth(st)
            raise PermanentError(f"{self.name}: TOO listing rejected: {'; '.join(map(str, st.get('errors') or []))}")
        if not isinstance(data.get("entries"), list):
            # Never read "no entries" into an answer that is not a listing: the
            # ambiguity check would then resend a TOO that exists.
            raise RetryableError(f"{self.name}: the TOO listing answer has no entries list")
        out = []
        for e in data.get("entries") or []:
            if isinstance(e, Mapping):
                out.append(dict(e.get("api_data", e)))
        return out

    def _status(self, entry: Mapping[str, Any]) -> RequestStatus:
        obj = str(entry.get("immediate_objective") or "")
        m = re.search(r"\[tomd ([^\]]+)\]", obj)
        # ``timestamp`` is when the TOO was submitted, not when it last changed: no ``modified``
        # (``statuses`` answers for every id asked, whatever the poller's cursor).
        return RequestStatus(facility_id=str(entry.get("too_id")), name=m.group(1) if m else "",
                             state=entry_state(entry))

    def _raise_if_auth(self, st: Mapping[str, Any]) -> None:
        errors = " ".join(str(e) for e in st.get("errors") or [])
        if _AUTH_WORDS.search(errors):
            raise TokenRefused(f"{self.name} refused the credentials ({redact(errors)[:200]}): check "
                               f"facilities.{self.name}.username and token")

    def _call(self, api_name: str, data: Mapping[str, Any], *, safe: bool) -> Any:
        if not self.username or not self._secret:
            raise TokenRefused(f"{self.name}: no credentials: set facilities.{self.name}.username and token")
        token = encode_jwt({"api_name": api_name, "api_version": API_VERSION,
                            "api_data": {**data, "username": self.username}}, self._secret)
        what = f"{self.name}: {api_name} via POST {redact(urlsplit(self.url).path)}"
        operation = "validate" if data.get("validate_only") else API_OPERATIONS.get(api_name, "other")

        def answer(resp: httpx.Response) -> Any:
            status = resp.status_code
            if status >= 500:
                if not safe:
                    raise AmbiguousError(f"{what}: HTTP {status}; the TOO may exist")
                return RetryableError(f"{what}: HTTP {status}", retry_after=retry_after_s(resp))
            if status >= 300:
                raise PermanentError(f"{what}: HTTP {status}: {redact(resp.text[:300])}")
            try:
                return resp.json()
            except ValueError:
                # swifttools reads a non-JSON answer as a wrong shared secret; it may
                # also be a proxy's page. Either way nothing says whether a TOO exists.
                if not safe:
                    raise AmbiguousError(f"{what}: the answer is not JSON (check the shared secret)") from None
                return RetryableError(f"{what}: the answer is not JSON (check the shared secret)")

        return send(self, operation, lambda: self._http.post(self.url, data={"jwt": token}), what=what,
                    answer=answer, sent=None if safe else lambda exc: AmbiguousError(
                        f"{what}: {lost_words(exc)} after sending; the TOO may exist"),
                    refused=lambda status: TokenRefused(f"{self.name} refused the credentials (HTTP {status}): check "
                                                        f"facilities.{self.name}.username and token"),
                    sleep=self._sleep)


# The API calls as bounded metric labels (tomd_facility_requests_total{operation}).
API_OPERATIONS = {"Swift_TOO_Request": "submit", "Swift_TOO_Status": "job_status", "Swift_TOO_Requests": "list"}


def _issues(st: Mapping[str, Any]) -> list[ValidationIssue]:
    out = []
    for e in st.get("errors") or ["rejected without a reason"]:
        text = redact(str(e))
        m = re.match(r"^\s*([a-z_]+)\s*:\s*(.+)$", text)
        out.append(ValidationIssue(m.group(1), m.group(2)) if m and m.group(1) in _TEMPLATE_KEYS | {
            "source_name", "ra", "dec"} else ValidationIssue("", text))
    return out


def _name_from(request: Mapping[str, Any]) -> str:
    m = re.search(r"\[tomd ([^\]]+)\]", str(request.get("immediate_objective") or ""))
    return m.group(1) if m else ""
