"""Rule files (TOML) → validated :class:`Rule` objects.

Every problem is reported, all at once, as ``FILE:LINE:COL: message``, with
the line inside the file (an error inside a multi-line ``when`` points at
the line and column of the offending word). See docs/rules.md for the format.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomd.rules.expr import Compiled, ExprError, compile_expression

MODES = ("active", "test")
OBSERVE_MODES = ("NORMAL", "RAPID_RESPONSE", "TIME_CRITICAL")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")


# ------------------------------------------------------------- the rule --

@dataclass(frozen=True)
class Observe:
    facility: str
    template_name: str | None  # a template of the facility's config, or None when inline
    template: Mapping[str, Any]
    mode: str = "NORMAL"
    window_hours: float = 24.0
    priority: float = 1.0
    visible: Mapping[str, float] | None = None  # gate: observable within the window
    estimated_hours: float = 0.0
    cadence: Mapping[str, Any] | None = None  # a series (tomd.cadence), as stored on the first request
    proposal: str | None = None  # the template's proposal, else the facility's (hours are counted per proposal)

    @property
    def template_key(self) -> str:
        """What makes two requests 'the same template' for duplicate detection."""
        return self.template_name or "inline:" + hashlib.sha256(repr(sorted(self.template.items())).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Limits:
    cooldown_s: float | None = None  # per target: since this rule last fired for it
    per_night: int | None = None  # firings of this rule in the night of the decision (tomd.rules.engine.night_of)
    hours_per_night: float | None = None  # estimated hours asked of the facility AND proposal that night (all rules)


@dataclass(frozen=True)
class Rule:
    name: str
    when: Compiled
    file: str = "<string>"
    line: int = 1
    description: str = ""
    mode: str = "active"  # active | test
    sources: tuple[str, ...] = ()  # alert.source values listened to; empty: all
    kinds: tuple[str, ...] = ()  # alert.kind values (transient, localization, ...); empty: all
    streams: tuple[str, ...] = ()  # [[streams]] names the alert arrived on; empty: all
    observe: Observe | None = None
    notify: tuple[str, ...] = ()
    notify_message: str = ""
    add_tags: tuple[str, ...] = ()
    add_to_lists: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    version: str = ""  # hash of the file's bytes

    def listens_to(self, source: str, kind: str, stream: str | None = None) -> bool:
        """Every selector given must match (an empty one matches all).

        A rule that names streams does not listen to an alert of unknown
        stream (None): it cannot tell that alert came from one of them.
        """
        return ((not self.sources or source in self.sources) and (not self.kinds or kind in self.kinds)
                and (not self.streams or stream in self.streams))


# --------------------------------------------------------- environment --

@dataclass(frozen=True)
class RuleEnv:
    """What rules are checked against: facilities (kind, templates), channels, features."""

    facilities: Mapping[str, tuple[str, Mapping[str, Mapping[str, Any]]]] = field(default_factory=dict)
    channels: frozenset[str] | None = None  # None: not checked
    features: frozenset[str] = frozenset()
    # Where a facility's sites depend on more than its kind (a Gemini program is at one site).
    site_keys: Mapping[str, str] = field(default_factory=dict)
    proposals: Mapping[str, str | None] = field(default_factory=dict)  # facility → its config proposal
    sources: frozenset[str] | None = None  # alert sources a rule may listen to; None: KNOWN_SOURCES
    streams: frozenset[str] | None = None  # [[streams]] names of the config; None: not checked (no config)

    @classmethod
    def from_config(cls, config, features: Iterable[str] | None = None) -> "RuleEnv":
        facs = {name: (f.kind, dict(f.templates) or (_sim_templates() if f.kind == "sim" else {}))
                for name, f in config.facilities.items()}
        channels = frozenset(config.notify.channels)
        if features is None:
            features = (getattr(config.rules, "features", None) or {}).keys()
        # The embedded defaults (no config file) have no streams, yet the daemon a rule is written for
        # will: names are checked only against a config that was read, or one that has streams.
        streams = (frozenset(st.name for st in config.streams)
                   if getattr(config, "source", None) is not None or config.streams else None)
        return cls(facs, channels, frozenset(features), _site_keys(config),
                   {name: f.proposal for name, f in config.facilities.items()}, streams=streams)

    @property
    def facility_kinds(self) -> dict[str, str]:
        """Facility name → the key of its sites in ``tomd.visibility.FACILITY_SITES``."""
        return {n: self.site_keys.get(n, k) for n, (k, _) in self.facilities.items()}


def known_sources() -> frozenset[str]:
    """The ``alert.source`` values tomd's parsers produce (each format module's default source)."""
    import inspect

    from tomd.alerts import formats

    out = {"alerce", "tns"}  # the broker APIs' parsers name theirs inline
    for mod in (formats.antares, formats.fink, formats.gcn_binary, formats.gcn_json, formats.hop, formats.lasair,
                formats.lvk, formats.rubin, formats.voevent, formats.ztf):
        p = inspect.signature(mod.parse).parameters.get("source")
        if p is not None and isinstance(p.default, str):
            out.add(p.default)
    return frozenset(out)


KNOWN_SOURCES = known_sources()


def _site_keys(config) -> dict[str, str]:
    from tomd.facilities.gemini import program_site

    out = {}
    for name, f in config.facilities.items():
        if f.kind == "gemini":
            site = program_site(f.proposal or "")  # GN-2026B-Q-1 observes from Maunakea only
            if site:
                out[name] = f"gemini-{site.lower()}"
    return out


def _sim_templates() -> dict[str, Mapping[str, Any]]:
    """The simulated facility's built-in templates (used when the config gives it none)."""
    try:
        from tomd.facilities import SIM_TEMPLATES
    except ImportError:  # pragma: no cover - facilities not installed
        return {}
    return dict(SIM_TEMPLATES)


