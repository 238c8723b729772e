"""Frozen events: the contract between stages, hooks and metrics.

Each event has a ``kind`` (dotted name) and a ``version``; its payload is the
dataclass as JSON. A change that breaks a payload's shape bumps the version.
State changes write their event to the outbox table in the same transaction
(``tomd.db.repository.add_event``), so hooks and notifications never miss one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    version: ClassVar[int] = 1

    def payload(self) -> dict[str, Any]:
        # Shallow on purpose: fields are plain values, and asdict's deep copy
        # costs ~70 µs per event on the ingest path.
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TargetCreated(Event):
    kind: ClassVar[str] = "target.created"
    target_id: int
    name: str
    ra: float | None = None
    dec: float | None = None
    origin: str = ""  # "cli", "import:<file>", "alert:<source>", ...


@dataclass(frozen=True)
class TargetUpdated(Event):
    kind: ClassVar[str] = "target.updated"
    target_id: int
    name: str
    changes: dict[str, Any] = field(default_factory=dict)  # field → new value
    new_names: tuple[str, ...] = ()
    origin: str = ""


@dataclass(frozen=True)
class AlertIngested(Event):
    kind: ClassVar[str] = "alert.ingested"
    alert_id: int
    source: str
    key: str
    target_id: int | None
    object_id: str | None = None
    time: str = ""  # ISO UTC
    ra: float | None = None
    dec: float | None = None
    mag: float | None = None
    band: str | None = None
    coords: str | None = None  # topic[partition]@offset, or file


@dataclass(frozen=True)
class NoticeReceived(Event):
    """A localisation-only event (GRB, GW, neutrino) arrived or changed."""

    kind: ClassVar[str] = "notice.received"
    notice_id: int
    source: str
    event_id: str
    notice_type: str | None = None
    ra: float | None = None
    dec: float | None = None
    error_deg: float | None = None
    retracted: bool = False
    target_id: int | None = None


@dataclass(frozen=True)
class AlertDeadLettered(Event):
    kind: ClassVar[str] = "alert.dead_lettered"
    dead_letter_id: int
    stream: str
    coords: str | None
    error: str


EVENT_TYPES: dict[str, type[Event]] = {
    e.kind: e for e in (TargetCreated, TargetUpdated, AlertIngested, NoticeReceived, AlertDeadLettered)
}


@dataclass(frozen=True)
class DataStored(Event):
    """A file was stored and recorded as a data product (download, upload, skymap)."""

    kind: ClassVar[str] = "data.stored"
    data_product_id: int  # data_products.id
    facility: str  # facility name, "upload", or the notice source ("lvk", "gcn")
    product_id: str  # the facility's id, unique per facility
    product_kind: str  # image | spectroscopy | photometry | skymap
    filename: str
    storage_key: str
    size: int
    md5: str
    target_id: int | None = None
    request_id: int | None = None
    notice_id: int | None = None


EVENT_TYPES[DataStored.kind] = DataStored


# ------------------------------------------------------------ observations --


@dataclass(frozen=True)
class ObservationSubmitted(Event):
    """The facility accepted a request (or was found to hold it after an ambiguous failure)."""

    kind: ClassVar[str] = "observation.submitted"
    request_id: int
    name: str
    facility: str
    facility_id: str
    target_id: int | None = None
    decision_id: int | None = None
    facility_state: str = ""
    recovered: bool = False  # True: found by name after a timeout, not from the POST's answer


@dataclass(frozen=True)
class ObservationRejected(Event):
    """The facility refused the request (4xx): final, with its words."""

    kind: ClassVar[str] = "observation.rejected"
    request_id: int
    name: str
    facility: str
    reason: str
    target_id: int | None = None
    decision_id: int | None = None


@dataclass(frozen=True)
class ObservationFailed(Event):
    """tomd gave up on an intent (bad template, window over, retries exhausted)."""

    kind: ClassVar[str] = "observation.failed"
    request_id: int
    name: str
    facility: str
    reason: str
    attempts: int = 0
    target_id: int | None = None
    decision_id: int | None = None


@dataclass(frozen=True)
class ObservationCancelled(Event):
    kind: ClassVar[str] = "observation.cancelled"
    request_id: int
    name: str
    facility: str
    facility_id: str | None = None
    target_id: int | None = None


EVENT_TYPES.update({e.kind: e for e in (ObservationSubmitted, ObservationRejected, ObservationFailed,
                                        ObservationCancelled)})


# ------------------------------------------------------------------- rules --


@dataclass(frozen=True)
class RuleFired(Event):
    """An active rule fired on an alert (its actions follow). Notifications use ``channels``."""

    kind: ClassVar[str] = "rule.fired"
    decision_id: int
    rule: str
    alert_id: int | None
    target_id: int | None
    reason: str = ""
    channels: tuple[str, ...] = ()
    message: str = ""
    request_id: int | None = None
    tags_added: tuple[str, ...] = ()
    lists_joined: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubmissionIntent(Event):
    """A decision asks for an observation: the submitter claims ``request_id`` and sends it once."""

    kind: ClassVar[str] = "submission.intent"
    request_id: int
    decision_id: int
    name: str  # idempotency key sent to the facility
    rule: str
    target_id: int
    facility: str
    template: str | None
    mode: str | None
    priority: float | None
    window_start: str  # ISO UTC
    window_end: str
    estimated_hours: float | None = None


@dataclass(frozen=True)
class RequestPriorityRaised(Event):
    """A later decision wanted the same observation more urgently: the pending request's priority rose."""

    kind: ClassVar[str] = "submission.priority_raised"
    request_id: int
    decision_id: int
    rule: str
    old_priority: float | None
    new_priority: float
    state: str = ""


