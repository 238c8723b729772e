"""Rules on stored alerts: verdicts, limits, duplicates, decisions and intents.

:class:`RuleEngine` is an ``AlertSink``: the ingestor calls it inside the
batch's transaction, after alerts, targets and photometry are written, so
every verdict commits with its alert or not at all (Invariant 2), and a
fired rule's submission intent commits with its decision (Invariant 3: the
decision id is unique on ``observation_requests``).

For each alert and each rule listening to its source::

    when false ................................ not_fired  (the first false clause, with its values)
    when raised ............................... error      (the other rules still run)
    [observe] visible gate not met ............ not_fired  ("not visible from ... : why")
    mode = "test" ............................. test       ("would fire" (+ rule.tested event) /
                                                            "would be limited: ..." / "would be deduplicated: ...")
    kill switch, cooldown, per_night .......... limited    (the limit that decided)
    same target+facility+template pending .... deduplicated (priority raised if the new one is higher)
    hours_per_night ........................... limited    (after the duplicate check: a raise adds no hours)
    otherwise ................................. fired      (+ intent, tags, lists, rule.fired event)

"Night" (per_night, hours_per_night) is :func:`night_of`: local noon to noon
at the longitude of the rule's facility's first site, the night holding the
decision time; UTC noon to noon for a rule without a facility. The backtest
counts nights the same way.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from tomd.db import repository as repo
from tomd.events import RequestPriorityRaised, RuleFired, RuleTested, SubmissionIntent
from tomd.logs import alert_fields
from tomd.rules.context import AlertView, Context, FeatureFn, TargetView, mjd_of
from tomd.rules.expr import json_leaves, describe_values
from tomd.rules.load import Rule, RuleEnv, load_file, rule_files

log = logging.getLogger(__name__)

DAY = timedelta(hours=24)
WOULD_FIRE = "would fire"


def night_of(t: datetime, lon_deg: float = 0.0) -> tuple[datetime, str]:
    """(start, label) of the night holding ``t``: local mean noon to noon at longitude ``lon_deg`` (east > 0).

    The label is the local date of the night's evening ("2026-03-01" runs from
    noon on 1 March to noon on 2 March, local mean time); the start is in UTC.
    """
    off = timedelta(hours=lon_deg / 15.0)
    local = _utc(t) + off
    noon = local.replace(hour=12, minute=0, second=0, microsecond=0)
    if local < noon:
        noon -= DAY
    return noon - off, noon.date().isoformat()


def facility_longitude(facility_kinds: Mapping[str, str], facility: str | None) -> float:
    """Longitude of a facility's first site (0: UTC nights, for no facility or one without sites)."""
    if facility is None:
        return 0.0
    from tomd.visibility import FACILITY_SITES, SITES

    kind = facility_kinds.get(facility, facility)
    code = FACILITY_SITES[kind][0] if kind in FACILITY_SITES else kind
    site = SITES.get(code)
    return site.lon if site is not None else 0.0


# ------------------------------------------------------------- rule set --