# -------------------------------------------------------------- loading --

class RuleFileError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def rule_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """The *.toml files under ``paths`` (files or directories), sorted; and problems (missing paths)."""
    files, problems = [], []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.toml") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or directory")
    return files, problems


def load_paths(paths: Iterable[str | Path], env: RuleEnv) -> tuple[list[Rule], list[str]]:
    """Every rule in ``paths``; problems as FILE:LINE:COL lines. Rules of a file with problems are left out."""
    files, problems = rule_files(paths)
    rules: list[Rule] = []
    seen: dict[str, Rule] = {}
    for f in files:
        r, probs = load_file(f, env)
        problems.extend(probs)
        if r is not None:
            if r.name in seen:
                o = seen[r.name]
                problems.append(f"{r.file}:{r.line}:1: rule name {r.name!r} is already used by {o.file}:{o.line}")
                continue
            seen[r.name] = r
            rules.append(r)
    return rules, problems


def load_file(path: str | Path, env: RuleEnv) -> tuple[Rule | None, list[str]]:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{path}:1:1: cannot read: {getattr(exc, 'strerror', None) or exc}"]
    return parse_rule(text, str(path), env)


_TOP = {"name", "description", "mode", "sources", "kinds", "streams", "when", "add_tags", "add_to_lists",
        "observe", "notify", "limits"}
_OBSERVE = {"facility", "template", "mode", "window", "priority", "visible", "cadence"}
_VISIBLE = {"max_airmass", "min_moon_deg", "max_sun_alt"}
_NOTIFY = {"channels", "message"}
_LIMITS = {"cooldown", "per_night", "hours_per_night"}


