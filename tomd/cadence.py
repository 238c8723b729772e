"""Cadence: a series of observations made from one request.

A cadence is written as a few words (``tomd obs submit --cadence``, or a
rule's ``[observe] cadence``, as a string or a table)::

    every 1d x5                   five observations, one a day
    every 12h for 10d             twice a day for ten days from the first window
    every 2d until 2026-12-31     ... until a date (UTC)
    every 1d until 'target.last_mag > 20'   ... until the target has faded (a rule expression on target.*)
    retry 3 shift 12h             a failed or expired request is tried again, up to 3 times,
                                  each time with its window 12 h later
    every 1d x5 retry 2 shift 6h resume
                                  repeats with retries; ``resume``: when a repeat fails for good,
                                  the series goes on with the next one (without it, it stops)

A repeat series needs an end (``xN``, ``for``, or ``until``): an unattended
daemon must never observe forever because nobody wrote a limit.

Stored in ``observation_requests.cadence`` as ``{"spec": {...}, "seq": n,
"attempt": k}`` (repeat number from 0, retry number within it); every later
request of a series has ``parent_id`` = the series' first request. Repeats
keep to the first window's rhythm (``start₀ + n·every``, never in the past),
each with the first window's length.

``next_intent`` runs inside the transaction that records a request's final
state (``tomd.status.Poller``); the next request's name is derived from the
series' first name and its position (``<first>-3``, ``<first>-3r1``), and
inserted only if new, so a replayed poll cannot make it twice. The submitter
sends it like any intent. A request that ends without reaching the facility
(the submitter gave up: its window passed, its attempts ran out) is never
polled; ``sweep`` (a scheduler job) steps those series the same way.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session

from tomd.db import repository as repo
from tomd.errors import InputError

log = logging.getLogger(__name__)

MIN_EVERY_S = 600.0  # a "repeat" faster than this is one longer observation, not a cadence
MAX_RETRIES = 20
MAX_COUNT = 1000
NAME_MAX = 50  # the portal's limit on a request group's name
_NEEDS_CTX = re.compile(r"\b(alert\s*\.|visible\s*\(|airmass\s*\(|moon_distance\s*\(|color\s*\(|feature\s*\.)")
SYNTAX = ('words: every <duration>, x<N> (or <N> times), for <duration>, until <date or \'expression\'>, '
          'retry <N>, shift <duration>, resume; e.g. "every 1d x5" or "retry 3 shift 12h"')


class CadenceError(ValueError):
    """A cadence that cannot be used; ``key`` names the part (every, count, until, ...)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Cadence:
    every_s: float | None = None  # repeat interval
    count: int | None = None  # repeats in the series, the first included
    for_s: float | None = None  # the series lasts this long from its first window
    until: datetime | None = None  # no repeat starts after this time
    until_expr: str | None = None  # no repeat once this holds for the target (target.* only)
    retries: int = 0  # a failed or expired request is tried again this many times
    shift_s: float = 0.0  # each retry's window moves this much later
    resume: bool = False  # a repeat that failed for good: go on with the next one

    # -- storage ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v not in (None, 0, 0.0, False)}
        if self.until is not None:
            d["until"] = self.until.isoformat()
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Cadence":
        until = d.get("until")
        return cls(every_s=d.get("every_s"), count=d.get("count"), for_s=d.get("for_s"),
                   until=datetime.fromisoformat(until) if until else None, until_expr=d.get("until_expr"),
                   retries=int(d.get("retries") or 0), shift_s=float(d.get("shift_s") or 0.0),
                   resume=bool(d.get("resume")))

    def describe(self) -> str:
        """Back to the words it was written in."""
        out = []
        if self.every_s:
            out.append(f"every {_dur(self.every_s)}")
        if self.count:
            out.append(f"x{self.count}")
        if self.for_s:
            out.append(f"for {_dur(self.for_s)}")
        if self.until:
            out.append(f"until {self.until.isoformat().replace('+00:00', 'Z')}")
        if self.until_expr:
            out.append(f"until '{self.until_expr}'")
        if self.retries:
            out.append(f"retry {self.retries}" + (f" shift {_dur(self.shift_s)}" if self.shift_s else ""))
        if self.resume:
            out.append("resume")
        return " ".join(out)

    def check(self) -> "Cadence":
        if self.every_s is not None and self.every_s < MIN_EVERY_S:
            raise CadenceError(f"every {_dur(self.every_s)} is too often; at least {_dur(MIN_EVERY_S)}", "every")
        if self.every_s is None:
            for key, v in (("count", self.count), ("for", self.for_s), ("until", self.until or self.until_expr)):
                if v:
                    raise CadenceError(f"{key} needs a repeat: add every <duration>", key)
            if self.resume:
                raise CadenceError("resume needs a repeat (every <duration>)", "resume")
            if self.shift_s and not self.retries:
                raise CadenceError("shift needs retry <N>", "shift")
            if not self.retries:
                raise CadenceError(f"says neither every nor retry; {SYNTAX}")
        elif not (self.count or self.for_s or self.until or self.until_expr):
            raise CadenceError("a repeat needs an end: x<N>, for <duration> or until <date or 'expression'>",
                               "every")
        if self.count is not None and not 1 <= self.count <= MAX_COUNT:
            raise CadenceError(f"count must be 1..{MAX_COUNT}, got {self.count}", "count")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise CadenceError(f"retry must be 0..{MAX_RETRIES}, got {self.retries}", "retry")
        if self.shift_s and not self.retries:
            raise CadenceError("shift needs retry <N>", "shift")
        if self.shift_s < 0:
            raise CadenceError("shift must be a positive duration", "shift")
        if self.until_expr is not None:
            check_until_expression(self.until_expr)
        return self