class RuleSet:
    """The rules in force, reloaded when their files change (mtime, size, files added or removed).

    A file whose new version is invalid keeps its last good rules (and the
    problems are logged, FILE:LINE:COL); a new invalid file adds nothing.
    """

    def __init__(self, paths: Iterable[str | Path], env: RuleEnv, *, check_every_s: float = 2.0):
        self.paths = [Path(p) for p in paths]
        self.env = env
        self.check_every_s = check_every_s
        self._files: dict[Path, tuple[tuple[int, int], Rule | None]] = {}
        self._rules: list[Rule] = []
        self._checked = -math.inf
        self._missing: set[str] = set()  # paths reported missing (once)
        self.problems: list[str] = []
        self._lock = threading.Lock()  # one stream thread reloads at a time
        # Told after each look at the files: observer(rules in force, problems of the files that changed).
        self.observer: Callable[[int, list[str]], None] | None = None
        self.reload()

    @classmethod
    def of(cls, rules: Sequence[Rule]) -> "RuleSet":
        """A fixed set (tests, backtests)."""
        rs = cls([], RuleEnv(), check_every_s=math.inf)
        rs._rules = list(rules)
        return rs

    def current(self) -> list[Rule]:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s and self._lock.acquire(blocking=False):
            try:
                self.reload()
            finally:
                self._lock.release()
        return self._rules

    def reload(self) -> list[str]:
        """Look at the files now; returns the problems of files that changed."""
        self._checked = time.monotonic()
        if not self.paths:
            return []
        files, missing = rule_files(self.paths)
        # A missing path is reported when it goes missing, not at every look (every 2 s): the
        # observer counts reported problems (tomd_rule_reload_failures_total).
        problems = [m for m in missing if m not in self._missing]
        for m in problems:
            log.error("rules path missing, %s", m)
        self._missing = set(missing)
        changed = False
        seen = set()
        for f in files:
            seen.add(f)
            try:
                st = f.stat()
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            old = self._files.get(f)
            if old is not None and old[0] == stamp:
                continue
            try:
                rule, probs = load_file(f, self.env)
            except Exception as exc:  # noqa: BLE001 - one bad file must never stop the others or the ingest
                rule, probs = None, [f"{f}:1:1: cannot load: {exc.__class__.__name__}: {exc}"]
            if probs:
                problems.extend(probs)
                for p in probs:
                    log.error("rule file rejected, %s", p, extra={"rule_file": str(f)})
                if old is not None and old[1] is not None:
                    log.warning("%s: keeping its last good version (rule %s)", f, old[1].name)
                    self._files[f] = (stamp, old[1])
                else:
                    self._files[f] = (stamp, None)
            else:
                if old is not None:
                    log.info("rule %s reloaded from %s", rule.name, f)
                self._files[f] = (stamp, rule)
            changed = True
        for f in list(self._files):
            if f not in seen:
                log.info("rule file %s removed", f)
                del self._files[f]
                changed = True
        if changed or not self._rules:
            rules, names = [], {}
            for f in sorted(self._files):
                r = self._files[f][1]
                if r is None:
                    continue
                if r.name in names:
                    msg = f"{r.file}:{r.line}:1: rule name {r.name!r} is already used by {names[r.name].file}"
                    problems.append(msg)
                    log.error("rule file rejected, %s", msg)
                    continue
                names[r.name] = r
                rules.append(r)
            self._rules = rules
        self.problems = problems
        if self.observer is not None:
            self.observer(len(self._rules), problems)
        return problems

    def reload_now(self) -> list[str]:
        """Look at the files now, whatever the interval (SIGHUP); waits for a reload in progress.

        A missing path is reported again: someone asked.
        """
        with self._lock:
            self._missing = set()
            return self.reload()


# --------------------------------------------------------------- verdict --

@dataclass(slots=True)
class Verdict:
    rule: str
    outcome: str  # fired | not_fired | limited | deduplicated | error | test
    reason: str
    details: dict[str, Any]
    decision_id: int | None = None
    request_id: int | None = None

    @classmethod
    def of_row(cls, row: tuple) -> "Verdict":
        """The verdict of a decision row (repo.DECISION_COLUMNS; a not-fired one in its compact form)."""
        return cls(row[2], row[4], row[6], repo.decision_details(row))


class RowVerdict(tuple):
    """A not-fired verdict read from its compact decision row: ``rule``, ``outcome``, ``reason`` and
    ``details`` (made when read) as a Verdict has them.

    What a batch's verdicts give when iterated: the metrics' observer reads every verdict's rule and
    outcome after each commit: made into Verdicts with their details dicts, that cost 1.2 µs per
    verdict (30 µs per alert at 25 rules), as these views 0.4.
    """

    __slots__ = ()
    rule = property(itemgetter(2))
    outcome = property(itemgetter(4))
    reason = property(itemgetter(6))
    decision_id = None
    request_id = None

    @property
    def details(self) -> dict[str, Any]:
        return repo.decision_details(self)


class Verdicts(Sequence):
    """A batch's verdicts: Verdict objects, and the common not-fired ones kept as their decision rows
    (given as RowVerdict views).

    A batch holds rules × alerts verdicts until it commits. Kept as objects (a Verdict, its details
    dict, the row) they all reach the garbage collector's oldest generation and set off its full
    collections: at 100 rules that cost more than the verdicts (bench/rules.py, 3.5 µs per rule and
    alert). A flat row of plain values is a tuple the collector stops tracking at its first pass.
    """

    __slots__ = ("items",)

    def __init__(self, items: list | None = None):
        self.items = items if items is not None else []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [_verdict(x) for x in self.items[i]]
        return _verdict(self.items[i])

    def __iter__(self):
        for x in self.items:
            yield x if type(x) is Verdict else RowVerdict(x)

    def outcomes(self):
        """Each verdict's outcome, without making the verdicts."""
        return (x.outcome if type(x) is Verdict else x[4] for x in self.items)


