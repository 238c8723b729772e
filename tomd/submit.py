"""Exactly-once submission: a decision becomes at most one observation request.

An intent is a row of ``observation_requests`` in state ``intent`` whose
unique ``name`` is the idempotency key, sent as the request group's name.
The ``Submitter`` moves each intent through::

    intent ──claim──► (build, validate) ──► submitting ──POST──► pending (…the status stage takes over)
       │                    │                    │  └─ 4xx ──────► rejected   (final, the facility's words)
       │                    └─ bad template, window over ─────► failed     (final, tomd's words)
       └─ not sent (connect error, 429): back to intent, backoff
                                 submitting ── timeout / reset / 5xx after sending: unknown outcome ──►
                                 wait, then look the name up at the facility *before any retry*:
                                 found → pending (recovered); absent → POST again (bounded attempts)

- One worker owns an intent at a time: a claim (``claimed_by`` /
  ``claimed_until``) taken with ``SELECT … FOR UPDATE SKIP LOCKED`` on
  PostgreSQL (``BEGIN IMMEDIATE`` on SQLite) in a short transaction; network
  calls happen outside any transaction, and every later write is fenced on
  ``claimed_by`` so a worker whose lease ran out cannot overwrite a successor.
- ``submitting`` is committed *before* the POST, so a crash mid-POST leaves
  a row whose next owner looks the name up first.
- State, status history and outbox event commit in one transaction.
- Retries back off exponentially with full jitter; each facility client
  holds its own rate limit (``tomd.facilities.lco.RateLimiter``).
- ``run()`` gives each configured facility a lane (thread) of its own: a
  slow facility delays only its own intents. ``Submitter.wake()`` starts a
  sweep in every lane at once (call it after committing a decision);
  otherwise each lane sweeps every ``sweep_interval_s`` and when its
  earliest backed-off intent becomes due.

The lease must outlast one attempt (validate + POST, each bounded by the
facility's timeout and retries: about 4 min at the 30 s default timeout);
``SubmitSettings.lease_s`` defaults to 10 minutes.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tomd.db import repository as repo
from tomd.errors import AmbiguousError, NotFoundError, PermanentError, RetryableError, TomdError
from tomd.events import ObservationFailed, ObservationRejected, ObservationSubmitted
from tomd.facilities.base import (Facility, Intent, LookupUnsupported, TemplateError, TokenRefused,
                                  ValidationRejected)
from tomd.logs import FailureLog, request_fields

log = logging.getLogger(__name__)

# Starts the reason of a request whose submission outcome is unknown and cannot be looked up
# (rejected for a person): `tomd obs settle` recognises it by these words.
UNKNOWN_OUTCOME = "outcome unknown"


@dataclass(frozen=True)
class SubmitSettings:
    lease_s: float = 600.0  # a claim's life; must outlast one attempt (validate + POST, retries included)
    max_attempts: int = 6  # POSTs per intent before giving up (lookups do not count)
    backoff_base_s: float = 5.0
    backoff_cap_s: float = 900.0
    settle_s: float = 10.0  # after an ambiguous failure: wait this long before looking the name up
    token_backoff_s: float = 600.0  # after the token was refused: the intent waits, the token may be fixed
    batch: int = 20  # intents claimed per sweep
    sweep_interval_s: float = 30.0
    validate: bool = True  # ask the facility to validate before submitting


@dataclass(frozen=True)
class Outcome:
    """What one attempt on one intent did."""

    request_id: int
    name: str
    state: str  # the intent's state afterwards
    facility_id: str | None = None
    message: str = ""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _Work:
    """A claimed intent, detached from the database session."""

    id: int
    name: str
    facility: str
    template: str | None
    state: str
    attempts: int
    target_id: int
    decision_id: int | None
    mode: str | None
    priority: float | None
    window_start: datetime | None
    window_end: datetime | None
    request: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None  # a rule's intent: when its alert's decision was made


class Submitter:
    """Claims intents and submits each exactly once. Thread-safe to run beside others.

    ``facilities`` maps facility names (as in intents) to clients.
    """

    def __init__(self, sessions: sessionmaker[Session], facilities: Mapping[str, Facility],
                 settings: SubmitSettings = SubmitSettings(), *, worker_id: str | None = None,
                 clock: Callable[[], datetime] = _now, rng: random.Random | None = None):
        self.sessions = sessions
        self.facilities = facilities
        self.settings = settings
        self.worker = worker_id or default_worker_id()
        self.clock = clock
        self.rng = rng or random.Random()
        self.wake_event = threading.Event()  # set by wake(); each lane of run() has its own as well
        self._lane_events: list[threading.Event] = []
        self._lanes_lock = threading.Lock()
        # Told of each recorded outcome: observer(facility, "submitted" | "rejected" | "failed" | "retry",
        # seconds from a rule's decision to acceptance, or None). Metrics plug in here.
        self.observer: Callable[[str, str, float | None], None] | None = None
        # Told of each sweep that failed (the database went away, a bug): on_sweep_error(exc).
        # Metrics count the database ones in tomd_database_errors_total{component="submitter"}.
        self.on_sweep_error: Callable[[BaseException], None] | None = None

    # -- driving -----------------------------------------------------------------

    def wake(self) -> None:
        """Start a sweep now, in every lane (thread-safe; call after committing a decision)."""
        self.wake_event.set()
        with self._lanes_lock:
            for ev in self._lane_events:
                ev.set()

    def run(self, stop: threading.Event) -> None:
        """Submit until ``stop`` is set: one lane (thread) per configured facility, plus one for
        intents naming a facility that is not configured (they fail at once).

        A lane claims only its facility's intents and handles them one after
        another, so a slow facility (Swift's job_wait, a hanging Gemini
        endpoint) holds back its own intents only, never another facility's
        rapid-response request. Each lane sweeps at once when woken, else
        periodically and when its earliest backed-off intent becomes due.
        Claims, leases and fencing are per intent, as with one thread. Returns
        when every lane has finished the attempt it was making.
        """
        names = sorted(self.facilities)
        lanes = [threading.Thread(target=self._lane, args=(stop, (n,)), name=f"tomd-submit-{n}", daemon=True)
                 for n in names]
        lanes.append(threading.Thread(target=self._lane, args=(stop, None), name="tomd-submit-other", daemon=True))
        for t in lanes:
            t.start()
        stop.wait()
        self.wake()
        for t in lanes:
            t.join()
        log.info("submitter %s stopped", self.worker)

    def _lane(self, stop: threading.Event, facilities: tuple[str, ...] | None) -> None:
        """One facility's intents (``None``: those of facilities not configured)."""
        event = threading.Event()
        with self._lanes_lock:
            self._lane_events.append(event)
        others = sorted(self.facilities)
        # A database outage: one traceback, then a counted line every 30 s, then "works again".
        failures = FailureLog(log, f"submission sweep ({', '.join(facilities) if facilities else 'other'})",
                              on_error=lambda exc: self.on_sweep_error(exc) if self.on_sweep_error else None)
        try:
            while not stop.is_set():
                event.clear()  # before the sweep: a wake during it makes the next wait return at once
                try:
                    outcomes = self._sweep_lane(facilities, stop)
                    failures.ok()
                except Exception as exc:  # noqa: BLE001 - a database hiccup must not end the lane
                    failures.failed(exc)
                    outcomes = []
                if len(outcomes) >= self.settings.batch:
                    continue  # more may be due
                wait = self.settings.sweep_interval_s
                try:
                    with self.sessions() as s:
                        nxt = repo.next_intent_attempt_of(s, facilities=facilities,
                                                          exclude=others if facilities is None else None)
                    if nxt is not None:
                        wait = min(wait, max(0.01, (nxt - self.clock()).total_seconds()))
                except Exception:  # noqa: BLE001
                    pass
                event.wait(wait)
        finally:
            with self._lanes_lock:
                self._lane_events.remove(event)

    def _sweep_lane(self, facilities: tuple[str, ...] | None, stop: threading.Event | None = None) -> list[Outcome]:
        if facilities is not None:
            claimed = self._claim(None, facilities)
        else:
            with self.sessions() as s:
                ids = repo.due_intent_ids_elsewhere(s, sorted(self.facilities), now=self.clock(),
                                                    limit=self.settings.batch)
            claimed = self._claim(ids) if ids else []
        out: list[Outcome] = []
        for i, w in enumerate(claimed):
            if stop is not None and stop.is_set():
                # Stopping: finish the intent in hand only; the rest go back at once (not after
                # their lease), so another daemon, or this one restarted, takes them now.
                self._release(claimed[i:])
                break
            out.append(self._process(w))
        return out

    def _release(self, works: Sequence[_Work]) -> None:
        with self.sessions.begin() as s:
            for w in works:
                repo.update_observation(s, w.id, {"claimed_by": None, "claimed_until": None}, worker=self.worker)
        log.info("submitter %s: released %d claimed intent(s) at stop", self.worker, len(works))

    def run_once(self, ids: Sequence[int] | None = None) -> list[Outcome]:
        """Claim the due intents (or just ``ids``) and try each once."""
        claimed = self._claim(ids)
        return [self._process(w) for w in claimed]

    def run_until_settled(self, timeout_s: float = 30.0, poll_s: float = 0.02,
                          ids: Sequence[int] | None = None) -> list[Outcome]:
        """Sweep until no intent (of ``ids``) is left in intent/submitting (tests, CLI). Returns every outcome."""
        deadline = self.clock() + timedelta(seconds=timeout_s)
        out: list[Outcome] = []
        stop = threading.Event()
        while self.clock() < deadline:
            out.extend(self.run_once(ids))
            with self.sessions() as s:
                nxt = repo.next_observation_attempt(s, ids)
            if nxt is None:
                return out
            stop.wait(min(poll_s if nxt <= self.clock() else (nxt - self.clock()).total_seconds(), 1.0))
        return out

    # -- one intent ----------------------------------------------------------------

    def _claim(self, ids: Sequence[int] | None, facilities: Sequence[str] | None = None) -> list[_Work]:
        now = self.clock()
        with self.sessions.begin() as s:
            rows = repo.claim_observation_intents(
                s, self.worker, now=now, lease_until=now + timedelta(seconds=self.settings.lease_s),
                limit=self.settings.batch, ids=ids, facilities=facilities)
            return [_Work(r.id, r.name, r.facility, r.template, r.state, r.attempts or 0, r.target_id,
                          r.decision_id, r.mode, r.priority, r.window_start, r.window_end, dict(r.request or {}),
                          r.created_at if r.decision_id is not None else None)
                    for r in rows]

    def _process(self, w: _Work) -> Outcome:
        try:
            return self._attempt(w)
        except Exception as exc:  # noqa: BLE001 - a bug must not keep the claim forever
            log.exception("submitting %s failed unexpectedly", w.name, extra=request_fields(w))
            return self._retry(w, f"internal error: {type(exc).__name__}: {exc}", keep_state=True)

    def _attempt(self, w: _Work) -> Outcome:
        fac = self.facilities.get(w.facility)
        if fac is None:
            return self._fail(w, f"no facility {w.facility!r} is configured")
        window_over = w.window_end is not None and w.window_end <= self.clock()
        if window_over and w.state != "submitting":
            return self._fail(w, f"the window ended at {w.window_end.isoformat()} before submission")

        if w.state == "submitting":
            # An earlier attempt may have reached the facility: look before trying again.
            try:
                found = fac.find_by_name(w.name)
            except TokenRefused as exc:
                return self._retry(w, str(exc), keep_state=True, delay=self.settings.token_backoff_s)
            except LookupUnsupported as exc:
                # Resending could make a second request, and asking is impossible: final, for a person
                # (rejected, not failed: a retry cadence must not send the trigger again).
                return self._reject(w, LookupUnsupported(
                    f"{UNKNOWN_OUTCOME} after an interrupted submission, not resent (settle it with "
                    f"`tomd obs settle {w.id} --facility-id ID | --absent`): {exc}"))
            except (RetryableError, PermanentError) as exc:
                return self._retry(w, f"looking up {w.name} after an unknown outcome: {exc}", keep_state=True)
            if found:
                if len(found) > 1:
                    log.error("%s holds %d request groups named %s: %s", w.facility, len(found), w.name,
                              ", ".join(f.facility_id for f in found), extra=request_fields(w))
                first = min(found, key=lambda f: int(f.facility_id) if f.facility_id.isdigit() else 0)
                return self._submitted(w, first.facility_id, first.state.common, first.state.word, recovered=True)
            if window_over:  # looked first: the facility does not hold it, and it is too late to send
                return self._fail(w, f"the window ended at {w.window_end.isoformat()}; "
                                     f"{w.facility} holds no request named {w.name}")
            if w.attempts >= self.settings.max_attempts:
                return self._fail(w, f"gave up after {w.attempts} attempts: {self._last_error(w)}")

        try:
            doc = self._build(fac, w)
        except TemplateError as exc:
            return self._fail(w, str(exc))
        except NotFoundError as exc:
            return self._fail(w, str(exc))

        est: dict[str, Any] = {}
        if self.settings.validate:
            try:
                v = fac.validate(doc)
            except TokenRefused as exc:
                return self._retry(w, str(exc), keep_state=True, delay=self.settings.token_backoff_s)
            except ValidationRejected as exc:
                return self._reject(w, exc)
            except RetryableError as exc:
                return self._retry(w, str(exc), keep_state=True, delay=exc.retry_after)
            except (PermanentError, NotFoundError) as exc:  # a 404 too: the facility's final word
                return self._reject(w, exc)
            if not v.ok:
                return self._reject(w, ValidationRejected(fac.name, v.issues))
            if v.duration_s:  # the facility's own estimate replaces the template's (hours_per_night counts it)
                est["estimated_hours"] = v.duration_s / 3600.0

        # Commit "submitting" before sending: a crash from here on means "look first".
        with self.sessions.begin() as s:
            # The lease restarts here, so it covers the POST and its retries in full: a successor
            # cannot claim this intent (and look the name up) while the POST may still be in flight.
            if not repo.update_observation(s, w.id, {"state": "submitting", "attempts": w.attempts + 1,
                                                     "request": doc, **est,
                                                     "claimed_until": self.clock() + timedelta(
                                                         seconds=self.settings.lease_s)},
                                           worker=self.worker):
                return Outcome(w.id, w.name, "lost", message="claim lost before sending")
        was = w.state
        w.state, w.attempts, w.request = "submitting", w.attempts + 1, doc

        try:
            sub = fac.submit(doc)
        except AmbiguousError as exc:
            delay = max(self.settings.settle_s, self._backoff(w.attempts))
            return self._retry(w, str(exc), keep_state=True, delay=delay)
        except TokenRefused as exc:
            return self._retry(w, str(exc), keep_state=(was == "submitting"), delay=self.settings.token_backoff_s,
                               attempts=w.attempts - 1)
        except (ValidationRejected, NotFoundError) as exc:  # 404: the path is wrong, nothing was created
            return self._reject(w, exc)
        except RetryableError as exc:  # certainly not sent (connect error, 429)
            if w.attempts >= self.settings.max_attempts:
                return self._fail(w, f"gave up after {w.attempts} attempts: {exc}")
            return self._retry(w, str(exc), keep_state=(was == "submitting"), delay=exc.retry_after)
        except PermanentError as exc:
            return self._reject(w, exc)
        return self._submitted(w, sub.facility_id, sub.state.common, sub.state.word)

    def _build(self, fac: Facility, w: _Work) -> dict[str, Any]:
        if not w.template:
            raise TemplateError(f"intent {w.name} names no template")
        with self.sessions() as s:
            target = repo.get_target(s, w.target_id)
            if target is None:
                raise NotFoundError(f"target #{w.target_id} no longer exists")
            intent = Intent(name=w.name, mode=w.mode, priority=w.priority,
                            window_start=w.window_start, window_end=w.window_end)
            template: Any = w.template
            if w.template.startswith("inline:"):
                # A rule's inline template travels with its decision.
                template = repo.series_template_fields(s, w.id)
                if template is None:
                    raise TemplateError(f"intent {w.name}: inline template {w.template} not found with decision "
                                        f"#{w.decision_id}")
            return fac.build_request(template, target, intent)

    def _last_error(self, w: _Work) -> str:
        with self.sessions() as s:
            row = repo.get_observation(s, w.id)
            return (row.last_error if row is not None else None) or "unknown"

    def _backoff(self, attempts: int) -> float:
        cap = min(self.settings.backoff_cap_s, self.settings.backoff_base_s * (2 ** max(0, attempts - 1)))
        return self.rng.uniform(cap / 2, cap)  # "equal jitter": never hammer at once, never wait for nothing

    # -- recording (state + history + event in one transaction) -------------------

    def _submitted(self, w: _Work, facility_id: str, state: str, word: str, *, recovered: bool = False) -> Outcome:
        how = "found by name after an unknown outcome" if recovered else "accepted"
        msg = f"{how}: {w.facility} request group {facility_id}"
        with self.sessions.begin() as s:
            if not repo.update_observation(s, w.id, {
                "state": state, "facility_state": word, "facility_id": facility_id, "submitted_at": self.clock(),
                "claimed_by": None, "claimed_until": None, "next_attempt_at": None, "last_error": None,
            }, worker=self.worker):
                log.error("claim on %s lost after submission as %s; its next owner will find it by name",
                          w.name, facility_id, extra=request_fields(w, facility_id=facility_id))
                return Outcome(w.id, w.name, "lost", facility_id, "claim lost after submission")
            repo.add_observation_status(s, w.id, state, word, msg)
            repo.add_event(s, ObservationSubmitted(w.id, w.name, w.facility, facility_id, w.target_id, w.decision_id,
                                                   word, recovered), target_id=w.target_id)
        log.info("observation %s submitted to %s as %s%s", w.name, w.facility, facility_id,
                 " (recovered)" if recovered else "", extra=request_fields(w, facility_id=facility_id))
        if self.observer is not None:
            age = (self.clock() - w.created_at).total_seconds() if w.created_at is not None else None
            self.observer(w.facility, "submitted", age)
        return Outcome(w.id, w.name, state, facility_id, msg)

    def _reject(self, w: _Work, exc: TomdError) -> Outcome:
        reason = str(exc)
        with self.sessions.begin() as s:
            if not repo.update_observation(s, w.id, {"state": "rejected", "last_error": reason, "claimed_by": None,
                                                     "claimed_until": None, "next_attempt_at": None,
                                                     **({"request": w.request} if w.request else {})},
                                           worker=self.worker):
                return Outcome(w.id, w.name, "lost", message="claim lost")
            repo.add_observation_status(s, w.id, "rejected", None, reason)
            repo.add_event(s, ObservationRejected(w.id, w.name, w.facility, reason, w.target_id, w.decision_id),
                           target_id=w.target_id)
        log.warning("observation %s rejected: %s", w.name, reason, extra=request_fields(w))
        if self.observer is not None:
            self.observer(w.facility, "rejected", None)
        return Outcome(w.id, w.name, "rejected", message=reason)

    def _fail(self, w: _Work, reason: str) -> Outcome:
        with self.sessions.begin() as s:
            if not repo.update_observation(s, w.id, {"state": "failed", "last_error": reason, "claimed_by": None,
                                                     "claimed_until": None, "next_attempt_at": None},
                                           worker=self.worker):
                return Outcome(w.id, w.name, "lost", message="claim lost")
            repo.add_observation_status(s, w.id, "failed", None, reason)
            repo.add_event(s, ObservationFailed(w.id, w.name, w.facility, reason, w.attempts, w.target_id,
                                                w.decision_id), target_id=w.target_id)
        log.warning("observation %s failed: %s", w.name, reason, extra=request_fields(w))
        if self.observer is not None:
            self.observer(w.facility, "failed", None)
        return Outcome(w.id, w.name, "failed", message=reason)

    def _retry(self, w: _Work, reason: str, *, keep_state: bool, delay: float | None = None,
               attempts: int | None = None) -> Outcome:
        wait = max(delay or 0.0, self._backoff(max(1, w.attempts)))
        state = w.state if keep_state else "intent"
        values: dict[str, Any] = {"state": state, "last_error": reason, "claimed_by": None, "claimed_until": None,
                                  "next_attempt_at": self.clock() + timedelta(seconds=wait)}
        if attempts is not None:
            values["attempts"] = attempts
        with self.sessions.begin() as s:
            if not repo.update_observation(s, w.id, values, worker=self.worker):
                return Outcome(w.id, w.name, "lost", message="claim lost")
        log.info("observation %s: %s; next try in %.1fs", w.name, reason, wait, extra=request_fields(w))
        if self.observer is not None:
            self.observer(w.facility, "retry", None)
        return Outcome(w.id, w.name, state, message=reason)