# ---------------------------------------------------------------- parsing --


def _duration(word: str, key: str) -> float:
    from tomd.rules.load import _duration as rule_duration

    v = rule_duration(word)
    if v is None or isinstance(word, bool):
        raise CadenceError(f'{key}: expected a duration like "12h", "1d" or "90m", got {word!r}', key)
    return v


def _dur(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


def _int(word: str, key: str) -> int:
    if not re.fullmatch(r"\d+", word):
        raise CadenceError(f"{key}: expected a whole number, got {word!r}", key)
    return int(word)


def _time(word: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(word.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def check_until_expression(text: str) -> None:
    """An ``until`` expression reads the target only (it is checked when a repeat is due, not on an alert)."""
    from tomd.rules.expr import ExprError, compile_expression

    if _NEEDS_CTX.search(text):
        raise CadenceError(f"until '{text}': only target.* and now can be read here (no alert.*, "
                           "feature.* or visibility functions)", "until")
    try:
        compile_expression(text, [])
    except ExprError as exc:
        raise CadenceError(f"until '{text}': {exc.message} (column {exc.col})", "until") from None


def parse_cadence(text: str) -> Cadence:
    """The words of ``--cadence`` or a rule's ``cadence = "..."``; raises CadenceError."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise CadenceError(f"{exc} (quote an until expression whole: until 'target.last_mag > 20')") from None
    if not words:
        raise CadenceError(f"is empty; {SYNTAX}")
    f: dict[str, Any] = {}
    i = 0

    def arg(key: str) -> str:
        if i + 1 >= len(words):
            raise CadenceError(f"{key} needs a value; {SYNTAX}", key)
        return words[i + 1]

    def once(key: str) -> None:
        if key in f:
            raise CadenceError(f"says {key} twice", key)

    while i < len(words):
        w = words[i].lower()
        if w == "every":
            once("every_s")
            f["every_s"] = _duration(arg("every"), "every")
            i += 2
        elif re.fullmatch(r"x\d+", w):
            once("count")
            f["count"] = int(w[1:])
            i += 1
        elif re.fullmatch(r"\d+", w) and i + 1 < len(words) and words[i + 1].lower() == "times":
            once("count")
            f["count"] = int(w)
            i += 2
        elif w == "count":
            once("count")
            f["count"] = _int(arg("count"), "count")
            i += 2
        elif w == "for":
            once("for_s")
            f["for_s"] = _duration(arg("for"), "for")
            i += 2
        elif w == "until":
            value = arg("until")
            t = _time(value)
            if t is not None:
                once("until")
                f["until"] = t
            else:
                once("until_expr")
                f["until_expr"] = value
            i += 2
        elif w == "retry":
            once("retries")
            f["retries"] = _int(arg("retry"), "retry")
            i += 2
        elif w == "shift":
            once("shift_s")
            f["shift_s"] = _duration(arg("shift"), "shift")
            i += 2
        elif w == "resume":
            f["resume"] = True
            i += 1
        else:
            import difflib

            hint = difflib.get_close_matches(w, ["every", "for", "until", "retry", "shift", "resume", "times"], 1)
            raise CadenceError(f"unknown word {words[i]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                               + f"; {SYNTAX}")
    return Cadence(**f).check()


_TABLE_KEYS = {"every", "count", "for", "until", "retry", "shift", "resume"}


def cadence_from_table(t: Mapping[str, Any]) -> Cadence:
    """A rule's ``cadence = { every = "1d", count = 5, retry = 2, shift = "12h" }``."""
    for k in t:
        if k not in _TABLE_KEYS:
            raise CadenceError(f"unknown key; expected one of {', '.join(sorted(_TABLE_KEYS))}", k)
    f: dict[str, Any] = {}
    if "every" in t:
        f["every_s"] = _duration(t["every"], "every")
    if "for" in t:
        f["for_s"] = _duration(t["for"], "for")
    if "shift" in t:
        f["shift_s"] = _duration(t["shift"], "shift")
    for key, field in (("count", "count"), ("retry", "retries")):
        if key in t:
            v = t[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise CadenceError(f"expected a whole number, got {v!r}", key)
            f[field] = v
    if "until" in t:
        v = t["until"]
        if isinstance(v, datetime):
            f["until"] = v if v.tzinfo else v.replace(tzinfo=timezone.utc)
        elif isinstance(v, str) and _time(v) is not None:
            f["until"] = _time(v)
        elif isinstance(v, str) and v.strip():
            f["until_expr"] = v
        else:
            raise CadenceError(f"expected a date or a target expression, got {v!r}", "until")
    if "resume" in t:
        if not isinstance(t["resume"], bool):
            raise CadenceError(f"expected true or false, got {t['resume']!r}", "resume")
        f["resume"] = t["resume"]
    return Cadence(**f).check()


def cadence_option(text: str | None) -> dict[str, Any] | None:
    """``--cadence TEXT`` → the column's JSON (first request of a series), or InputError naming the option."""
    if text is None:
        return None
    try:
        return {"spec": parse_cadence(text).to_json(), "seq": 0, "attempt": 0}
    except CadenceError as exc:
        raise InputError(str(exc), field="--cadence") from None


def initial(c: Cadence) -> dict[str, Any]:
    """The column's JSON for a series' first request."""
    return {"spec": c.to_json(), "seq": 0, "attempt": 0}


# ----------------------------------------------------------------- stepping --


@dataclass(frozen=True)
class Step:
    """What comes after a request that ended: another one, or the end of the series (and why)."""

    seq: int | None  # None: the series ends
    attempt: int = 0
    window_start: datetime | None = None
    window_end: datetime | None = None
    reason: str = ""


def plan_next(c: Cadence, *, seq: int, attempt: int, state: str, now: datetime, series_start: datetime,
              window_start: datetime | None, window_end: datetime | None) -> Step:
    """Pure: the next step of a series after request (``seq``, ``attempt``) ended in ``state``."""
    length = (window_end - window_start) if window_start and window_end and window_end > window_start \
        else timedelta(hours=24)
    if state in ("failed", "expired"):
        if attempt < c.retries:
            start = max(now, (window_start or now) + timedelta(seconds=c.shift_s))
            return Step(seq, attempt + 1, start, start + length,
                        f"retry {attempt + 1} of {c.retries} after {state}")
        if not (c.every_s and c.resume):
            return Step(None, reason=f"{state}, no retry left" if c.retries else state)
    elif state != "completed":
        return Step(None, reason=state)  # cancelled: a person ended it
    if not c.every_s:
        return Step(None, reason="completed")
    nxt = seq + 1
    if c.count is not None and nxt >= c.count:
        return Step(None, reason=f"all {c.count} repeats done")
    start = max(now, series_start + timedelta(seconds=c.every_s * nxt))
    if c.for_s is not None and start >= series_start + timedelta(seconds=c.for_s):
        return Step(None, reason=f"the series' {_dur(c.for_s)} are over")
    if c.until is not None and start >= c.until:
        return Step(None, reason=f"until {c.until.isoformat()} reached")
    why = f"repeat {nxt + 1}" + (f" of {c.count}" if c.count else "")
    if state != "completed":
        why += f" (resumed after {state})"
    return Step(nxt, 0, start, start + length, why)


def series_name(first: str, seq: int, attempt: int) -> str:
    """Deterministic: the same position in the same series always gets the same name."""
    suffix = f"-{seq}" + (f"r{attempt}" if attempt else "")
    if len(first) + len(suffix) <= NAME_MAX:
        return first + suffix
    digest = hashlib.sha256(first.encode()).hexdigest()[:6]
    return f"{first[:NAME_MAX - len(suffix) - 7]}-{digest}{suffix}"


def until_holds(s: Session, expr: str, target_id: int, now: datetime) -> bool:
    """Evaluate an ``until`` expression on the target as stored now. An error counts as 'not yet'."""
    from tomd.rules.context import Point, TargetView, mjd_of
    from tomd.rules.expr import compile_expression

    now_mjd = mjd_of(now)
    row = repo.target_rows(s, [target_id]).get(target_id)
    view = TargetView(row, names=repo.names_for_rules(s, [target_id])[target_id],
                      tags=repo.tags_of(s, [target_id])[target_id], lists=repo.lists_of(s, [target_id])[target_id],
                      points=[Point(*p) for p in repo.photometry_for_rules(s, [target_id])[target_id]],
                      now_mjd=now_mjd)
    try:
        return compile_expression(expr, []).first_false(None, view, now_mjd, None) == -1
    except Exception as exc:  # noqa: BLE001 - a missing value (no photometry yet) is not an end
        log.info("cadence until '%s' on target #%d: %s; the series goes on", expr, target_id, exc)
        return False


def next_intent(s: Session, request_id: int, state: str, now: datetime) -> int | None:
    """After ``request_id`` ended in ``state``: insert the series' next intent (in the caller's
    transaction) and return its id, or None (no cadence, the series ends, or it exists already)."""
    from tomd.events import CadenceStep

    row = repo.get_observation(s, request_id)
    if row is None or not row.cadence or "spec" not in row.cadence:
        return None
    try:
        c = Cadence.from_json(row.cadence["spec"])
    except (TypeError, ValueError) as exc:
        log.error("request #%d: unreadable cadence %r: %s", request_id, row.cadence, exc)
        return None
    seq, attempt = int(row.cadence.get("seq", 0)), int(row.cadence.get("attempt", 0))
    first = row if row.parent_id is None else repo.get_observation(s, row.parent_id)
    if first is None:
        return None
    series_start = first.window_start or first.submitted_at or first.created_at
    step = plan_next(c, seq=seq, attempt=attempt, state=state, now=now, series_start=series_start,
                     window_start=row.window_start, window_end=row.window_end)
    if step.seq is not None and c.until_expr and step.attempt == 0 and until_holds(s, c.until_expr,
                                                                                   row.target_id, now):
        step = Step(None, reason=f"until '{c.until_expr}' holds")
    if step.seq is None:
        log.info("cadence of %s ends: %s", first.name, step.reason)
        return None
    name = series_name(first.name, step.seq, step.attempt)
    new_id = repo.insert_intent_once(s, {
        "name": name, "target_id": row.target_id, "facility": row.facility, "template": row.template,
        "mode": row.mode, "priority": row.priority, "window_start": step.window_start,
        "window_end": step.window_end, "estimated_hours": row.estimated_hours, "parent_id": first.id,
        "cadence": {"spec": c.to_json(), "seq": step.seq, "attempt": step.attempt},
        # The visit is under the series' proposal: hours_per_night counts per facility and proposal.
        "proposal": row.proposal,
    })
    if new_id is None:
        return None  # made before (a replayed poll, a reopened request completing again)
    repo.add_event(s, CadenceStep(new_id, name, first.id, row.id, row.target_id, row.facility, step.reason,
                                  step.window_start.isoformat(), step.window_end.isoformat()),
                   target_id=row.target_id)
    log.info("cadence of %s: %s → %s", first.name, step.reason, name)
    return new_id


def sweep(sessions: Any, *, lookback_s: float = 86400.0, clock: Any = None) -> list[int]:
    """Step the series whose request failed before reaching the facility; returns new intent ids.

    Idempotent like the poller's step (names are deterministic), so it may run
    anywhere, often, and on several daemons at once.
    """
    now = (clock or (lambda: datetime.now(timezone.utc)))()
    made: list[int] = []
    with sessions.begin() as s:
        for rid, state in repo.unsent_ended_in_series(s, since=now - timedelta(seconds=lookback_s)):
            new_id = next_intent(s, rid, state, now)
            if new_id is not None:
                made.append(new_id)
    return made