def _verdict(x) -> Verdict | RowVerdict:
    return x if type(x) is Verdict else RowVerdict(x)


def _jsonable(v: Any) -> Any:
    t = type(v)  # exact types first: isinstance against the ABCs below costs most of a verdict's row
    if t is str or t is int or t is bool or v is None:
        return v
    if t is float:
        return v if v - v == 0.0 else None  # nan and inf give nan
    if t is dict:
        if len(v) > 50:
            v = dict(list(v.items())[:50])
        return {k if type(k) is str else str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (set, frozenset)):
        return sorted(_jsonable(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in list(v.items())[:50]}
    return repr(v)[:200]


_ALL_TRUE = re.compile(r"all \d+ clauses? true")


def full_reason(reason: str, details: Mapping[str, Any] | None) -> str:
    """A verdict's reason as people read it: the clause(s) with the values they read.

    ``"alert.mag < 18 is false"`` + details {"values": {"alert.mag": 19.2}} →
    ``"alert.mag < 18 is false (alert.mag = 19.2)"``; ``"all 2 clauses true, but …"`` →
    ``"all 2 clauses true (alert.mag = 17.1, …), but …"`` (at most 8 values there).
    """
    vals = (details or {}).get("values") if isinstance(details, Mapping) else None
    if not isinstance(vals, Mapping) or not vals:
        return reason
    if reason.endswith(" is false"):
        return f"{reason} ({describe_values(vals)})"
    m = _ALL_TRUE.search(reason)
    if m is not None and not reason.startswith(" (", m.end()):
        shown = vals if len(vals) <= 8 else dict(list(vals.items())[:8])
        return f"{reason[:m.end()]} ({describe_values(shown)}){reason[m.end():]}"
    return reason


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _dur(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:g}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g}h"
    return f"{seconds / 60:.3g}m"


