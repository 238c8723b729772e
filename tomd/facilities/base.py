"""The facility interface: what tomd needs from an observatory.

One ``Facility`` per configured ``[facilities.NAME]``; the LCO/SOAR portal
client (``tomd.facilities.lco``) implements it, and the simulated observatory
(``tomd.facilities.sim``) speaks the same HTTP API so the same client drives
it in tests and demos.

Every facility maps its own state words onto tomd's common states and keeps
its own word beside it (``FacilityState``), so history and messages can quote
the facility exactly.

Errors follow ``tomd.errors``::

    RetryableError        try later (429 with retry_after, 5xx on a safe call, connect failure)
    └── AmbiguousError    a submission may or may not have happened: look it up by name first
    PermanentError
    ├── TokenRefused      401/403: the API token is wrong or lacks rights
    ├── ValidationRejected the facility refused the request; ``issues`` in its own words
    └── TemplateError     the configured template cannot make a request
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

from tomd.errors import PermanentError

CommonState = Literal["pending", "scheduled", "in_progress", "completed", "failed", "expired", "cancelled"]
COMMON_STATES: tuple[str, ...] = (
    "pending", "scheduled", "in_progress", "completed", "failed", "expired", "cancelled",
)
# States after which a facility will not observe the request again by itself
# (LCO: a COMPLETED request can go back to PENDING when its data is bad, so
# "completed" is final only until the next poll says otherwise).
FINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})


# ------------------------------------------------------------------ errors --


class TokenRefused(PermanentError):
    """The facility refused the API token (401/403). Never carries the token."""


@dataclass(frozen=True)
class ValidationIssue:
    """One problem, at a field path like ``requests[0].configurations[0].target.ra``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ValidationRejected(PermanentError):
    """The facility rejected the request (HTTP 400); ``issues`` in its own words."""

    def __init__(self, facility: str, issues: Sequence[ValidationIssue], status: int = 400):
        self.facility = facility
        self.issues = tuple(issues)
        self.status = status
        text = "; ".join(str(i) for i in self.issues) or "rejected without a reason"
        super().__init__(f"{facility} rejected the request: {text}")


class TemplateError(PermanentError):
    """A configured template cannot make a request (missing or bad key)."""


def pick_template(facility: str, templates: Mapping[str, Mapping[str, Any]],
                  template: str | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """A request's template and the name its errors give it: an inline template's own fields
    ("inline template"), or a configured one by name (``facilities.NAME.templates.T``). An
    unknown name is a ``TemplateError`` that lists the known ones."""
    if isinstance(template, Mapping):
        return template, "inline template"
    if template not in templates:
        known = ", ".join(sorted(templates)) or "none configured"
        raise TemplateError(f"facilities.{facility}.templates: no template {template!r} (known: {known})")
    return templates[template], f"facilities.{facility}.templates.{template}"


class LookupUnsupported(PermanentError):
    """The facility cannot be asked whether a request exists (Gemini's ToO trigger API).

    After an unknown outcome such a request is never resent: it ends for a person to check.
    """


# ----------------------------------------------------------------- results --


@dataclass(frozen=True)
class Site:
    """Where a facility observes from, for visibility computations."""

    code: str
    name: str
    lat: float  # degrees, north positive
    lon: float  # degrees, east positive
    elevation: float  # metres


@dataclass(frozen=True)
class FacilityState:
    """A facility's state word and the common state it means."""

    common: str  # one of COMMON_STATES
    word: str  # the facility's own word, e.g. "WINDOW_EXPIRED"


@dataclass(frozen=True)
class Validation:
    """What the facility said about a request before submission."""

    ok: bool
    issues: tuple[ValidationIssue, ...] = ()
    duration_s: float | None = None  # the facility's estimate of the time it takes


@dataclass(frozen=True)
class Submitted:
    facility_id: str
    state: FacilityState
    name: str


@dataclass(frozen=True)
class RequestStatus:
    """One request group at the facility."""

    facility_id: str
    name: str
    state: FacilityState
    modified: str | None = None  # ISO time of the facility's last change, when given
    request_ids: tuple[str, ...] = ()  # the facility's inner request ids (LCO: requests[].id)
    # Inner requests already COMPLETED while the group goes on: their data are due now.
    completed_request_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataProduct:
    product_id: str
    filename: str
    url: str
    md5: str | None = None
    size: int | None = None
    kind: str = "image"
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Intent:
    """What a decision (or a person) asks for, beside the target and the template."""

    name: str  # the idempotency key, sent as the request group's name
    mode: str | None = None  # NORMAL | RAPID_RESPONSE | TIME_CRITICAL
    priority: float | None = None  # LCO: the IPP value
    window_start: datetime | None = None
    window_end: datetime | None = None


@dataclass(frozen=True)
class CheckReport:
    """``tomd facility check``: is the token good, what can it use."""

    facility: str
    ok: bool
    proposals: tuple[str, ...] = ()
    instruments: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


# --------------------------------------------------------------- protocol --


@runtime_checkable
class Facility(Protocol):
    """An observatory tomd can submit to. All calls are bounded in time."""

    name: str

    def sites(self) -> Sequence[Site]: ...

    def map_state(self, word: str) -> FacilityState: ...

    def build_request(self, template: str | Mapping[str, Any], target: Any, intent: Intent) -> dict[str, Any]:
        """The facility's request document for ``target`` (an ORM Target or alike), from a
        configured template's name or an inline template's fields."""

    def validate(self, request: Mapping[str, Any]) -> Validation: ...

    def submit(self, request: Mapping[str, Any]) -> Submitted:
        """Raises ValidationRejected, TokenRefused, RetryableError or AmbiguousError."""

    def find_by_name(self, name: str) -> list[RequestStatus]:
        """Request groups whose name is exactly ``name`` (the ambiguity check)."""

    def statuses(self, facility_ids: Sequence[str], since: datetime | None = None) -> dict[str, RequestStatus]:
        """Status of many request groups at once; unknown (or, with ``since``, unchanged) ids are left out."""

    def cancel(self, facility_id: str) -> RequestStatus: ...

    def data_products(self, facility_id: str) -> list[DataProduct]: ...

    def check(self) -> CheckReport: ...

    def close(self) -> None: ...