EVENT_TYPES.update({e.kind: e for e in (RuleFired, SubmissionIntent, RequestPriorityRaised)})


# ------------------------------------------------------------------ status --


@dataclass(frozen=True)
class ObservationStatusChanged(Event):
    """A poll found a request in a new state (or a new facility word for it).

    ``reopened``: the request left a final state again (LCO: COMPLETED goes
    back to PENDING when the data was bad), so it will be observed again.
    """

    kind: ClassVar[str] = "observation.status_changed"
    request_id: int
    name: str
    facility: str
    facility_id: str
    target_id: int | None
    old_state: str
    new_state: str
    facility_state: str = ""
    reopened: bool = False


EVENT_TYPES[ObservationStatusChanged.kind] = ObservationStatusChanged


# ------------------------------------------------------------ data retrieval --


@dataclass(frozen=True)
class DataRetrievalFailed(Event):
    """tomd gave up fetching a request's data after its attempts (each product stored stays stored).

    ``missing``: products listed at the archive but not stored (0 when the
    archive never listed any, or could not be reached); ``error``: the last
    failure, in the facility's or the network's words.
    """

    kind: ClassVar[str] = "data.retrieval_failed"
    request_id: int
    facility: str
    facility_id: str
    target_id: int | None
    attempts: int
    stored: int
    missing: int
    error: str = ""


EVENT_TYPES[DataRetrievalFailed.kind] = DataRetrievalFailed


# ------------------------------------------------------------------- hooks --


@dataclass(frozen=True)
class HookRegistered(Event):
    """A daemon saw a hook for the first time: the hook gets the events after this one (unless since="all")."""

    kind: ClassVar[str] = "hook.registered"
    hook: str
    kinds: tuple[str, ...]
    where: str = ""  # FILE:LINE, or "<builtin>"


@dataclass(frozen=True)
class HookFailed(Event):
    """A hook gave up on an event after its last attempt (the traceback is in hook_runs.error)."""

    kind: ClassVar[str] = "hook.failed"
    hook: str
    event_id: int  # the outbox event the hook failed on
    event_kind: str
    attempts: int
    error: str  # the last line of the traceback
    target_id: int | None = None


EVENT_TYPES.update({e.kind: e for e in (HookRegistered, HookFailed)})


@dataclass(frozen=True)
class CadenceStep(Event):
    """A cadence series made its next request (a repeat, or a retry with a shifted window)."""

    kind: ClassVar[str] = "observation.cadence_step"
    request_id: int  # the new intent
    name: str
    series_id: int  # the series' first request
    previous_id: int  # the request whose end made this one
    target_id: int | None
    facility: str
    reason: str  # "repeat 2 of 5", "retry 1 of 3 after expired", ...
    window_start: str  # ISO UTC
    window_end: str


EVENT_TYPES[CadenceStep.kind] = CadenceStep


@dataclass(frozen=True)
class RuleTested(Event):
    """A test-mode rule would have fired: what it would have done (``would``), nothing done.

    The fields of ``rule.fired`` (notifications go to ``channels`` like a real
    firing, marked as a test) plus the plan: ``would`` = {"observe": {...} or
    None, "notify": [...], "add_tags": [...], "add_to_lists": [...]}.
    """

    kind: ClassVar[str] = "rule.tested"
    decision_id: int
    rule: str
    alert_id: int | None
    target_id: int | None
    reason: str = ""
    channels: tuple[str, ...] = ()
    message: str = ""
    request_id: int | None = None  # always None: nothing is requested
    tags_added: tuple[str, ...] = ()  # always empty: see would["add_tags"]
    lists_joined: tuple[str, ...] = ()
    would: dict[str, Any] = field(default_factory=dict)
    test: bool = True


EVENT_TYPES[RuleTested.kind] = RuleTested