class RuleEngine:
    """Evaluates the rules on each stored alert and records every verdict (an ``AlertSink``).

    ``clock(stored) -> datetime`` gives "now" for an alert: wall time in the
    daemon, the alert's own time in back-tests. ``kill_switch``: while this
    file exists (or ``enabled`` is False) rules are still evaluated and
    recorded, but nothing fires ("limited: kill switch").
    """

    def __init__(self, rules: RuleSet | Sequence[Rule], *, facility_kinds: Mapping[str, str] | None = None,
                 features: Mapping[str, FeatureFn] | None = None,
                 clock: Callable[[Any], datetime] | None = None, kill_switch: str | Path | None = None,
                 enabled: bool = True, as_of: bool = False, assume_old_tags: bool = False):
        self.ruleset = rules if isinstance(rules, RuleSet) else RuleSet.of(rules)
        self.facility_kinds = dict(facility_kinds or {})
        self.features = dict(features or {})
        self.clock = clock or (lambda stored: datetime.now(timezone.utc))
        self.kill_switch = Path(kill_switch) if kill_switch else None
        self.enabled = enabled
        # Back-tests: each alert sees only the tags, list memberships and extras keys added or set at or
        # before its "now" (added_at, targets.extras_set_at); those of unknown time (from before tomd kept
        # it) only with assume_old_tags. The daemon's "now" is the wall clock, after every row it can
        # read, so it skips the filter.
        self.as_of = as_of
        self.assume_old_tags = assume_old_tags
        self.counts: dict[str, int] = {}  # verdicts by outcome since start (metrics)
        self.last_verdicts: Sequence[Verdict] = []
        self._lock = threading.Lock()
        # Told once the batch's transaction commits (a rolled-back batch is told nothing):
        # observer(verdicts, seconds spent on each alert). Metrics plug in here.
        self.observer: Callable[[Sequence[Verdict], Sequence[float]], None] | None = None

    @classmethod
    def from_config(cls, config, *, features: Mapping[str, FeatureFn] | None = None,
                    kill_switch: str | Path | None = None, clock=None) -> "RuleEngine":
        """Rules from ``config.rules.paths``, hot-reloaded; facilities and channels from the config.

        Feature functions come from ``config.rules.features`` ({name: "module:function"}) when
        that field exists, else from ``features``; the kill switch from
        ``config.rules.kill_switch`` (a file path) or ``kill_switch``, and
        ``config.rules.enabled`` when present.
        """
        rc = config.rules
        if features is None:
            features = load_features(getattr(rc, "features", None) or {})
        env = RuleEnv.from_config(config, features.keys())
        ks = getattr(rc, "kill_switch", None) or kill_switch
        return cls(RuleSet(rc.paths, env), facility_kinds=env.facility_kinds, features=features, clock=clock,
                   kill_switch=ks, enabled=getattr(rc, "enabled", True))

    # -- the AlertSink -------------------------------------------------

    def __call__(self, s: Session, stored: Sequence[Any]) -> None:
        rules = self.ruleset.current()
        verdicts = Verdicts()
        kept = verdicts.items
        if not rules or not stored:
            return
        killed = self.killed()
        tids = sorted({st.target_id for st in stored if st.target_id is not None})
        rows, names, tags, lists, phot = repo.rule_context_rows(s, tids, timed=self.as_of)
        set_at = repo.extras_set_at_of(s, tids) if self.as_of else {}  # the daemon does not read it
        buffered: list[tuple] = []  # decision rows, repo.DECISION_COLUMNS
        observer = self.observer
        seconds: list[float] = []
        fired: list[tuple[Verdict, Any]] = []
        for st in stored:
            t0 = time.perf_counter()
            now = _utc(self.clock(st))
            t_tags, t_lists = tags.get(st.target_id, ()), lists.get(st.target_id, ())
            row = rows.get(st.target_id)
            if self.as_of:
                t_tags, t_lists = self.as_of_now(t_tags, now), self.as_of_now(t_lists, now)
                row = self.extras_as_of(row, set_at.get(st.target_id), now)
            ctx = self.context(st, row, names.get(st.target_id, ()), t_tags, t_lists,
                               phot.get(st.target_id, ()), now)
            for rule in rules:
                if not rule.listens_to(st.alert.source, st.alert.kind, getattr(st, "stream", None)):
                    continue
                v = self.verdict(s, rule, st, ctx, now, killed, buffered)
                kept.append(v)
                if type(v) is Verdict and v.outcome == "fired":
                    fired.append((v, st))
            seconds.append(time.perf_counter() - t0)
        repo.insert_decisions(s, buffered)
        if observer is not None or fired:
            from sqlalchemy import event

            if observer is not None:
                event.listen(s, "after_commit", lambda _s: observer(verdicts, seconds), once=True)
            if fired:  # said once the decisions are committed (a batch retried would say it twice)
                event.listen(s, "after_commit", lambda _s: _log_fired(fired), once=True)
        with self._lock:  # several stream threads may share one engine
            for o in verdicts.outcomes():
                self.counts[o] = self.counts.get(o, 0) + 1
        self.last_verdicts = verdicts  # the latest batch's, for tests and tools

    def as_of_now(self, timed: Sequence[tuple[str, datetime | None]], now: datetime) -> list[str]:
        """The names of ``(name, added_at)`` pairs that stood at ``now``."""
        return [n for n, at in timed if (self.assume_old_tags if at is None else _utc(at) <= now)]

    def extras_as_of(self, row: Mapping[str, Any] | None, set_at: Mapping[str, str] | None,
                     now: datetime) -> Mapping[str, Any] | None:
        """The target row with only the extras set at or before ``now`` (``set_at``: the target's
        ``extras_set_at``, {key: ISO time}); keys of unknown time (none recorded: set before schema
        0009) only with ``assume_old_tags``.

        Only the latest setting of a key has a time: a key changed after ``now`` is left out, not
        shown with the value it had then (which is not kept)."""
        if row is None or not row.get("extras"):
            return row
        set_at = set_at or {}
        kept = {}
        for k, v in row["extras"].items():
            at = set_at.get(k)
            if self.assume_old_tags if at is None else _utc(datetime.fromisoformat(at)) <= now:
                kept[k] = v
        return {**row, "extras": kept}

    def killed(self) -> str | None:
        if not self.enabled:
            return "kill switch: rules.enabled is false"
        if self.kill_switch is not None and self.kill_switch.exists():
            return f"kill switch: {self.kill_switch} exists"
        return None

    def context(self, st, row, names, tags, lists, points, now: datetime) -> Context:
        now_mjd = mjd_of(now)
        # Rows (mjd, band, kind, mag, limit): TargetView makes its Points on first use.
        target = TargetView(row, names=names, tags=tags, lists=lists, points=points, now_mjd=now_mjd)
        return Context(AlertView(st.alert, st.alert_id), target, now_mjd, facility_kinds=self.facility_kinds,
                       features=self.features)

    # -- one rule on one alert ----------------------------------------

    def decide(self, s: Session, rule: Rule, st, ctx: Context, now: datetime, killed: str | None,
               buffered: list[tuple]) -> Verdict:
        """One rule's verdict on one alert, its decision row appended to ``buffered``."""
        v = self.verdict(s, rule, st, ctx, now, killed, buffered)
        return v if type(v) is Verdict else Verdict.of_row(v)

    def verdict(self, s: Session, rule: Rule, st, ctx: Context, now: datetime, killed: str | None,
                buffered: list[tuple]) -> Verdict | tuple:
        """:meth:`decide`, as ``__call__`` runs it: a not-fired verdict from the rule's expression is
        returned as its decision row (the tuple appended to ``buffered``; ``Verdict.of_row`` makes
        the Verdict), which a batch keeps at no cost to the garbage collector (``Verdicts``)."""
        w = rule.when
        args = ctx.argv
        # Most verdicts are "not fired", once per rule and alert, so that path is one generated call
        # (Compiled.judge: the first false clause's reason, "<clause> is false", made once, and the
        # values it read, JSON-safe) and a flat row tuple (repo.DECISION_COLUMNS, compact: the texts
        # read in place of details, then the clause, its line and the values). The stored row stays
        # compact too: the reason is the clause and the values go in details, written out only when
        # read (full_reason; tomd rule explain). bench/rules.py: per_rule_per_alert_us.
        judge = w.judge
        try:
            if judge is None:
                raise LookupError  # a Compiled made without it: the steps one by one below
            r = judge(*args)
        except Exception:  # noqa: BLE001 - a clause raised (an error verdict) or a value shown did
            try:
                i = w.safe(*args)  # Compiled.first_false, without its frame
            except Exception as exc:  # noqa: BLE001 - a rule's error is its verdict, never the batch's
                return self._error(rule, st, ctx, now, exc, buffered)
            if i < 0:
                r = None
            else:
                clause = w.clauses[i]
                vals = json_leaves(clause.leaves, *args)
                r = (clause.false_text, tuple(vals), i, clause.line, *vals.values())
        if r is not None:
            row = (st.alert_id, st.target_id, rule.name, rule.version, "not_fired", now) + r
            buffered.append(row)
            return row
        return self._all_true(s, rule, st, ctx, args, now, killed, buffered)

    @staticmethod
    def _record(rule: Rule, st, now: datetime, v: Verdict, buffered: list[tuple]) -> Verdict:
        """Buffer a verdict's row (written with the batch's others); details' values are JSON-safe already."""
        d = v.details
        if len(d) != 1 or "values" not in d:  # only the values (JSON-safe as read): the dict as it is
            d = {k: x if k == "values" else _jsonable(x) for k, x in d.items()}
        buffered.append((st.alert_id, st.target_id, rule.name, rule.version, v.outcome, now, v.reason[:4000], d))
        return v

    def _error(self, rule: Rule, st, ctx: Context, now: datetime, exc: Exception,
               buffered: list[tuple]) -> Verdict:
        w = rule.when
        log.warning("rule %s failed on alert %s (%s): %s", rule.name, st.alert_id, st.coords, exc,
                    extra=alert_fields(st, rule=rule.name))
        where = w.failing_clause(*ctx.args())
        details: dict[str, Any] = {"error": exc.__class__.__name__}
        reason = f"{exc.__class__.__name__}: {exc}"
        if where is not None:
            c = w.clauses[where]
            vals = w.values(where, *ctx.args())
            details.update(clause=where, line=c.line, values=_jsonable(vals))
            reason = f"{c.source} raised {reason}" + (f" ({describe_values(vals)})" if vals else "")
        return self._record(rule, st, now, Verdict(rule.name, "error", reason[:2000], details), buffered)

    def _all_true(self, s: Session, rule: Rule, st, ctx: Context, args, now: datetime, killed: str | None,
                  buffered: list[tuple]) -> Verdict:
        """Every clause holds: visibility, target, limits, duplicates, hours, then fire (or test).

        The reason kept for the verdicts that stop on the way is the compact "all N clauses true"
        (made once per rule) with the values in details, spelled out when read (full_reason); only a
        firing or a test rule's "would fire", which go to people as they are, spell them out here.
        """
        w = rule.when
        details: dict[str, Any] = {"values": w.all_json_values(*args)}
        why = w.all_true_text
        ob = rule.observe
        try:
            if ob is not None and ob.visible is not None:
                vis = ctx.visibility(ob.facility, ob.window_hours, **ob.visible)
                details["visibility"] = vis.as_dict()
                if not vis.visible:
                    return self._record(rule, st, now, Verdict(
                        rule.name, "not_fired", f"not visible from {ob.facility} within {ob.window_hours:g}h: "
                        f"{vis.reason}", details), buffered)
            needs_target = ob is not None or rule.add_tags or rule.add_to_lists
            if needs_target and st.target_id is None:
                return self._record(rule, st, now, Verdict(
                    rule.name, "not_fired", f"{why}, but the alert has no target (localisation too large?) to "
                    "act on", details), buffered)
            test = rule.mode == "test"
            if ob is not None:
                repo.lock_target_requests(s, st.target_id)  # two daemons: one request, not two
            limit = None if test else killed
            limit = limit or self.limit(s, rule, st, now, test)
            pending = None
            if not limit and ob is not None:
                pending = repo.pending_request_like(s, st.target_id, ob.facility, ob.template_key)
            base = {"alert_id": st.alert_id, "target_id": st.target_id, "rule": rule.name,
                    "rule_version": rule.version, "created_at": now}

            def record_later(v: Verdict) -> Verdict:
                return self._record(rule, st, now, v, buffered)

            if pending is not None:  # before the hours: raising a priority asks for no more time
                return self._duplicate(s, rule, st, pending, details, base, why, test, record_later)
            limit = limit or self.hours_limit(s, rule, now)
            if limit:
                if test:
                    return record_later(Verdict(rule.name, "test", f"would be limited: {limit}; {why}", details))
                return record_later(Verdict(rule.name, "limited", f"{limit}; {why}", details))
            why = full_reason(why, details)  # said to people as it is: the values spelled out
            if test:
                return self._test(s, rule, st, why, details, base)
            if ob is not None:
                # The submitter reads inline templates ("inline:<hash>") from here.
                details["observe"] = {"facility": ob.facility, "template": ob.template_key,
                                      "template_fields": dict(ob.template), "mode": ob.mode,
                                      "priority": ob.priority, "window_hours": ob.window_hours,
                                      "estimated_hours": ob.estimated_hours, "cadence": ob.cadence}
            return self._fire(s, rule, st, now, why, details, base)
        except DBAPIError:
            raise  # the database failed: the whole batch is retried
        except Exception as exc:  # noqa: BLE001
            log.warning("rule %s failed on alert %s (%s): %s", rule.name, st.alert_id, st.coords, exc,
                        extra=alert_fields(st, rule=rule.name))
            return self._record(rule, st, now, Verdict(rule.name, "error", f"{exc.__class__.__name__}: {exc}"[:2000],
                                                       details), buffered)

    def night(self, rule: Rule, now: datetime) -> tuple[datetime, str]:
        """The night a decision counts in (:func:`night_of` at the rule's facility, UTC without one)."""
        fac = rule.observe.facility if rule.observe is not None else None
        return night_of(now, facility_longitude(self.facility_kinds, fac))

    def limit(self, s: Session, rule: Rule, st, now: datetime, test: bool) -> str | None:
        """The cooldown or per-night limit that stops this firing, or None.

        A test rule is limited by its own earlier "would fire" verdicts, which
        are written as they are decided, so the limits hold inside one batch.
        """
        lim = rule.limits
        outcome, prefix = ("test", WOULD_FIRE) if test else ("fired", None)
        if lim.cooldown_s is not None and st.target_id is not None:
            last = repo.latest_decision_time(s, rule.name, outcome, target_id=st.target_id, reason_prefix=prefix)
            if last is not None and (now - last).total_seconds() < lim.cooldown_s:
                ago = (now - last).total_seconds()
                return (f"cooldown: fired for this target {_dur(ago)} ago ({last.isoformat(timespec='seconds')}), "
                        f"cooldown {_dur(lim.cooldown_s)}")
        if lim.per_night is not None:
            start, label = self.night(rule, now)
            n = repo.count_decisions_from(s, rule.name, outcome, start, reason_prefix=prefix)
            if n >= lim.per_night:
                return f"per_night: fired {n} times in the night of {label} (limit {lim.per_night})"
        return None

    def hours_limit(self, s: Session, rule: Rule, now: datetime) -> str | None:
        """hours_per_night: the estimated hours asked of the facility and proposal this night, by every rule."""
        lim, ob = rule.limits, rule.observe
        if lim.hours_per_night is None or ob is None:
            return None
        start, label = self.night(rule, now)
        used = repo.requested_hours_from(s, ob.facility, ob.proposal, start)
        if used + ob.estimated_hours > lim.hours_per_night + 1e-9:
            of = f"{ob.facility} (proposal {ob.proposal})" if ob.proposal else ob.facility
            return (f"hours_per_night: {used:.2f} h requested from {of} in the night of {label} "
                    f"+ {ob.estimated_hours:.2f} h > {lim.hours_per_night:g} h")
        return None

    def _test(self, s: Session, rule: Rule, st, why: str, details, base) -> Verdict:
        """A test rule would fire: record it now (its limits count it in this batch) and tell its channels."""
        ob = rule.observe
        plan = {"observe": {"facility": ob.facility, "template": ob.template_key, "mode": ob.mode,
                            "priority": ob.priority, "window_hours": ob.window_hours, "proposal": ob.proposal,
                            "estimated_hours": ob.estimated_hours, "cadence": ob.cadence} if ob else None,
                "notify": list(rule.notify), "add_tags": list(rule.add_tags),
                "add_to_lists": list(rule.add_to_lists)}
        details["would"] = plan
        reason = f"{WOULD_FIRE}: {why}"
        with s.begin_nested():
            decision_id = repo.insert_decision(s, {**base, "outcome": "test", "reason": reason,
                                                   "details": _jsonable(details)})
            repo.add_event(s, RuleTested(decision_id, rule.name, st.alert_id, st.target_id, reason, rule.notify,
                                         rule.notify_message, would=_jsonable(plan)), target_id=st.target_id)
        return Verdict(rule.name, "test", reason, details, decision_id)

    def _duplicate(self, s, rule: Rule, st, pending, details, base, why, test, record_later) -> Verdict:
        ob = rule.observe
        details["pending_request"] = {"id": pending.id, "state": pending.state, "priority": pending.priority}
        same = (f"request #{pending.id} ({pending.name}) for the same target, facility {ob.facility} and template "
                f"{ob.template_key} is still {pending.state}")
        higher = pending.priority is None or ob.priority > pending.priority
        # Only an intent's priority can still rise: once submitted, the facility holds the request, and the
        # LCO portal's request groups take create and cancel only (no PATCH of ipp_value), nor do the other
        # facilities tomd speaks offer a priority change. Cancel-and-resubmit is left to a human: the new
        # request could land later than the old one, and a cancel that fails leaves two (a doubled night).
        submitted = pending.state != "intent"
        if test:
            if not higher:
                what = "would submit nothing"
            elif submitted:
                what = f"would want priority {ob.priority} > {pending.priority}, {_CANNOT_RAISE}"
            else:
                what = f"would raise its priority {pending.priority} → {ob.priority}"
            return record_later(Verdict(rule.name, "test", f"would be deduplicated: {same}; {what}", details))
        if not higher:
            return record_later(Verdict(rule.name, "deduplicated", f"{same} with priority {pending.priority} "
                                        f">= {ob.priority}: nothing submitted", details))
        if submitted or not repo.raise_intent_priority(s, pending.id, ob.priority):
            state = pending.state if submitted else "claimed for submission"
            details["priority_not_raised"] = {"wanted": ob.priority, "state": state}
            log.warning("rule %s wants request #%s (%s) at priority %s > %s, but it is already %s: %s",
                        rule.name, pending.id, pending.name, ob.priority, pending.priority, state, _CANNOT_RAISE,
                        extra=alert_fields(st, rule=rule.name, request_id=pending.id))
            return record_later(Verdict(rule.name, "deduplicated", f"{same}: wanted priority {ob.priority} > "
                                        f"{pending.priority}, {_CANNOT_RAISE}", details))
        reason = f"{same}: its priority raised {pending.priority} → {ob.priority} (before submission)"
        decision_id = repo.insert_decision(s, {**base, "outcome": "deduplicated", "reason": reason,
                                               "details": _jsonable(details)})
        repo.add_event(s, RequestPriorityRaised(pending.id, decision_id, rule.name, pending.priority, ob.priority,
                                                pending.state), target_id=st.target_id)
        return Verdict(rule.name, "deduplicated", reason, details, decision_id, pending.id)

    def _fire(self, s: Session, rule: Rule, st, now: datetime, why: str, details, base) -> Verdict:
        ob = rule.observe
        request_id = None
        with s.begin_nested():  # decision, intent, tags, lists and events: all or none
            decision_id = repo.insert_decision(s, {**base, "outcome": "fired", "reason": why,
                                                   "details": _jsonable(details)})
            if ob is not None:
                name = f"tomd-{decision_id}-{secrets.token_hex(4)}"
                end = now + timedelta(hours=ob.window_hours)
                request_id = repo.insert_request(s, {
                    "name": name, "decision_id": decision_id, "target_id": st.target_id, "facility": ob.facility,
                    "template": ob.template_key, "mode": ob.mode, "priority": ob.priority, "window_start": now,
                    "window_end": end, "state": "intent", "request": {}, "estimated_hours": ob.estimated_hours,
                    "attempts": 0, "created_at": now, "updated_at": now, "cadence": ob.cadence,
                    "proposal": ob.proposal,
                })
                repo.add_event(s, SubmissionIntent(request_id, decision_id, name, rule.name, st.target_id, ob.facility,
                                                   ob.template_key, ob.mode, ob.priority, now.isoformat(),
                                                   end.isoformat(), ob.estimated_hours), target_id=st.target_id)
            # Stamped with the rule's "now" (the wall clock in the daemon, the alert's time in a back-test).
            tags = repo.add_tags_at(s, st.target_id, rule.add_tags, now) if rule.add_tags else []
            lists = repo.add_to_lists_at(s, st.target_id, rule.add_to_lists, now) if rule.add_to_lists else []
            repo.add_event(s, RuleFired(decision_id, rule.name, st.alert_id, st.target_id, why, rule.notify,
                                        rule.notify_message, request_id, tuple(tags), tuple(lists)),
                           target_id=st.target_id)
        return Verdict(rule.name, "fired", why, details, decision_id, request_id)