# ------------------------------------------------------------- waking up --


class WakeAfterCommit:
    """An ingest ``AlertSink`` to put after the rule engine: once the batch's
    transaction commits (decisions and intents with it), wake the submitter.

    Waking inside the transaction would be too early: the submitter's claim
    would not see the uncommitted intents and would sleep until its sweep.
    """

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake

    def __call__(self, s: Session, stored: Sequence[Any]) -> None:
        from sqlalchemy import event

        event.listen(s, "after_commit", self._after_commit, once=True)

    def _after_commit(self, session: Session) -> None:
        self.wake()


# ------------------------------------------------------------ manual intents --


def manual_intent_name(target_id: int, rng: random.Random | None = None) -> str:
    """A unique idempotency key for a person's submission (fits the portal's 50 characters)."""
    stamp = _now().strftime("%Y%m%dT%H%M%S")
    return f"tomd-{target_id}-{stamp}-{(rng or random).getrandbits(32):08x}"


def create_intent(s: Session, *, target_id: int, facility: str, template: str, name: str | None = None,
                  mode: str | None = None, priority: float | None = None, window_start: datetime | None = None,
                  window_end: datetime | None = None, decision_id: int | None = None,
                  proposal: str | None = None, config: Any = None) -> int:
    """Record an intent (the rules engine does the same with its decision's key). The caller commits.

    With ``config`` (a :class:`tomd.config.Config`), the request records its proposal (the
    template's ``proposal``, else the facility's) and the template's estimated hours, so the
    rules' hours_per_night counts manual requests too.
    """
    extra: dict[str, Any] = {}
    fc = config.facilities.get(facility) if config is not None else None
    if fc is not None:
        from tomd.rules.load import estimate_hours

        fields = fc.templates.get(template)
        if isinstance(fields, Mapping):
            extra["estimated_hours"] = estimate_hours(fields)
            if proposal is None and isinstance(fields.get("proposal"), str):
                proposal = fields["proposal"]
        proposal = proposal or fc.proposal
    return repo.add_observation_intent(s, {
        "name": name or manual_intent_name(target_id), "target_id": target_id, "facility": facility,
        "template": template, "mode": mode, "priority": priority, "window_start": window_start,
        "window_end": window_end, "decision_id": decision_id, "proposal": proposal, **extra,
    })
