"""Claiming and finishing hook runs: the part of delivery that touches hook_runs.

Used on both sides of the process boundary: the hook worker process runs
user hooks with it (so the daemon's process spends nothing per run), and the
daemon runs builtin subscribers with it, and records a run whose worker had to
be killed (timeout) or died.

A :class:`Dispatcher` claims up to ``claim_batch`` due runs in one transaction
under its ``claim_id`` (unique per worker incarnation), runs them in turn,
records each success at once (with the hook's actions, in the same
transaction), and records failed attempts together. Every write is fenced by
the claim: a run whose lease ran out and was claimed by someone else is left
to them ("lost").
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tomd.hooks.registry import Builtin, HookSpec

log = logging.getLogger("tomd.hooks")

__all__ = ["Dispatcher", "Limits", "Outcome", "backoff"]


@dataclass(frozen=True)
class Limits:
    """The [hooks] numbers a dispatcher needs (picklable: the worker gets a copy)."""

    timeout: float = 60.0
    max_attempts: int = 5
    retry_backoff: float = 10.0
    retry_max: float = 3600.0
    lease_margin: float = 30.0
    claim_batch: int = 20
    # While the ingest is busy, the share of the wall clock a worker may spend on runs (its
    # claims and records load the database the ingest writes to): tomd.hooks.worker.
    busy_share: float = 0.2


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | error | timeout | crash
    actions: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Claimed:
    run_id: int
    hook: str
    attempts: int  # finished attempts before this one
    event_id: int
    kind: str
    version: int
    payload: dict
    target_id: int | None
    until: Any  # lease end

    @property
    def event_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "payload": self.payload}


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: base·2^(attempt-1), capped, with jitter in [½, 1]×."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return delay * (0.5 + 0.5 * (rng or random).random())


# execute(hook, claimed, timeout) → Outcome, for user hooks
Executor = Callable[[HookSpec, Claimed, float], Outcome]


class Dispatcher:
    """Claims, runs and records runs of ``hooks`` under ``claim_id``.

    ``execute`` runs a user hook (the worker's in-process call); builtins run
    here, inside their done transaction. ``on_end(hook, outcome, seconds,
    requested)`` hears about every finished attempt (metrics, waking the
    submitter after a hook requested an observation). ``facilities``
    (tomd.hooks.api.facility_map) fills and checks the requests hooks make.
    """

    def __init__(self, sessions, limits: Limits, hooks: Mapping[str, HookSpec | Builtin], claim_id: str, *,
                 execute: Executor | None = None,
                 on_end: Callable[[str, str, float, bool], None] | None = None,
                 rng: random.Random | None = None, facilities: Mapping[str, Any] | None = None):
        self.sessions = sessions
        self.facilities = facilities
        self.limits = limits
        self.hooks = dict(hooks)
        self.claim_id = claim_id
        self.execute = execute
        self.on_end = on_end
        self.rng = rng or random.Random()

    def timeout_of(self, h: HookSpec | Builtin) -> float:
        return h.timeout or self.limits.timeout

    # ------------------------------------------------------------ a batch

    def claim(self) -> list[Claimed]:
        from tomd.db import repository as repo
        from tomd.db.models import utcnow

        now = utcnow()
        lease = {n: now + timedelta(seconds=self.timeout_of(h) + self.limits.lease_margin)
                 for n, h in self.hooks.items()}
        with self.sessions.begin() as s:
            rows = repo.claim_hook_runs(s, self.claim_id, list(self.hooks), now=now, lease=lease,
                                        limit=self.limits.claim_batch)
        return [Claimed(*row) for row in rows]

    def run_batch(self, should_stop: Callable[[], bool] | None = None) -> list[str]:
        """Claim a batch and run it; the outcomes ("done", "retried", "failed", "lost"), empty if none was due.

        Before each run its lease is extended if it might end before the
        run's timeout (the batch's earlier runs took long).
        """
        from tomd.db import repository as repo
        from tomd.db.models import utcnow

        claimed = self.claim()
        outcomes: list[str] = []
        failures: list[tuple] = []
        try:
            for i, c in enumerate(claimed):
                h = self.hooks.get(c.hook)
                if h is None or (should_stop is not None and should_stop()):
                    self.release([x.run_id for x in claimed[i:]])
                    break
                timeout = self.timeout_of(h)
                now = utcnow()
                if c.until - now < timedelta(seconds=timeout + self.limits.lease_margin / 2):
                    rest = {x.run_id: now + timedelta(seconds=self.timeout_of(self.hooks.get(x.hook, h))
                                                      + self.limits.lease_margin) for x in claimed[i:]}
                    with self.sessions.begin() as s:
                        kept = repo.extend_hook_leases(s, self.claim_id, rest)
                    for j in range(i, len(claimed)):
                        x = claimed[j]
                        claimed[j] = Claimed(*(x.run_id, x.hook, x.attempts, x.event_id, x.kind, x.version,
                                               x.payload, x.target_id, rest[x.run_id]))
                    if c.run_id not in kept:
                        outcomes.append("lost")
                        continue
                if isinstance(h, Builtin):
                    outcome, error = self._run_builtin(h, c)
                    if outcome is not None:
                        outcomes.append(outcome)
                    else:
                        failures.append((h, c, error))
                    continue
                result = self.execute(h, c, timeout)  # type: ignore[misc]
                if result.status == "ok":
                    try:
                        applied, requested = self.finish_ok(c, result.actions)
                    except Exception:  # noqa: BLE001 - e.g. an action on a target that is gone
                        result = Outcome("error", error="applying the hook's actions failed:\n"
                                         + traceback.format_exc(), seconds=result.seconds)
                    else:
                        self._ended(c.hook, "ok", result.seconds, requested)
                        outcomes.append("done" if applied else "lost")
                        continue
                self._ended(c.hook, "timeout" if result.status == "timeout" else "failed", result.seconds, False)
                failures.append((h, c, result.error))
        finally:
            if failures:
                outcomes.extend(self.record_failures(failures))
        return outcomes

    def _ended(self, hook: str, outcome: str, seconds: float, requested: bool) -> None:
        if self.on_end is not None:
            try:
                self.on_end(hook, outcome, seconds, requested)
            except Exception:  # noqa: BLE001 - metrics never break delivery
                log.debug("on_end failed", exc_info=True)

    def _run_builtin(self, h: Builtin, c: Claimed) -> tuple[str | None, str]:
        """("done" | "lost", "") or (None, traceback): a builtin runs inside its done transaction."""
        from tomd.db import repository as repo
        from tomd.db.models import utcnow
        from tomd.hooks.api import event_from_json

        t0 = time.monotonic()
        try:
            event = event_from_json(c.event_json, where=f"outbox #{c.event_id}")
            with self.sessions.begin() as s:
                if not repo.finish_hook_run(s, c.run_id, self.claim_id, _done(c, utcnow())):
                    log.warning("hook %s event #%d: the claim was lost (lease over); left to its new owner",
                                h.name, c.event_id)
                    return "lost", ""
                h.fn(s, event)
        except Exception:  # noqa: BLE001 - a builtin's failure is retried like a hook's
            self._ended(h.name, "failed", time.monotonic() - t0, False)
            return None, traceback.format_exc()
        self._ended(h.name, "ok", time.monotonic() - t0, False)
        return "done", ""

    # ------------------------------------------------------------ records

    def finish_ok(self, c: Claimed, actions: list) -> tuple[bool, bool]:
        """Mark done and apply the actions, in one transaction: (applied, an observation was requested)."""
        from tomd.db import repository as repo
        from tomd.db.models import utcnow
        from tomd.hooks.api import apply_actions

        with self.sessions.begin() as s:
            if not repo.finish_hook_run(s, c.run_id, self.claim_id, _done(c, utcnow())):
                log.warning("hook %s event #%d: the claim was lost (lease over); its actions are not applied",
                            c.hook, c.event_id)
                return False, False
            changes = apply_actions(s, actions, hook=c.hook, event_id=c.event_id, facilities=self.facilities)
        for line in changes:
            log.info("hook %s event #%d: %s", c.hook, c.event_id, line)
        return True, any(a.get("action") == "request" for a in actions)

    def record_failures(self, failures: list[tuple]) -> list[str]:
        """Record failed attempts (hook, Claimed, error) in one transaction: pending again after a
        backoff, or failed (with a ``hook.failed`` event)."""
        from tomd.db import repository as repo
        from tomd.db.models import utcnow
        from tomd.events import HookFailed

        now = utcnow()
        updates, infos = [], []
        for h, c, error in failures:
            n = c.attempts + 1
            limit = h.max_attempts or self.limits.max_attempts
            last_line = (error.strip().splitlines() or ["error"])[-1][:500]
            values = {"attempts": n, "error": error, "claimed_by": None, "claimed_until": None}
            if n >= limit:
                values.update(state="failed", finished_at=now)
            else:
                delay = backoff(n, self.limits.retry_backoff, self.limits.retry_max, self.rng)
                values.update(state="pending", next_attempt_at=now + timedelta(seconds=delay))
            updates.append((c.run_id, values))
            infos.append((n >= limit, h, c, n, limit, values.get("next_attempt_at"), last_line))
        with self.sessions.begin() as s:
            mine = repo.finish_hook_runs(s, self.claim_id, updates)
            # a hook failing on hook.failed must not feed itself
            repo.add_events(s, [(HookFailed(h.name, c.event_id, c.kind, n, last_line, c.target_id), c.target_id)
                                for final, h, c, n, _l, _t, last_line in infos
                                if final and c.run_id in mine and c.kind != HookFailed.kind])
        outcomes: list[str] = []
        retries: dict[str, list[tuple]] = {}
        gave_up: dict[str, list[tuple]] = {}
        for final, h, c, n, limit, next_at, last_line in infos:
            if c.run_id not in mine:
                outcomes.append("lost")
            elif final:
                outcomes.append("failed")
                gave_up.setdefault(h.name, []).append((h, c, n, last_line))
            else:
                outcomes.append("retried")
                retries.setdefault(h.name, []).append((c, n, limit, next_at, last_line))
        # One line per hook and batch: a hook failing on every event must not flood the log
        # (``tomd hook runs --failed`` lists every run with its traceback).
        for name, items in gave_up.items():
            h, c, n, last_line = items[0]
            more = (f" (and on {len(items) - 1} more: " + ", ".join(f"#{x[1].event_id}" for x in items[1:]) + ")"
                    if len(items) > 1 else "")
            log.error("hook %s (%s) failed on event #%d (%s) after %d attempt(s)%s: %s", name, h.where, c.event_id,
                      c.kind, n, more, last_line)
        for name, items in retries.items():
            c, n, limit, next_at, last_line = items[0]
            more = f" (and {len(items) - 1} more event(s) in this batch)" if len(items) > 1 else ""
            log.warning("hook %s failed on event #%d (%s), attempt %d of %d, retrying in %.1f s%s: %s", name,
                        c.event_id, c.kind, n, limit, (next_at - now).total_seconds(), more, last_line)
        return outcomes

    def release(self, run_ids: list[int] | None = None) -> int:
        """Give claimed runs back (all of this claim's if None): pending at once, attempts unchanged."""
        from tomd.db import repository as repo

        with self.sessions.begin() as s:
            return repo.release_hook_runs(s, self.claim_id, run_ids)


def _done(c: Claimed, now) -> dict[str, Any]:
    return {"state": "done", "attempts": c.attempts + 1, "finished_at": now, "error": None, "claimed_by": None,
            "claimed_until": None}