#: Said (reason, log) when a submitted request cannot take a higher priority.
_CANNOT_RAISE = ("but it is already submitted and the facility offers no way to change a submitted request's "
                 "priority (LCO: request groups can only be created or cancelled); nothing submitted and the "
                 "request keeps its priority. Cancel and resubmit by hand if it matters")


def _log_fired(fired: Sequence[tuple[Verdict, Any]]) -> None:
    """One INFO line per committed firing, with the alert's ids and stream coordinates as fields."""
    for v, st in fired:
        log.info("rule %s fired on alert %s (%s)%s", v.rule, st.alert_id, st.coords,
                 f": request #{v.request_id} to submit" if v.request_id is not None else "",
                 extra=alert_fields(st, rule=v.rule, decision_id=v.decision_id, request_id=v.request_id))


def load_features(spec: Mapping[str, str]) -> dict[str, FeatureFn]:
    """{name: "module:function"} → {name: function}. Raises InputError naming the bad entry."""
    import importlib

    from tomd.errors import InputError

    out = {}
    for name, target in spec.items():
        mod, _, fn = str(target).partition(":")
        if not mod or not fn:
            raise InputError(f'expected "module:function", got {target!r}', field=f"rules.features.{name}")
        try:
            out[name] = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"cannot load {target}: {exc}", field=f"rules.features.{name}") from None
    return out