def parse_rule(text: str, file: str, env: RuleEnv) -> tuple[Rule | None, list[str]]:
    """Check one rule file's text; (rule or None, problems)."""
    pos = _Positions(text)
    problems: list[str] = []

    def bad(path: tuple, message: str, line: int | None = None, col: int | None = None) -> None:
        ln, cl = pos.of(path)
        problems.append(f"{file}:{line or ln}:{col or cl}: {'.'.join(map(str, path))}: {message}"
                        if path else f"{file}:{line or ln}:{col or cl}: {message}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line, col = (m.group(1), m.group(2)) if m else ("1", "1")
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        return None, [f"{file}:{line}:{col}: TOML syntax: {msg}"]
    except (RecursionError, MemoryError):  # tomllib recurses per nested array or table
        return None, [f"{file}:1:1: TOML nested too deeply"]

    def unknown(table: Mapping, allowed: set[str], prefix: tuple) -> None:
        for k in table:
            if k not in allowed:
                hint = difflib.get_close_matches(k, list(allowed), n=1, cutoff=0.6)
                bad(prefix + (k,), "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; expected one of {', '.join(sorted(allowed))}")

    def get(table: Mapping, key: str, types: tuple, what: str, prefix: tuple = (), default: Any = None,
            required: bool = False) -> Any:
        if key not in table:
            if required:
                bad(prefix + (key,), f"missing required key; expected {what}")
            return default
        v = table[key]
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            bad(prefix + (key,), f"expected {what}, got {_show(v)}")
            return default
        return v

    def strings(table: Mapping, key: str, prefix: tuple = ()) -> tuple[str, ...]:
        v = get(table, key, (list,), "a list of strings", prefix, [])
        if not all(isinstance(x, str) and x for x in v):
            bad(prefix + (key,), f"expected a list of strings, got {_show(v)}")
            return ()
        return tuple(v)

    unknown(data, _TOP, ())
    name = get(data, "name", (str,), "a rule name (letters, digits, - _ .)", required=True)
    if name is not None and not _NAME.fullmatch(name):
        bad(("name",), f"expected letters, digits, - _ . (at most 200), got {_show(name)}")
        name = None
    description = get(data, "description", (str,), "a string", default="")
    mode = get(data, "mode", (str,), '"active" or "test"', default="active")
    if mode not in MODES:
        bad(("mode",), f'expected "active" or "test", got {_show(mode)}')
    sources = strings(data, "sources")
    known_src = env.sources if env.sources is not None else KNOWN_SOURCES
    for src in sources:
        if src not in known_src:
            hint = difflib.get_close_matches(src, list(known_src), n=1, cutoff=0.6)
            bad(("sources",), f"unknown alert source {src!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; known: {', '.join(sorted(known_src))}")
    kinds = strings(data, "kinds")
    for k in kinds:
        if k not in ("transient", "localization", "solar_system"):
            bad(("kinds",), f"unknown alert kind {k!r}; expected transient, localization or solar_system")
    streams = strings(data, "streams")
    if env.streams is not None:
        for st in streams:
            if st not in env.streams:
                hint = difflib.get_close_matches(st, list(env.streams), n=1, cutoff=0.6)
                line, col = pos.item(("streams",), st)
                bad((), f"streams: unknown stream {st!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; known: {', '.join(sorted(env.streams)) or 'none configured'} ([[streams]] names "
                    "of the config)", line, col)
    add_tags = strings(data, "add_tags")
    add_lists = strings(data, "add_to_lists")

    when_text = get(data, "when", (str,), "an expression (see docs/rules.md)", required=True)
    compiled = None
    if when_text is not None:
        errors: list[ExprError] = []
        try:
            compiled = compile_expression(when_text, sorted(env.features))
        except ExprError as exc:
            errors.extend(exc.all)
        if not any(e.message.startswith(("syntax error", "expression nested", "cannot parse", "expression too"))
                   for e in errors):
            try:
                _check_calls(when_text, env)  # facilities named in visible()/airmass(), even beside other errors
            except ExprError as exc:
                errors.extend(exc.all)
        if errors:
            compiled = None
            for e in sorted(errors, key=lambda e: (e.line, e.col)):  # each unknown name, field, function, facility
                line, col = pos.in_string(("when",), e.line, e.col)
                bad((), f"when: {e.message}", line, col)

    observe = None
    if "observe" in data:
        ob = data["observe"]
        if not isinstance(ob, dict):
            bad(("observe",), "expected a table [observe]")
        else:
            observe = _observe(ob, env, bad, get, unknown)
    notify: tuple[str, ...] = ()
    message = ""
    if "notify" in data:
        nt = data["notify"]
        if not isinstance(nt, dict):
            bad(("notify",), "expected a table [notify]")
        else:
            unknown(nt, _NOTIFY, ("notify",))
            notify = strings(nt, "channels", ("notify",))
            message = get(nt, "message", (str,), "a string", ("notify",), "")
            if env.channels is not None:
                for c in notify:
                    if c not in env.channels:
                        known = ", ".join(sorted(env.channels)) or "none configured"
                        bad(("notify", "channels"), f"unknown channel {c!r}; known: {known}")
    limits = Limits()
    if "limits" in data:
        lt = data["limits"]
        if not isinstance(lt, dict):
            bad(("limits",), "expected a table [limits]")
        else:
            unknown(lt, _LIMITS, ("limits",))
            cooldown = None
            if "cooldown" in lt:
                cooldown = _duration(lt["cooldown"])
                if cooldown is None:
                    bad(("limits", "cooldown"), f'expected a duration like "12h" or "2d", got {_show(lt["cooldown"])}')
            per_night = get(lt, "per_night", (int,), "a whole number >= 1", ("limits",))
            if per_night is not None and per_night < 1:
                bad(("limits", "per_night"), f"expected a whole number >= 1, got {per_night}")
            hours = get(lt, "hours_per_night", (int, float), "a number of hours > 0", ("limits",))
            if hours is not None and not hours > 0:
                bad(("limits", "hours_per_night"), f"expected a number of hours > 0, got {hours}")
            if hours is not None and "observe" not in data:  # a broken [observe] is reported already
                bad(("limits", "hours_per_night"), "needs an [observe] action (hours are counted per facility)")
            limits = Limits(cooldown, per_night, float(hours) if hours is not None else None)
    if "observe" not in data and not notify and not add_tags and not add_lists and mode == "active":
        bad((), "the rule does nothing when it fires: add [observe], [notify], add_tags or add_to_lists",
            pos.of(("name",))[0], 1)

    if problems or compiled is None or name is None:
        return None, problems
    return Rule(name=name, when=compiled, file=file, line=pos.of(("name",))[0], description=description,
                mode=mode, sources=sources, kinds=kinds, streams=streams, observe=observe, notify=notify,
                notify_message=message, add_tags=add_tags, add_to_lists=add_lists, limits=limits,
                version=hashlib.sha256(text.encode()).hexdigest()[:16]), []


def _observe(ob: Mapping, env: RuleEnv, bad, get, unknown) -> Observe | None:
    p = ("observe",)
    unknown(ob, _OBSERVE, p)
    facility = get(ob, "facility", (str,), "a facility name from the config", p, required=True)
    kind, templates = None, {}
    if facility is not None:
        if facility not in env.facilities:
            known = ", ".join(sorted(env.facilities)) or "none configured"
            bad(p + ("facility",), f"unknown facility {facility!r}; configured: {known}")
            facility = None
        else:
            kind, templates = env.facilities[facility]
    tname, template = None, None
    if "template" not in ob:
        bad(p + ("template",), "missing required key; expected a template name or an inline table")
    elif isinstance(ob["template"], str):
        tname = ob["template"]
        if facility is not None:
            if tname in templates:
                template = dict(templates[tname])
            else:
                known = ", ".join(sorted(templates)) or "none"
                bad(p + ("template",), f"unknown template {tname!r} for facility {facility!r}; "
                                       f"its templates: {known} (facilities.{facility}.templates in the config)")
    elif isinstance(ob["template"], dict):
        template = dict(ob["template"])
    else:
        bad(p + ("template",), f"expected a template name or an inline table, got {_show(ob['template'])}")
    mode = get(ob, "mode", (str,), "NORMAL, RAPID_RESPONSE or TIME_CRITICAL", p, "NORMAL")
    if mode not in OBSERVE_MODES:
        bad(p + ("mode",), f"expected NORMAL, RAPID_RESPONSE or TIME_CRITICAL, got {_show(mode)}")
    window_h = 24.0
    if "window" in ob:
        w = _duration(ob["window"])
        if w is None:
            bad(p + ("window",), f'expected a duration like "24h" or "3d", got {_show(ob["window"])}')
        else:
            window_h = w / 3600.0
    priority = get(ob, "priority", (int, float), "a number (higher is more urgent)", p, 1.0)
    visible = None
    if "visible" in ob:
        v = ob["visible"]
        if not isinstance(v, dict):
            bad(p + ("visible",), "expected a table like { max_airmass = 1.8, min_moon_deg = 30 }")
        else:
            unknown(v, _VISIBLE, p + ("visible",))
            visible = {}
            for k, lo, hi in (("max_airmass", 1.0, 10.0), ("min_moon_deg", 0.0, 180.0), ("max_sun_alt", -90.0, 0.0)):
                if k in v:
                    x = v[k]
                    if isinstance(x, bool) or not isinstance(x, (int, float)) or not lo <= x <= hi:
                        bad(p + ("visible", k), f"expected a number in [{lo:g}, {hi:g}], got {_show(x)}")
                    else:
                        visible[k] = float(x)
            if kind is not None and not _has_sites(kind):
                bad(p + ("visible",), f"no site table for facility kind {kind!r}: visibility cannot be checked")
            if window_h > _max_window_hours() + 1e-9:  # the gate computes visibility over the whole window
                bad(p + ("window",), f"with visible, at most {_max_window()}, the visibility window's maximum; "
                                     f"got {window_h:g} h")
    cadence = None
    if "cadence" in ob:
        from tomd.cadence import CadenceError, cadence_from_table, initial, parse_cadence

        c = ob["cadence"]
        try:
            if isinstance(c, str):
                cadence = initial(parse_cadence(c))
            elif isinstance(c, dict):
                cadence = initial(cadence_from_table(c))
            else:
                bad(p + ("cadence",), f'expected words like "every 1d x5" or a table like '
                                      f'{{ every = "1d", count = 5 }}, got {_show(c)}')
        except CadenceError as exc:
            where = p + ("cadence",) + ((exc.key,) if isinstance(c, dict) and exc.key in c else ())
            bad(where, str(exc))
    if facility is None or template is None:
        return None
    hours = estimate_hours(template)
    proposal = template.get("proposal") if isinstance(template.get("proposal"), str) else None
    proposal = proposal or env.proposals.get(facility)
    return Observe(facility, tname, template, mode, window_h, float(priority), visible, hours, cadence, proposal)


def _max_window_hours() -> float:
    from tomd.visibility import MAX_WINDOW_HOURS

    return MAX_WINDOW_HOURS


def _max_window() -> str:
    from tomd.visibility import MAX_WINDOW_DAYS

    return f"{_max_window_hours():g} h ({MAX_WINDOW_DAYS} days)"


def _has_sites(kind: str) -> bool:
    from tomd.visibility import FACILITY_SITES

    return kind in FACILITY_SITES


def _check_calls(text: str, env: RuleEnv) -> None:
    """Facility names given to visible()/airmass() as constants must be configured, and a literal
    ``hours=`` window must be a number within the visibility window's maximum (bounded work; a value
    computed at run time is clamped there, by tomd.visibility)."""
    import ast

    tree = ast.parse("(\n" + text + "\n)", mode="eval")
    from tomd.visibility import FACILITY_SITES, SITES

    problems: list[ExprError] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("visible", "airmass") and n.args:
            a = n.args[0]
            if isinstance(a, ast.Constant) and isinstance(a.value, str):
                kind = env.facility_kinds.get(a.value, a.value)
                if kind == "swift":
                    problems.append(ExprError(f"{n.func.id}(): {a.value!r} observes from orbit; ground visibility "
                                              "does not apply", max(1, a.lineno - 1), a.col_offset + 1))
                elif kind not in FACILITY_SITES and kind not in SITES:
                    known = ", ".join(sorted(env.facilities)) or "none configured"
                    problems.append(ExprError(f"{n.func.id}(): unknown facility {a.value!r} (configured: {known}; "
                                              f"or a site code: {', '.join(SITES)})", max(1, a.lineno - 1),
                                              a.col_offset + 1))
            elif not isinstance(a, ast.Constant) or not isinstance(a.value, str):
                problems.append(ExprError(f"{n.func.id}(): the facility must be a quoted name", max(1, a.lineno - 1),
                                          a.col_offset + 1))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("visible", "airmass"):
            for kw in n.keywords:
                if kw.arg != "hours":
                    continue
                v = _literal(kw.value)
                where = (max(1, kw.value.lineno - 1), kw.value.col_offset + 1)
                if v is _NOT_LITERAL:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    problems.append(ExprError(f"{n.func.id}(): hours must be a number of hours > 0, got {v!r}",
                                              *where))
                elif v > _max_window_hours() + 1e-9:
                    problems.append(ExprError(f"{n.func.id}(): hours={v:g} is beyond the visibility window's "
                                              f"maximum, {_max_window()}", *where))
    if problems:
        raise ExprError.of(problems)


_NOT_LITERAL = object()


def _literal(node) -> Any:
    """The value of a constant expression (``336``, ``-1``, ``24 * 30``, ``"2d"``), else _NOT_LITERAL.

    Only numbers with + - * / ** and a sign are folded, in floats: an overflow or a division by zero
    is left to run time (which clamps the window anyway)."""
    import ast
    import operator

    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
        return _NOT_LITERAL
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        a, b = _literal(node.left), _literal(node.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            try:
                r = ops[type(node.op)](float(a), float(b))
            except (OverflowError, ZeroDivisionError, ValueError):
                return _NOT_LITERAL
            return r if isinstance(r, float) else _NOT_LITERAL  # (-8) ** 0.5 is complex
        return _NOT_LITERAL
    return _NOT_LITERAL


# ------------------------------------------------------------ estimates --

#: Default overheads when a template does not give its own (seconds).
SETUP_S = 120.0  # slew, acquisition
READOUT_S = 20.0  # per exposure
FILTER_CHANGE_S = 10.0  # per configuration after the first


def estimate_hours(template: Mapping[str, Any]) -> float:
    """Telescope time a template asks for: exposures × (time + readout) + setup + filter changes.

    Understands ``exposure_time``, ``exposure_count`` (default 1) and
    ``filters`` (each filter takes exposure_count exposures), or
    ``configurations = [{exposure_time, exposure_count, filters}]``; the
    template may set ``overhead_s`` (setup), ``readout_s`` and ``hours``
    (an explicit estimate that wins).
    """
    if isinstance(template.get("hours"), (int, float)):
        return float(template["hours"])
    readout = float(template.get("readout_s", READOUT_S))
    confs = template.get("configurations")
    if not isinstance(confs, list) or not confs:
        confs = [template]
    total, n_conf = 0.0, 0
    for c in confs:
        if not isinstance(c, Mapping):
            continue
        t = c.get("exposure_time", template.get("exposure_time", 0.0))
        n = c.get("exposure_count", template.get("exposure_count", 1))
        filters = c.get("filters", template.get("filters"))
        n_filters = len(filters) if isinstance(filters, list) and filters else 1
        t = float(t) if isinstance(t, (int, float)) else 0.0
        n = int(n) if isinstance(n, (int, float)) else 1
        total += n_filters * n * (t + readout)
        n_conf += n_filters
    total += float(template.get("overhead_s", SETUP_S)) + FILTER_CHANGE_S * max(0, n_conf - 1)
    return total / 3600.0


# -------------------------------------------------------------- helpers --

def _duration(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) * 3600.0 if v > 0 else None  # a bare number is hours
    if isinstance(v, str) and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:s|m|h|d))+", v.strip()):
        secs = sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u]
                   for n, u in re.findall(r"(\d+(?:\.\d+)?)(s|m|h|d)", v.strip()))
        return secs if secs > 0 else None
    return None


