"""Gemini Observatory ToO trigger client (the ``/too`` URL interface), over httpx.

The interface (Gemini's "URL-based submission of ToO triggers", documented in
``urltoo_readme.txt`` of bryanmiller/gsselect and in TOM Toolkit's Gemini
facility) is one call: ``POST https://gsodb.gemini.edu:8443/too`` (Gemini
South; ``gnodb`` for North) with form fields

    prog, email, password        program id; the OT user key's e-mail and password
    obsnum                       the template observation (On Hold) to clone
    target, ra, dec              name, 'HH:MM:SS.SS', 'DD:MM:SS.SSS' (J2000)
    mags                         optional "value/band/system[,...]"
    noteTitle, note              optional note on the new observation
    posangle, exptime, group     optional (exptime: integer 1..1200 s)
    gstarget gsra gsdec gsmags gsprobe   optional guide star (gsra, gsdec, gsprobe together)
    ready                        "true" marks it Prepared/Ready (the trigger), "false" keeps it On Hold
    windowDate windowTime windowDuration   timing window: UTC date, UTC HH:MM, integer hours
    elevationType elevationMin elevationMax  "none" | "hourAngle" | "airmass"

The server clones the template, fills it in, and answers ``200`` with the new
observation's id as plain text (``GS-2026A-Q-101-15``); a bad request is
``400`` with a message ("guide star not completely specified", the name of a
missing parameter, ...).

What the interface does not have, and what tomd does about it:

- **No validation call.** ``validate`` checks the trigger locally against the
  documented rules (formats, ranges, guide-star completeness, window and
  elevation fields); the server's 400 remains the last word.
- **No look-up, no status, no cancel, no data listing.** Nothing can ask
  Gemini whether a trigger exists. So a POST whose outcome is unknown (timeout
  or reset after sending, a 5xx, a 200 that is not an observation id) is
  *never resent*: ``submit`` raises ``OutcomeUnknown`` (a ``PermanentError``),
  the submitter records the intent as rejected with that reason, and a person
  checks the program in the OT, where the new observation's note carries the
  idempotency key (``tomd <name>``). Exactly-once holds because tomd never
  sends twice; the price is a human look after an unknown outcome.
  ``find_by_name`` raises ``LookupUnsupported`` (an intent left "submitting"
  by a crash mid-POST therefore stays there, never resent, for a person).
  ``statuses`` knows nothing (returns ``{}``: the requests stay pending in
  tomd), ``cancel`` refuses, ``data_products`` is empty.
- What is certainly not sent (connect failure, 429) is retried as usual.

The password is added at send time only: the stored request document never
holds it, and it goes in the form body, never in the URL (URLs end up in logs).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx

from tomd.errors import PermanentError
from tomd.facilities.base import (
    CheckReport,
    DataProduct,
    FacilityState,
    Intent,
    LookupUnsupported,
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
from tomd.facilities.http import Observer, RateLimiter, lost_words, scrub, send

log = logging.getLogger(__name__)

GEMINI_SITES: dict[str, Site] = {
    "GN": Site("mko", "Gemini North, Maunakea", 19.8238, -155.46905, 4213.0),
    "GS": Site("cpo", "Gemini South, Cerro Pachon", -30.24075, -70.736694, 2722.0),
}
DEFAULT_URLS = {"GN": "https://gnodb.gemini.edu:8443", "GS": "https://gsodb.gemini.edu:8443"}

# Gemini's observation status words (the OT's) → tomd's common states. The
# trigger interface only ever tells us READY (ready=true) or ON_HOLD.
GEMINI_STATES: dict[str, str] = {
    "PHASE2": "pending", "FOR_REVIEW": "pending", "IN_REVIEW": "pending", "FOR_ACTIVATION": "pending",
    "ON_HOLD": "pending", "READY": "pending", "ONGOING": "in_progress", "OBSERVED": "completed",
    "INACTIVE": "cancelled",
}

PROGRAM_RE = re.compile(r"^(G[NS])-\d{4}[AB]-[A-Z]+-\d+$")
OBSID_RE = re.compile(r"^G[NS]-\d{4}[AB]-[A-Z]+-\d+-\d+$")
MAG_BANDS = ("u", "U", "B", "g", "V", "UC", "r", "R", "i", "I", "z", "Y", "J", "H", "K", "L", "M", "N", "Q", "AP")
MAG_SYSTEMS = ("Vega", "AB", "Jy")
PROBES = ("PWFS1", "PWFS2", "OIWFS", "AOWFS")
GS_FIELDS = ("gstarget", "gsra", "gsdec", "gsmags", "gsprobe")
FORM_FIELDS = ("prog", "obsnum", "target", "ra", "dec", "mags", "noteTitle", "note", "posangle", "exptime", "group",
               *GS_FIELDS, "ready", "windowDate", "windowTime", "windowDuration", "elevationType", "elevationMin",
               "elevationMax")
_TEMPLATE_KEYS = {
    "program", "obsnum", "exptime", "posangle", "group", "note", "mags", "ready", "window", "elevation_type",
    "elevation_min", "elevation_max", "max_airmass", *GS_FIELDS,
}
_SEXA_RE = re.compile(r"^([+-]?)(\d{1,3}):(\d{1,2}):(\d{1,2}(?:\.\d*)?)$")


class OutcomeUnknown(PermanentError):
    """A trigger may have been created, and Gemini cannot be asked: not resent, a person checks."""


def map_state(word: str) -> FacilityState:
    return FacilityState(GEMINI_STATES.get(word.upper(), "pending"), word)


def program_site(program: str) -> str | None:
    m = PROGRAM_RE.match(program or "")
    return m.group(1) if m else None


# -------------------------------------------------------- request building --


def ra_hms(ra_deg: float) -> str:
    """Degrees → 'HH:MM:SS.SS' (rounded in centiseconds, so never ':60.00')."""
    cs = round((float(ra_deg) % 360.0) / 15.0 * 360000.0) % (24 * 360000)
    h, rem = divmod(cs, 360000)
    m, cs = divmod(rem, 6000)
    return f"{h:02d}:{m:02d}:{cs // 100:02d}.{cs % 100:02d}"


def dec_dms(dec_deg: float) -> str:
    """Degrees → '+DD:MM:SS.SSS' (rounded in milliarcseconds)."""
    sign = "-" if dec_deg < 0 else "+"
    mas = round(abs(float(dec_deg)) * 3_600_000.0)
    d, rem = divmod(mas, 3_600_000)
    m, mas = divmod(rem, 60_000)
    return f"{sign}{d:02d}:{m:02d}:{mas // 1000:02d}.{mas % 1000:03d}"


def _duration_s(v: Any, where: str) -> float:
    from tomd.config import _Invalid, parse_duration

    try:
        return parse_duration(v)
    except _Invalid as exc:
        raise TemplateError(f"{where}: {exc}") from None


def key_note(name: str) -> str:
    """The note title that carries the idempotency key, for a person searching the OT."""
    return f"tomd {name}"


def build_trigger(template: Mapping[str, Any], target: Any, intent: Intent, *, default_program: str | None = None,
                  template_name: str = "template", now: datetime | None = None) -> dict[str, Any]:
    """The trigger's form fields (without email and password) for ``target``. Pure: no I/O.

    The template names the template observation (``obsnum``) and defaults; the
    intent's window (else the template's ``window`` duration, default 24 h
    from ``now``) becomes the timing window. The idempotency key goes in the
    note title and first note line. Gemini has no per-trigger mode: Standard
    or Rapid Response is a property of the template observation's program, so
    use one template per kind.
    """
    where = template_name if "." in template_name else f"templates.{template_name}"
    unknown = sorted(set(template) - _TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(_TEMPLATE_KEYS))}")
    program = template.get("program") or default_program
    if not program:
        raise TemplateError(f"{where}: needs program (or the facility's proposal)")
    if program_site(str(program)) is None:
        raise TemplateError(f"{where}: program {program!r} is not a Gemini program id like GS-2026A-Q-101")
    obsnum = template.get("obsnum")
    if isinstance(obsnum, bool) or not isinstance(obsnum, (int, str)) or not str(obsnum).strip().isdigit():
        raise TemplateError(f"{where}: needs obsnum, the number of the On Hold template observation (e.g. 12)")
    name = getattr(target, "name", None) or "target"
    ra, dec = getattr(target, "ra", None), getattr(target, "dec", None)
    if ra is None or dec is None:
        raise TemplateError(f"target {name}: Gemini ToO triggers need ra/dec (no orbital elements)")
    note = f"tomd request {intent.name}"
    if template.get("note"):
        note += "\n" + str(template["note"])
    doc: dict[str, Any] = {
        "prog": str(program), "obsnum": str(int(obsnum)), "target": str(name), "ra": ra_hms(ra), "dec": dec_dms(dec),
        "noteTitle": key_note(intent.name), "note": note,
        "posangle": str(template.get("posangle", 0)),
        "ready": "true" if template.get("ready", True) else "false",
    }
    for ours, theirs in (("exptime", "exptime"), ("group", "group"), ("mags", "mags"), *((g, g) for g in GS_FIELDS)):
        if template.get(ours) not in (None, ""):
            v = template[ours]
            doc[theirs] = str(int(v)) if ours == "exptime" and isinstance(v, (int, float)) else str(v)
    now = now or datetime.now(timezone.utc)
    start = (intent.window_start or now).astimezone(timezone.utc)
    end = intent.window_end or (start + timedelta(seconds=_duration_s(template.get("window", "24h"), f"{where}.window")))
    # The interface takes the start to the minute and the length in whole hours.
    doc["windowDate"] = start.strftime("%Y-%m-%d")
    doc["windowTime"] = start.strftime("%H:%M")
    doc["windowDuration"] = str(max(1, math.ceil((end - start).total_seconds() / 3600.0 - 1e-6)))
    if "max_airmass" in template:
        doc.update(elevationType="airmass", elevationMin="1.0", elevationMax=str(template["max_airmass"]))
    if "elevation_type" in template:
        doc["elevationType"] = str(template["elevation_type"])
        for ours, theirs in (("elevation_min", "elevationMin"), ("elevation_max", "elevationMax")):
            if ours in template:
                doc[theirs] = str(template[ours])
    return doc


def _sexa(value: str, hi: float) -> bool:
    """A sexagesimal RA (``hi`` 24) or Dec (``hi`` 90), or decimal degrees, within range."""
    m = _SEXA_RE.match(str(value).strip())
    if not m:
        try:
            v = float(value)
        except ValueError:
            return False
        return 0.0 <= v < 360.0 if hi == 24 else -90.0 <= v <= 90.0
    if hi == 24 and m.group(1) == "-":
        return False
    a, b, c = int(m.group(2)), int(m.group(3)), float(m.group(4))
    return b < 60 and c < 60 and a + b / 60 + c / 3600 <= hi


def check_trigger(doc: Mapping[str, Any]) -> list[ValidationIssue]:
    """The documented rules of the ToO interface, checked before anything is sent."""
    issues: list[ValidationIssue] = []

    def bad(path: str, msg: str) -> None:
        issues.append(ValidationIssue(path, msg))

    unknown = sorted(set(doc) - set(FORM_FIELDS))
    for k in unknown:
        bad(k, "not a parameter of the ToO trigger interface")
    if program_site(str(doc.get("prog", ""))) is None:
        bad("prog", "expected a Gemini program id like GS-2026A-Q-101")
    if not str(doc.get("obsnum", "")).isdigit():
        bad("obsnum", "expected the number of the template observation")
    for k in ("target", "ra", "dec"):
        if not str(doc.get(k, "")).strip():
            bad(k, "missing")
    if doc.get("ra") and not _sexa(doc["ra"], 24):
        bad("ra", f"cannot parse {doc['ra']!r}; expected HH:MM:SS.SS")
    if doc.get("dec") and not _sexa(doc["dec"], 90):
        bad("dec", f"cannot parse {doc['dec']!r}; expected DD:MM:SS.SSS")
    if "exptime" in doc:
        try:
            e = float(doc["exptime"])
            if e != int(e) or not 1 <= e <= 1200:
                bad("exptime", "expected an integer number of seconds from 1 to 1200")
        except (TypeError, ValueError):
            bad("exptime", "expected an integer number of seconds from 1 to 1200")
    if "posangle" in doc:
        try:
            if not -360.0 <= float(doc["posangle"]) <= 360.0:
                bad("posangle", "expected degrees E of N, -360 to 360")
        except (TypeError, ValueError):
            bad("posangle", "expected a number of degrees")
    for field in ("mags", "gsmags"):
        if doc.get(field):
            for part in str(doc[field]).split(","):
                bits = part.strip().split("/")
                if len(bits) != 3:
                    bad(field, f"{part.strip()!r}: expected value/band/system, e.g. 18.5/r/AB")
                    continue
                try:
                    float(bits[0])
                except ValueError:
                    bad(field, f"{part.strip()!r}: magnitude {bits[0]!r} is not a number")
                if bits[1] not in MAG_BANDS:
                    bad(field, f"{part.strip()!r}: band {bits[1]!r}; expected one of {', '.join(MAG_BANDS)}")
                if bits[2] not in MAG_SYSTEMS:
                    bad(field, f"{part.strip()!r}: system {bits[2]!r}; expected Vega, AB or Jy")
    if any(doc.get(k) for k in GS_FIELDS):
        if not all(doc.get(k) for k in ("gsra", "gsdec", "gsprobe")):
            bad("gsprobe" if doc.get("gsra") and doc.get("gsdec") else "gsra", "guide star not completely specified")
        if doc.get("gsprobe") and doc["gsprobe"] not in PROBES:
            bad("gsprobe", f"{doc['gsprobe']!r}; expected one of {', '.join(PROBES)}")
        if doc.get("gsra") and not _sexa(doc["gsra"], 24):
            bad("gsra", f"cannot parse {doc['gsra']!r}")
        if doc.get("gsdec") and not _sexa(doc["gsdec"], 90):
            bad("gsdec", f"cannot parse {doc['gsdec']!r}")
    if doc.get("ready", "true") not in ("true", "false"):
        bad("ready", "expected true or false")
    window = [k for k in ("windowDate", "windowTime", "windowDuration") if doc.get(k) not in (None, "")]
    if window and len(window) < 3:
        bad("windowDate", "windowDate, windowTime and windowDuration go together")
    elif window:
        try:
            datetime.strptime(f"{doc['windowDate']} {doc['windowTime']}", "%Y-%m-%d %H:%M")
        except ValueError:
            bad("windowDate", "expected windowDate YYYY-MM-DD and windowTime HH:MM (UTC)")
        if not str(doc["windowDuration"]).isdigit() or int(doc["windowDuration"]) < 1:
            bad("windowDuration", "expected a whole number of hours, at least 1")
    etype = doc.get("elevationType")
    if etype not in (None, "", "none"):
        if etype not in ("airmass", "hourAngle"):
            bad("elevationType", f"{etype!r}; expected none, hourAngle or airmass")
        else:
            try:
                lo, hi = float(doc.get("elevationMin", "nan")), float(doc.get("elevationMax", "nan"))
            except (TypeError, ValueError):
                lo = hi = float("nan")
            if math.isnan(lo) or math.isnan(hi):
                bad("elevationMin", f"{etype} needs numeric elevationMin and elevationMax")
            elif etype == "airmass" and not 1.0 <= lo < hi <= 2.5:
                bad("elevationMax", f"airmass limits {lo:g}..{hi:g}; expected 1.0 <= min < max <= 2.5")
            elif etype == "hourAngle" and not -5.0 <= lo < hi <= 5.0:
                bad("elevationMax", f"hour angle limits {lo:g}..{hi:g}; expected -5 <= min < max <= 5")
    return issues


def _message(resp: httpx.Response, secret: str | None) -> str:
    """The server's words: plain text, or the title/pre of a servlet container's HTML error page
    (never the password, should the server quote it)."""
    text = resp.text or ""
    if "<" in text and ">" in text:
        m = re.search(r"<(?:pre|title)>(.*?)</(?:pre|title)>", text, re.S | re.I)
        text = m.group(1) if m else re.sub(r"<[^>]+>", " ", text)
        text = re.sub(r"^\s*Error \d+\s*", "", text)
    return scrub(" ".join(text.split()), secret)[:500]


_AUTH_WORDS = re.compile(r"(?i)password|user ?key|not authori[sz]ed|authenticat|credential|permission")


# ------------------------------------------------------------------ client --


class GeminiClient:
    """The Gemini ToO trigger interface as a ``Facility`` (one program's site)."""

    def __init__(self, name: str, *, url: str | None = None, email: str | None = None, token: Any = None,
                 proposal: str | None = None, templates: Mapping[str, Mapping[str, Any]] | None = None,
                 timeout: float = 30.0, rate_limit: float = 1.0, max_attempts: int = 4,
                 backoff_base: float = 0.5, backoff_cap: float = 10.0, tls_verify: bool = True,
                 transport: httpx.BaseTransport | None = None):
        self.name = name
        self.kind = "gemini"
        self.program = proposal
        site = program_site(proposal or "")
        self.base = (url or DEFAULT_URLS.get(site or "", "")).rstrip("/")
        if not self.base:
            raise TemplateError(f"facilities.{name}: needs url (or a GN-/GS- program in proposal)")
        self.email = email
        self._secret = token.reveal() if hasattr(token, "reveal") else token
        self.templates = {k: dict(v) for k, v in (templates or {}).items()}
        self.timeout = float(timeout)
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.limiter = RateLimiter(rate_limit)
        self._site = site
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), transport=transport, verify=tls_verify,
                                  headers={"User-Agent": "tomd", "Accept": "text/plain"}, follow_redirects=False)
        # Told of every HTTP call, as LCOClient's: observer(facility, operation, code, seconds), code
        # the HTTP status or "timeout" / "error" (tomd.metrics.Metrics.observe_facility_call).
        self.observer: Observer | None = None

    @classmethod
    def from_config(cls, name: str, cfg: Any, **kw: Any) -> "GeminiClient":
        args = dict(url=cfg.url, email=getattr(cfg, "email", None), token=cfg.token, proposal=cfg.proposal,
                    templates=cfg.templates, timeout=cfg.timeout, rate_limit=cfg.rate_limit,
                    tls_verify=getattr(cfg, "tls_verify", True))
        args.update(kw)
        return cls(name, **args)

    # -- Facility protocol ----------------------------------------------------

    def sites(self) -> Sequence[Site]:
        if self._site:
            return (GEMINI_SITES[self._site],)
        return tuple(GEMINI_SITES.values())

    def map_state(self, word: str) -> FacilityState:
        return map_state(word)

    def build_request(self, template: str | Mapping[str, Any], target: Any, intent: Intent) -> dict[str, Any]:
        fields, where = pick_template(self.name, self.templates, template)
        return build_trigger(fields, target, intent, default_program=self.program, template_name=where)

    def validate(self, request: Mapping[str, Any]) -> Validation:
        """Local checks only: the interface has no validation call."""
        issues = check_trigger(request)
        site = program_site(str(request.get("prog", "")))
        if site and self._site and site != self._site:
            issues.append(ValidationIssue("prog", f"a {site} program, but this facility triggers {self._site}"))
        return Validation(ok=not issues, issues=tuple(issues))

    def submit(self, request: Mapping[str, Any]) -> Submitted:
        """POST the trigger once. Unknown outcomes raise ``OutcomeUnknown`` and are never resent."""
        if not self.email or not self._secret:
            raise TokenRefused(f"{self.name}: no user key configured: set facilities.{self.name}.email and token")
        name = str(request.get("noteTitle", "")).removeprefix("tomd ")
        form = {k: str(v) for k, v in request.items()}
        form.update(email=self.email, password=self._secret)
        resp = self._post(form, name)
        body = (resp.text or "").strip()
        if not OBSID_RE.match(body):
            raise OutcomeUnknown(self._unknown(name, f"HTTP {resp.status_code} without an observation id "
                                                     f"({_message(resp, self._secret)[:100]!r})"))
        word = "READY" if form.get("ready", "true") == "true" else "ON_HOLD"
        return Submitted(facility_id=body, state=map_state(word), name=name)

    def find_by_name(self, name: str) -> list[RequestStatus]:
        raise LookupUnsupported(
            f"{self.name}: the Gemini ToO interface cannot look a trigger up; not resent. Check program "
            f"{self.program or '?'} in the OT for an observation whose note is titled {key_note(name)!r}")

    def statuses(self, facility_ids: Sequence[str], since: datetime | None = None) -> dict[str, RequestStatus]:
        """Nothing: the ToO interface reports no status (ids left out = unknown)."""
        return {}

    def cancel(self, facility_id: str) -> RequestStatus:
        raise PermanentError(f"{self.name}: the Gemini ToO interface cannot cancel; set observation "
                             f"{facility_id} to Inactive in the OT or write to the contact scientist")

    def data_products(self, facility_id: str) -> list[DataProduct]:
        """Nothing: data come through the Gemini Observatory Archive, outside this interface."""
        return []

    def check(self) -> CheckReport:
        """Configuration only: the interface has no call that tests the key without triggering."""
        problems: list[str] = []
        if not self.email:
            problems.append(f"facilities.{self.name}.email: missing (the OT user key's e-mail)")
        if not self._secret:
            problems.append(f"facilities.{self.name}.token: missing (the user key's password)")
        if not self.program:
            problems.append(f"facilities.{self.name}.proposal: missing (the Gemini program id)")
        elif not self._site:
            problems.append(f"facilities.{self.name}.proposal: {self.program!r} is not a Gemini program id")
        for tname, t in sorted(self.templates.items()):
            if not str(t.get("obsnum", "")).isdigit():
                problems.append(f"facilities.{self.name}.templates.{tname}: needs obsnum")
            p = t.get("program")
            if p and self._site and program_site(str(p)) != self._site:
                problems.append(f"facilities.{self.name}.templates.{tname}: program {p} is not at {self._site}")
        return CheckReport(self.name, not problems, (self.program,) if self.program else (), (), tuple(problems))

    def close(self) -> None:
        self._http.close()

    # -- HTTP -----------------------------------------------------------------

    def _unknown(self, name: str, what: str) -> str:
        return (f"{self.name}: outcome unknown ({what}); the ToO interface cannot be asked, so it is not resent. "
                f"Check program {self.program or '?'} in the OT for a note titled {key_note(name)!r}")

    def _post(self, form: Mapping[str, str], name: str) -> httpx.Response:
        """The trigger, sent once: only what certainly never reached the server (connect failure, 429) is retried."""
        url = self.base + "/too"

        def answer(resp: httpx.Response) -> httpx.Response:
            status = resp.status_code
            if status < 300:
                return resp
            if status >= 500:
                raise OutcomeUnknown(self._unknown(name, f"HTTP {status}"))
            msg = _message(resp, self._secret) or f"HTTP {status}"
            if _AUTH_WORDS.search(msg):
                raise TokenRefused(f"{self.name} refused the user key (HTTP {status}: {msg})")
            raise ValidationRejected(self.name, [ValidationIssue(_field_of(msg), msg)], status)

        return send(self, "submit", lambda: self._http.post(url, data=form),
                    what=f"{self.name}: POST {urlsplit(url).path}", answer=answer,
                    sent=lambda exc: OutcomeUnknown(
                        self._unknown(name, lost_words(exc, "connection lost after sending"))),
                    refused=lambda status: TokenRefused(f"{self.name} refused the user key (HTTP {status}): check "
                                                        f"facilities.{self.name}.email and token"))


def _field_of(msg: str) -> str:
    """The form field a 400 message names, if any ("missing parameter: ra" → "ra")."""
    for f in sorted(FORM_FIELDS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z]){re.escape(f)}(?![A-Za-z])", msg):
            return f
    return ""