def _show(v: Any) -> str:
    r = repr(v) if not isinstance(v, str) else f'"{v}"'
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)
    return f"{kind} {r[:60]}"


class _Positions:
    """Where keys are in a TOML text (line, column of the value), found by a light scan.

    tomllib gives values only; this scan knows tables (``[observe]``), keys
    and multi-line strings, which is all a rule file needs for positions.
    """

    _HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\s*(#.*)?$")
    _KEY = re.compile(r"^(\s*)([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=\s*")

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.keys: dict[tuple, tuple[int, int]] = {}  # (line, column of the key)
        self.values: dict[tuple, tuple[int, int]] = {}  # (line, column of the value)
        self.tables: dict[tuple, int] = {}
        table: tuple = ()
        in_ml: str | None = None
        for i, line in enumerate(self.lines, 1):
            if in_ml:
                if line.count(in_ml) % 2 == 1:
                    in_ml = None
                continue
            h = self._HEADER.match(line)
            if h:
                table = tuple(p.strip().strip('"') for p in h.group(1).split("."))
                self.tables.setdefault(table, i)
                continue
            m = self._KEY.match(line)
            if not m:
                continue
            key = m.group(2).strip('"')
            self.keys.setdefault(table + (key,), (i, len(m.group(1)) + 1))
            self.values.setdefault(table + (key,), (i, m.end() + 1))
            rest = line[m.end():]
            # Inline tables: record their keys too (visible = { max_airmass = 1.8 }).
            if rest.lstrip().startswith("{"):
                for km in re.finditer(r"([A-Za-z0-9_\-]+)\s*=", rest):
                    self.keys.setdefault(table + (key, km.group(1)), (i, m.end() + km.start() + 1))
            for q in ("'''", '"""'):
                if rest.startswith(q) and rest.count(q) == 1:
                    in_ml = q

    def of(self, path: tuple) -> tuple[int, int]:
        for n in range(len(path), 0, -1):
            p = tuple(path[:n])
            if p in self.keys:
                return self.keys[p]
            if p in self.tables:
                return self.tables[p], 1
        return 1, 1

    def item(self, path: tuple, value: str) -> tuple[int, int]:
        """Where the string ``value`` is written in the array at ``path`` (the key's place if not found)."""
        if path not in self.values:
            return self.of(path)
        kl, kc = self.values[path]
        depth = 0
        for i in range(kl - 1, len(self.lines)):
            line = self.lines[i]
            start = kc - 1 if i == kl - 1 else 0
            for m in re.finditer(r"\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|([\[\]])|#.*", line[start:]):
                if m.group(3) == "[":
                    depth += 1
                elif m.group(3) == "]":
                    depth -= 1
                    if depth <= 0:
                        return self.of(path)
                elif m.group(0).startswith("#"):
                    break
                elif (m.group(1) if m.group(1) is not None else m.group(2)) == value:
                    return i + 1, start + m.start() + 1
        return self.of(path)

    def in_string(self, path: tuple, line: int, col: int) -> tuple[int, int]:
        """File position of (line, col) inside the string value at ``path``."""
        if path not in self.values:
            return self.of(path)
        kl, kc = self.values[path]
        text = self.lines[kl - 1][kc - 1:]
        if text.startswith(("'''", '"""')):
            after = text[3:]
            if after.strip() == "":  # TOML drops a newline right after the opening quotes
                return kl + line, col
            return (kl, kc + 3 + col - 1) if line == 1 else (kl + line - 1, col)
        if text.startswith(("'", '"')):
            return kl, kc + 1 + col - 1
        return kl, kc
