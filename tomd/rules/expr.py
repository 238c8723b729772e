"""The ``when`` language: a small, safe subset of Python expressions.

An expression is parsed with :mod:`ast`, checked against a whitelist of node
types and known names, and compiled ONCE into an ordinary Python function::

    def rule(alert, target, now, ctx):
        if not (<clause 0>): return 0
        if not (<clause 1>): return 1
        ...
        return -1

The clauses are the top-level ``and`` terms, so evaluating a rule also says
which clause decided (the first false one): that is the reason recorded with
every verdict, at no extra cost.

Safety: no attribute access outside the known fields of ``alert``,
``target`` and ``feature`` (the dict-like fields ``alert.fields``,
``alert.payload``, ``target.extras`` ... are read by key, never by
``getattr``), no names other than the documented ones, no imports, no
comprehensions, lambdas, assignments or f-strings, calls only to the
whitelisted functions, ``*``/``**``/``%`` only on numbers (no
``"x" * 10**9``), and a cap on the expression's size. The compiled code runs
with empty ``__builtins__``.

Missing values: a field that is absent reads as ``None``. Comparisons with
``None`` are false and arithmetic with ``None`` gives ``None`` (so
``alert.mag < 18.5`` is simply false for an alert without a magnitude).
Rules always run the ``None``-tolerant version: its guards are inline
walrus tests, about as cheap as the plain comparisons, whereas trying the
plain version (``Compiled.fast``, kept for comparison) first pays for a
TypeError whenever a field is missing, which real alerts often are
(bench/rules.py measured 0.57 against 0.32 µs per rule).
"""

from __future__ import annotations

import ast
import copy
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tomd import sky

MAX_CHARS = 4000
MAX_NODES = 600
MAX_LITERAL_ITEMS = 1000


class ExprError(Exception):
    """A problem in an expression; ``line``/``col`` are 1-based inside the expression text.

    ``all`` lists every problem found (unknown names, fields, features and
    functions are all collected before compiling gives up); this error is the first.
    """

    def __init__(self, message: str, line: int = 1, col: int = 1):
        self.message, self.line, self.col = message, line, col
        self.all: list[ExprError] = [self]
        super().__init__(f"{line}:{col}: {message}")

    @classmethod
    def of(cls, problems: Sequence["ExprError"]) -> "ExprError":
        problems = sorted(problems, key=lambda e: (e.line, e.col))
        first = problems[0]
        exc = cls(first.message, first.line, first.col)
        exc.all = problems
        return exc


# --------------------------------------------------------------- schema --

#: Fields of ``alert`` (see docs/rules.md). Dict-like ones are read by key.
ALERT_FIELDS = frozenset({
    "source", "key", "kind", "object_id", "ra", "dec", "ra_err_arcsec", "dec_err_arcsec", "band", "mag",
    "mag_err", "flux", "flux_err", "mjd", "time", "event_id", "notice_type", "retraction", "test",
    "error_deg", "area_90_deg2", "n_points", "id",
})
ALERT_DICTS = frozenset({"fields", "payload"})

TARGET_FIELDS = frozenset({
    "id", "name", "names", "type", "ra", "dec", "gal_l", "gal_b", "tags", "lists", "distance", "parallax",
    # light-curve features (context.py)
    "n_detections", "n_upper_limits", "first_detection", "last_detection", "age_days", "since_last_days",
    "peak_mag", "peak_mjd", "peak_band", "last_mag", "last_band", "rise_rate", "decline_rate",
})
TARGET_DICTS = frozenset({"extras", "rise_rates", "decline_rates", "peak_mags", "last_mags"})

ROOTS = ("alert", "target", "feature", "now")


# ------------------------------------------------------------- helpers --

def _num(v: Any, op: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"'{op}' needs numbers, got {type(v).__name__}")
    return v


def _sub(obj: Any, key: Any) -> Any:
    """obj[key], or None when obj is None or the key is absent."""
    if obj is None:
        return None
    try:
        return obj[key]
    except (KeyError, IndexError, TypeError):
        return None


def _mul(a, b):
    return _num(a, "*") * _num(b, "*")


def _pow(a, b):
    return float(_num(a, "**")) ** float(_num(b, "**"))  # floats: OverflowError, never a huge int


def _mod(a, b):
    return _num(a, "%") % _num(b, "%")


def _nn(f):
    """Wrap a binary helper so a None operand gives None."""
    def g(a, b):
        if a is None or b is None:
            return None
        return f(a, b)
    return g


def _cmp(f):
    def g(a, b):
        if a is None or b is None:
            return False
        try:
            return f(a, b)
        except TypeError:
            return False
    return g


def _in(a, b):
    if b is None:
        return False
    return a in b


def _not_in(a, b):
    if b is None:
        return False
    return a not in b


def _neg(a):
    return None if a is None else -a


def _pos(a):
    return None if a is None else +a


def f_abs(x):
    return None if x is None else abs(x)


def f_min(*xs):
    xs = [x for x in (xs[0] if len(xs) == 1 and isinstance(xs[0], (list, tuple)) else xs) if x is not None]
    return min(xs) if xs else None


def f_max(*xs):
    xs = [x for x in (xs[0] if len(xs) == 1 and isinstance(xs[0], (list, tuple)) else xs) if x is not None]
    return max(xs) if xs else None


def f_log10(x):
    if x is None:
        return None
    return math.log10(x) if x > 0 else None


def f_sqrt(x):
    if x is None:
        return None
    return math.sqrt(x) if x >= 0 else None


def f_known(x):
    return x is not None


def f_separation(ra1, dec1, ra2, dec2):
    """Great-circle distance in degrees."""
    if None in (ra1, dec1, ra2, dec2):
        return None
    return sky.separation_deg(ra1, dec1, ra2, dec2)


def f_galactic_latitude(ra, dec):
    if ra is None or dec is None:
        return None
    return sky.to_galactic(ra, dec)[1]


def f_in_circle(ra, dec, ra0, dec0, radius_deg):
    if ra is None or dec is None or ra0 is None or dec0 is None or radius_deg is None:
        return False
    if radius_deg >= 1e-3:  # cosine form: 4 trig calls; exact to ~1e-8 deg at these radii
        d1, d2 = dec * _RAD, dec0 * _RAD
        c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos((ra - ra0) * _RAD)
        return c >= math.cos(radius_deg * _RAD)
    return sky.separation_deg(ra, dec, ra0, dec0) <= radius_deg


_RAD = math.pi / 180.0


def f_in_polygon(ra, dec, vertices):
    """Is (ra, dec) inside the polygon with the given (ra, dec) vertices (degrees)?

    The polygon's edges are great circles. Works across RA 0/360 and at the
    poles; the polygon must fit in a hemisphere.
    """
    if ra is None or dec is None or not vertices:
        return False
    return _polygon(tuple((float(a), float(b)) for a, b in vertices)).contains(ra, dec)


def _unit(ra, dec):
    r, d = math.radians(ra), math.radians(dec)
    return (math.cos(d) * math.cos(r), math.cos(d) * math.sin(r), math.sin(d))


def _cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


class _Polygon:
    """Spherical polygon: gnomonic projection about the vertices' mean direction, then ray casting."""

    def __init__(self, vertices: tuple[tuple[float, float], ...]):
        vs = [_unit(*v) for v in vertices]
        c = [sum(v[i] for v in vs) for i in range(3)]
        n = math.sqrt(_dot(c, c)) or 1.0
        self.c = (c[0] / n, c[1] / n, c[2] / n)
        # Tangent-plane basis at the centre.
        ref = (0.0, 0.0, 1.0) if abs(self.c[2]) < 0.9 else (1.0, 0.0, 0.0)
        e1 = _cross(ref, self.c)
        m = math.sqrt(_dot(e1, e1))
        self.e1 = (e1[0] / m, e1[1] / m, e1[2] / m)
        self.e2 = _cross(self.c, self.e1)
        self.pts = [self._project(v) for v in vs]

    def _project(self, v):
        d = _dot(v, self.c)
        if d <= 1e-9:
            return None
        return (_dot(v, self.e1) / d, _dot(v, self.e2) / d)

    def contains(self, ra: float, dec: float) -> bool:
        p = self._project(_unit(ra, dec))
        if p is None or any(q is None for q in self.pts):
            return False
        x, y = p
        inside = False
        pts = self.pts
        j = len(pts) - 1
        for i in range(len(pts)):
            xi, yi = pts[i]
            xj, yj = pts[j]
            if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
                inside = not inside
            j = i
        return inside


_POLYGONS: dict[tuple, _Polygon] = {}


def _polygon(vertices: tuple) -> _Polygon:
    p = _POLYGONS.get(vertices)
    if p is None:
        if len(_POLYGONS) > 256:
            _POLYGONS.clear()
        p = _POLYGONS[vertices] = _Polygon(vertices)
    return p


@dataclass(frozen=True)
class Function:
    impl: Callable | None  # pure functions; None for context functions (ctx.<name>)
    min_args: int
    max_args: int
    keywords: tuple[str, ...] = ()
    doc: str = ""


#: Functions an expression may call. Context functions (impl None) are
#: methods of the per-alert context, called as ``ctx.fn_<name>(...)``.
FUNCTIONS: dict[str, Function] = {
    "abs": Function(f_abs, 1, 1, doc="absolute value"),
    "min": Function(f_min, 1, 20, doc="smallest of the values (missing ones ignored)"),
    "max": Function(f_max, 1, 20, doc="largest of the values (missing ones ignored)"),
    "log10": Function(f_log10, 1, 1, doc="decimal logarithm (missing for x <= 0)"),
    "sqrt": Function(f_sqrt, 1, 1, doc="square root (missing for x < 0)"),
    "known": Function(f_known, 1, 1, doc="true when the value is present"),
    "separation": Function(f_separation, 4, 4, doc="separation(ra1, dec1, ra2, dec2): degrees"),
    "galactic_latitude": Function(f_galactic_latitude, 2, 2, doc="galactic_latitude(ra, dec): degrees"),
    "in_circle": Function(f_in_circle, 5, 5, doc="in_circle(ra, dec, ra0, dec0, radius_deg)"),
    "in_polygon": Function(f_in_polygon, 3, 3, doc="in_polygon(ra, dec, [(ra1, dec1), (ra2, dec2), ...])"),
    "visible": Function(None, 1, 1, ("hours", "max_airmass", "min_moon_deg", "max_sun_alt"),
                        doc="visible(facility, hours=24, max_airmass=2, min_moon_deg=30, max_sun_alt=-12)"),
    "airmass": Function(None, 1, 1, ("hours", "min_moon_deg", "max_sun_alt"),
                        doc="airmass(facility, hours=24): best airmass in dark time in the window"),
    "moon_distance": Function(None, 0, 0, doc="moon_distance(): degrees from the Moon to the target now"),
    "color": Function(None, 2, 2, ("max_dt_days",),
                      doc="color(band1, band2, max_dt_days=1): latest mag1 - mag2 within max_dt_days"),
}

_CMP_OPS = {ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge",
            ast.In: "in_", ast.NotIn: "not_in"}

HELPERS: dict[str, Any] = {
    "_sub": _sub, "_mul": _mul, "_pow": _pow, "_mod": _mod, "_neg": _neg, "_pos": _pos,
    "_n_add": _nn(lambda a, b: a + b), "_n_sub": _nn(lambda a, b: a - b), "_n_mul": _nn(_mul),
    "_n_div": _nn(lambda a, b: a / b), "_n_fdiv": _nn(lambda a, b: a // b), "_n_pow": _nn(_pow),
    "_n_mod": _nn(_mod),
    "_c_eq": lambda a, b: a == b, "_c_ne": lambda a, b: a != b,
    "_c_lt": _cmp(lambda a, b: a < b), "_c_le": _cmp(lambda a, b: a <= b),
    "_c_gt": _cmp(lambda a, b: a > b), "_c_ge": _cmp(lambda a, b: a >= b),
    "_c_in_": _in, "_c_not_in": _not_in,
}
for _name, _f in FUNCTIONS.items():
    if _f.impl is not None:
        HELPERS[f"_f_{_name}"] = _f.impl


# ------------------------------------------------------------ compiler --

@dataclass
class Clause:
    source: str  # the clause's text, as written
    line: int  # 1-based, inside the expression
    col: int
    leaves: list[tuple[str, Callable]]  # (text, fn(alert, target, now, ctx)) values shown in reasons
    false_text: str = ""  # "<source> is false", the start of a not-fired reason (made once)
    # fn(alert, target, now, ctx) -> {text: JSON-safe value} of every leaf in one call (a not-fired
    # verdict's values); raises if a leaf does, and then json_leaves says which. None: use json_leaves.
    json_fn: Callable | None = None

    def __post_init__(self) -> None:
        self.false_text = f"{self.source} is false"


@dataclass
class Compiled:
    source: str
    fast: Callable
    safe: Callable
    clauses: list[Clause]
    features: frozenset[str] = frozenset()
    uses_visibility: bool = False
    clause_fns: list[Callable] = field(default_factory=list)  # one per clause, for locating errors
    all_json_fn: Callable | None = None  # every clause's leaves at once, as Clause.json_fn
    # fn(alert, target, now, ctx) -> None when every clause holds, else ("<clause> is false",
    # (leaf texts), i, line, *their values): the rule engine's common verdict in one call.
    # Raises when a clause raises, or a value shown does (the engine then asks safe and json_leaves).
    judge: Callable | None = None

    def failing_clause(self, alert, target, now, ctx) -> int | None:
        """The first clause whose evaluation raises (after the rule raised), or None."""
        for i, fn in enumerate(self.clause_fns):
            try:
                if not fn(alert, target, now, ctx):
                    return None
            except Exception:  # noqa: BLE001
                return i
        return None

    def first_false(self, alert, target, now, ctx) -> int:
        """Index of the first false clause, or -1 when all are true. Raises on errors.

        Always the None-tolerant function (see the module's docstring for why not the plain one).
        """
        return self.safe(alert, target, now, ctx)

    def __post_init__(self) -> None:
        # For verdicts whose clauses all hold: every clause's leaves in one list (a text read by two
        # clauses once) and the reason's start, both made once here rather than per verdict.
        seen: dict[str, Callable] = {}
        for c in self.clauses:
            for text, fn in c.leaves:
                seen.setdefault(text, fn)
        self.all_leaves: list[tuple[str, Callable]] = list(seen.items())
        n = len(self.clauses)
        self.all_true_text = f"all {n} clause{'s' if n != 1 else ''} true"

    def json_values(self, i: int, alert, target, now, ctx) -> dict[str, Any]:
        """:meth:`values`, JSON-safe as they are read (a not-fired verdict's row, in one pass).

        Plain values stay, non-finite floats become None, anything else its short repr or list.
        """
        c = self.clauses[i]
        if c.json_fn is not None:
            try:
                return c.json_fn(alert, target, now, ctx)
            except Exception:  # noqa: BLE001 - a leaf raised: json_leaves shows which, as text
                pass
        return json_leaves(c.leaves, alert, target, now, ctx)

    def all_json_values(self, alert, target, now, ctx) -> dict[str, Any]:
        """Every clause's values, JSON-safe, in one pass (a verdict whose clauses all hold)."""
        if self.all_json_fn is not None:
            try:
                return self.all_json_fn(alert, target, now, ctx)
            except Exception:  # noqa: BLE001 - as json_values
                pass
        return json_leaves(self.all_leaves, alert, target, now, ctx)

    def values(self, i: int, alert, target, now, ctx) -> dict[str, Any]:
        """The values a clause read (for the reason), computed on demand."""
        out = {}
        for text, fn in self.clauses[i].leaves:
            try:
                out[text] = fn(alert, target, now, ctx)
            except Exception as exc:  # noqa: BLE001 - shown, never raised
                out[text] = f"<{exc.__class__.__name__}: {exc}>"
        return out


def json_leaves(leaves, alert, target, now, ctx) -> dict[str, Any]:
    out = {}
    for text, fn in leaves:
        try:
            v = fn(alert, target, now, ctx)
        except Exception as exc:  # noqa: BLE001 - shown, never raised
            out[text] = f"<{exc.__class__.__name__}: {exc}>"
            continue
        t = type(v)
        if t is float:
            out[text] = v if v - v == 0.0 else None  # inf - inf and nan - nan are nan
        elif t is str or t is int or t is bool or v is None:
            out[text] = v
        else:
            out[text] = _json_safe(v)
    return out


def _json_value(v: Any) -> Any:
    """One value as json_leaves keeps it (the generated values functions' slow path)."""
    t = type(v)
    if t is float:
        return v if v - v == 0.0 else None
    if t is str or t is int or t is bool or v is None:
        return v
    return _json_safe(v)


#: What the generated values checks call (_values_display); never reachable from an expression's own names.
_VALUES_NS: dict[str, Any] = {"_json_value": _json_value, "type": type, "float": float, "str": str, "int": int,
                              "bool": bool}


def _json_safe(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (set, frozenset)):
        return sorted((_json_safe(x) for x in v), key=repr)
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v[:50]]
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in list(v.items())[:50]}
    return repr(v)[:200]


def _show(v: Any) -> str:
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        r = repr(v)
        return r if len(r) <= 80 else r[:77] + "..."
    if isinstance(v, float):
        return f"{v:.5f}" if 1e4 <= abs(v) < 1e9 else f"{v:.6g}"  # MJDs keep their fraction of a day
    if isinstance(v, (set, frozenset)):
        v = sorted(v)
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def describe_values(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {_show(v)}" for k, v in values.items())


class _Compiler:
    def __init__(self, text: str, features: Sequence[str]):
        self.text = text
        self.features = set(features)
        self.used_features: set[str] = set()
        self.uses_visibility = False
        self.nodes = 0
        self.ntmp = 0
        # Unknown names, fields, features, functions: collected, so a check reports them all at once.
        self.unknown: list[ExprError] = []

    def soft(self, node: ast.AST, message: str) -> tuple[ast.expr, ast.expr]:
        """Record a problem that does not stop the translation; the part reads as None meanwhile."""
        self.unknown.append(self.err(node, message))
        return ast.Constant(None), ast.Constant(None)

    def tmp(self) -> str:
        self.ntmp += 1
        return f"_v{self.ntmp}"

    def none_safe_binop(self, a: ast.expr, op: ast.operator, b: ast.expr) -> ast.expr:
        """a OP b, or None when an operand is None (inline: no helper call)."""
        tests, args = [], []
        for x in (a, b):
            if isinstance(x, ast.Constant):
                args.append(x)
                if x.value is None:
                    return ast.Constant(None)
            else:
                v = self.tmp()
                tests.append(_is_none(_walrus(v, x)))
                args.append(_load(v))
        body = ast.BinOp(args[0], op, args[1])
        if not tests:
            return body
        return ast.IfExp(tests[0] if len(tests) == 1 else ast.BoolOp(ast.Or(), tests), ast.Constant(None), body)

    def none_safe_compare(self, items: list[ast.expr], ops: list[ast.cmpop]) -> ast.expr:
        """A comparison that is False when an ordered operand (or an `in` container) is None.

        Inline walrus guards, e.g. ``(_v1 := alert.mag) is not None and _v1 < 18.5``:
        as fast as the plain comparison. ``==`` / ``!=`` compare None as Python does.
        """
        order = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
        uses = [0] * len(items)
        for i in range(len(ops)):
            uses[i] += 1
            uses[i + 1] += 1
        names: list[str | None] = [None] * len(items)
        terms: list[ast.expr] = []

        def use(i: int, guard: bool) -> ast.expr:
            it = items[i]
            if isinstance(it, ast.Constant):
                if guard and it.value is None:
                    terms.append(ast.Constant(False))
                return it
            if names[i] is None:
                if uses[i] == 1 and not guard:
                    return it  # used once, unguarded: inline
                v = names[i] = self.tmp()
                w = _walrus(v, it)
                terms.append(_is_not_none(w) if guard else ast.BoolOp(ast.Or(), [_is_not_none(w), ast.Constant(True)]))
            elif guard:
                terms.append(_is_not_none(_load(names[i])))
            return _load(names[i])

        for i, op in enumerate(ops):
            left = use(i, isinstance(op, order))
            right = use(i + 1, isinstance(op, order + (ast.In, ast.NotIn)))
            terms.append(ast.Compare(left, [op], [right]))
        return terms[0] if len(terms) == 1 else ast.BoolOp(ast.And(), terms)

    # Positions: the expression is parsed wrapped in "(\n" ... "\n)", so
    # parsed line L is expression line L-1 and columns are unchanged.
    def err(self, node: ast.AST | None, message: str) -> ExprError:
        if node is None or not hasattr(node, "lineno"):
            return ExprError(message)
        return ExprError(message, max(1, node.lineno - 1), node.col_offset + 1)

    def parse(self) -> ast.expr:
        if len(self.text) > MAX_CHARS:
            raise ExprError(f"expression too long ({len(self.text)} characters; at most {MAX_CHARS})")
        if not self.text.strip():
            raise ExprError("empty expression")
        try:
            tree = ast.parse("(\n" + self.text + "\n)", mode="eval")
        except (RecursionError, MemoryError):
            # CPython's parser gives up on deep nesting (3000 unary minus signs) with these, not SyntaxError.
            raise ExprError("expression nested too deeply") from None
        except ValueError as exc:  # e.g. NUL bytes in the source
            raise ExprError(f"cannot parse: {exc}") from None
        except SyntaxError as exc:
            line = max(1, (exc.lineno or 2) - 1)
            lines = self.text.splitlines() or [""]
            if line > len(lines):  # at the closing wrapper: the end of the text
                line, exc.offset = len(lines), len(lines[-1]) + 1
            msg = exc.msg
            if msg.startswith("'(' was never closed") or "never closed" in msg:
                msg = "unbalanced parentheses or brackets"
            raise ExprError(f"syntax error: {msg}", line, exc.offset or 1) from None
        return tree.body

    def check(self, node: ast.AST, depth: int = 0) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.err(node, f"expression too complex (more than {MAX_NODES} parts); "
                                 "split it or register a feature function")
        if depth > 60:
            raise self.err(node, "expression nested too deeply")

    # Returns (fast_ast, safe_ast).
    def tr(self, node: ast.AST, depth: int = 0) -> tuple[ast.expr, ast.expr]:
        self.check(node, depth)
        d = depth + 1
        if isinstance(node, ast.BoolOp):
            parts = [self.tr(v, d) for v in node.values]
            return (ast.BoolOp(node.op, [p[0] for p in parts]), ast.BoolOp(node.op, [p[1] for p in parts]))
        if isinstance(node, ast.UnaryOp):
            f, s = self.tr(node.operand, d)
            if isinstance(node.op, ast.Not):
                return ast.UnaryOp(ast.Not(), f), ast.UnaryOp(ast.Not(), s)
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                if isinstance(s, ast.Constant):
                    return ast.UnaryOp(node.op, f), ast.UnaryOp(node.op, s)
                v = self.tmp()
                safe = ast.IfExp(_is_none(_walrus(v, s)), ast.Constant(None), ast.UnaryOp(node.op, _load(v)))
                return ast.UnaryOp(node.op, f), safe
            raise self.err(node, "'~' is not allowed")
        if isinstance(node, ast.BinOp):
            (lf, ls), (rf, rs) = self.tr(node.left, d), self.tr(node.right, d)
            op = type(node.op)
            simple = {ast.Add: "_n_add", ast.Sub: "_n_sub", ast.Div: "_n_div", ast.FloorDiv: "_n_fdiv"}
            if op in simple:
                return ast.BinOp(lf, node.op, rf), self.none_safe_binop(ls, node.op, rs)
            guarded = {ast.Mult: ("_mul", "_n_mul"), ast.Pow: ("_pow", "_n_pow"), ast.Mod: ("_mod", "_n_mod")}
            if op in guarded:
                fast, safe = guarded[op]
                return _call(fast, [lf, rf]), _call(safe, [ls, rs])
            raise self.err(node, f"operator {type(node.op).__name__} is not allowed; use + - * / // % **")
        if isinstance(node, ast.Compare):
            fast_ops = []
            for op in node.ops:
                if type(op) not in _CMP_OPS:
                    raise self.err(node, "'is' / 'is not' are not allowed; use known(x) or ==")
                fast_ops.append(op)
            items = [self.tr(node.left, d)] + [self.tr(c, d) for c in node.comparators]
            fast = ast.Compare(items[0][0], fast_ops, [i[0] for i in items[1:]])
            return fast, self.none_safe_compare([i[1] for i in items], node.ops)
        if isinstance(node, ast.IfExp):
            (tf, ts), (bf, bs), (ef, es) = self.tr(node.test, d), self.tr(node.body, d), self.tr(node.orelse, d)
            return ast.IfExp(tf, bf, ef), ast.IfExp(ts, bs, es)
        if isinstance(node, ast.Constant):
            if node.value is not None and not isinstance(node.value, (bool, int, float, str)):
                raise self.err(node, f"constants of type {type(node.value).__name__} are not allowed")
            if isinstance(node.value, str) and len(node.value) > 1000:
                raise self.err(node, "string constant too long")
            return node, node
        if isinstance(node, (ast.List, ast.Tuple)):
            if len(node.elts) > MAX_LITERAL_ITEMS:
                raise self.err(node, f"list too long (at most {MAX_LITERAL_ITEMS} items)")
            parts = [self.tr(e, d) for e in node.elts]
            return ast.Tuple([p[0] for p in parts], ast.Load()), ast.Tuple([p[1] for p in parts], ast.Load())
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            return self.access(node, d)
        if isinstance(node, ast.Call):
            return self.call(node, d)
        what = {ast.ListComp: "comprehensions", ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
                ast.GeneratorExp: "comprehensions", ast.Lambda: "lambdas", ast.NamedExpr: "assignments (:=)",
                ast.JoinedStr: "f-strings", ast.Dict: "dict literals", ast.Set: "set literals",
                ast.Starred: "* unpacking", ast.Await: "await", ast.Yield: "yield"}.get(type(node))
        raise self.err(node, f"{what or type(node).__name__} not allowed in a rule expression")

    def name(self, node: ast.Name) -> tuple[ast.expr, ast.expr]:
        if node.id in ("alert", "target", "now"):
            return node, node
        if node.id == "feature":
            raise self.err(node, "write feature.NAME (a registered feature)")
        if node.id in FUNCTIONS:
            raise self.err(node, f"{node.id} is a function: call it, {FUNCTIONS[node.id].doc}")
        if node.id in ("true", "false", "null", "none"):
            return self.soft(node, f"unknown name '{node.id}'; write True, False or None")
        return self.soft(node, f"unknown name '{node.id}'{_suggest(node.id, list(ROOTS) + list(FUNCTIONS))}; "
                               "expressions read alert.*, target.*, feature.*, now")

    def access(self, node: ast.expr, d: int) -> tuple[ast.expr, ast.expr]:
        """Attribute chains rooted at alert/target/feature; subscripts read by key."""
        if isinstance(node, ast.Subscript):
            if isinstance(node.slice, ast.Slice):
                raise self.err(node, "slices are not allowed")
            (vf, vs), (kf, ks) = self.tr(node.value, d), self.tr(node.slice, d)
            return _call("_sub", [vf, kf]), _call("_sub", [vs, ks])
        assert isinstance(node, ast.Attribute)
        attr = node.attr
        if attr.startswith("_"):
            raise self.err(node, f"'{attr}': names starting with _ are not allowed")
        base = node.value
        if isinstance(base, ast.Name):
            root = base.id
            if root == "alert":
                if attr in ALERT_FIELDS or attr in ALERT_DICTS:
                    return node, node
                return self.soft(node, f"alert has no field '{attr}'"
                                 f"{_suggest(attr, ALERT_FIELDS | ALERT_DICTS)}; survey fields are alert.fields.NAME, "
                                 "the raw packet alert.payload.NAME")
            if root == "target":
                if attr in TARGET_FIELDS or attr in TARGET_DICTS:
                    return node, node
                return self.soft(node, f"target has no field '{attr}'{_suggest(attr, TARGET_FIELDS | TARGET_DICTS)}; "
                                       "typed extras are target.extras.NAME")
            if root == "feature":
                if attr not in self.features:
                    known = ", ".join(sorted(self.features)) or "none are registered ([rules] features in the config)"
                    return self.soft(node, f"unknown feature '{attr}'{_suggest(attr, self.features)}; known: {known}")
                self.used_features.add(attr)
                c = _call("ctx.feature", [ast.Constant(attr)])
                return c, c
            if root == "now":
                raise self.err(node, "now is a number (MJD, UTC): it has no fields")
            return self.name(base)  # another name: unknown (reported once) or a function (raises)
        # An attribute of a dict-like field: key access (alert.fields.real_bogus).
        if self._is_dict_path(base):
            (vf, vs) = self.tr(base, d)
            if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
                # alert.fields, target.extras ...: always dicts; a method call on our own value is cheaper
                get = lambda v: ast.Call(ast.Attribute(v, "get", ast.Load()), [ast.Constant(attr)], [])  # noqa: E731
                return get(vf), get(vs)
            return _call("_sub", [vf, ast.Constant(attr)]), _call("_sub", [vs, ast.Constant(attr)])
        raise self.err(node, f"'.{attr}' is not allowed here: only alert.*, target.*, feature.* and keys of "
                             "alert.fields, alert.payload, target.extras (and the per-band features) can be read")

    def _is_dict_path(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return (node.value.id == "alert" and node.attr in ALERT_DICTS) or \
                   (node.value.id == "target" and node.attr in TARGET_DICTS)
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            return self._is_dict_path(node.value)
        return False

    def call(self, node: ast.Call, d: int) -> tuple[ast.expr, ast.expr]:
        if not isinstance(node.func, ast.Name):
            raise self.err(node, "only the listed functions can be called (no methods)")
        name = node.func.id
        fn = FUNCTIONS.get(name)
        if fn is None:
            for a in [*node.args, *(kw.value for kw in node.keywords)]:
                self.tr(a, d)  # its arguments may hold more unknown names
            return self.soft(node.func, f"unknown function '{name}'{_suggest(name, FUNCTIONS)}; "
                                        f"known: {', '.join(sorted(FUNCTIONS))}")
        if not (fn.min_args <= len(node.args) <= fn.max_args):
            raise self.err(node, f"{name}() takes {_arity(fn)}: {fn.doc}")
        args = [self.tr(a, d) for a in node.args]
        kws = []
        for kw in node.keywords:
            if kw.arg is None or kw.arg not in fn.keywords:
                allowed = ", ".join(fn.keywords) or "none"
                raise self.err(kw.value if kw.arg is None else kw, f"{name}() has no option "
                               f"'{kw.arg or '**'}' (options: {allowed})")
            kws.append((kw.arg, self.tr(kw.value, d)))
        if fn.impl is None:
            if name in ("visible", "airmass", "moon_distance"):
                self.uses_visibility = True
            target = f"ctx.fn_{name}"
        else:
            target = f"_f_{name}"
        mk = lambda i: _call(target, [a[i] for a in args], [ast.keyword(k, v[i]) for k, v in kws])  # noqa: E731
        return mk(0), mk(1)

    def compile(self) -> Compiled:
        body = self.parse()
        terms = body.values if isinstance(body, ast.BoolOp) and isinstance(body.op, ast.And) else [body]
        fast_stmts, safe_stmts, clauses, clause_fns = [], [], [], []
        all_leaf_asts: list[tuple[str, ast.expr]] = []
        for term in terms:  # every term first: all unknown names, not only the first
            self.tr(term)
        if self.unknown:
            raise ExprError.of(self.unknown)
        self.nodes = 0
        judge_stmts = []
        for i, term in enumerate(terms):
            f, s = self.tr(term)
            clause_fns.append(_lambda(s))
            fast_stmts.append(_if_not_return(f, i))
            safe_stmts.append(_if_not_return(s, i))
            leaves, leaf_asts = [], []
            for leaf in _leaves(term):
                _, ls = self.tr(leaf)
                text = _source(self.text, leaf)
                leaves.append((text, _lambda(ls)))
                leaf_asts.append((text, ls))
            all_leaf_asts.extend(leaf_asts)
            clause = Clause(_source(self.text, term).strip(), max(1, term.lineno - 1), term.col_offset + 1,
                            leaves, json_fn=_values_function(leaf_asts))
            clauses.append(clause)
            # judge: (reason, texts, clause, line, *values) of the first false clause, its values read in
            # the same call. One flat tuple of plain values: the garbage collector stops watching it at
            # its first pass (it never stops watching a dict, and a tuple holding a fresh tuple only
            # after several passes), so a batch's thousands of verdict rows never reach its oldest generation.
            texts = tuple(dict.fromkeys(t for t, _ in leaf_asts))
            judge_stmts.append(ast.If(ast.UnaryOp(ast.Not(), s), [ast.Return(ast.Tuple(
                [ast.Constant(clause.false_text), ast.Constant(texts), ast.Constant(i), ast.Constant(clause.line),
                 *_values_display(leaf_asts, as_tuple=True).elts], ast.Load()))], []))
        seen: dict[str, ast.expr] = {}
        for text, ls in all_leaf_asts:  # as Compiled.all_leaves: a text read by two clauses once
            seen.setdefault(text, ls)
        return Compiled(self.text, _function(fast_stmts), _function(safe_stmts), clauses,
                        frozenset(self.used_features), self.uses_visibility, clause_fns,
                        all_json_fn=_values_function(list(seen.items())),
                        judge=_function(judge_stmts, returns=None, name="judge", ns=_VALUES_NS))


def _arity(fn: Function) -> str:
    if fn.min_args == fn.max_args:
        return f"{fn.min_args} argument{'s' if fn.min_args != 1 else ''}"
    return f"{fn.min_args} to {fn.max_args} arguments"


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _source(text: str, node: ast.AST) -> str:
    lines = ("(\n" + text + "\n)").splitlines(keepends=True)
    # ast.get_source_segment works on the wrapped text.
    seg = ast.get_source_segment("".join(lines), node) or ""
    return " ".join(seg.split())


def _leaves(node: ast.AST) -> list[ast.expr]:
    """Maximal reads (attribute chains, subscripts, context calls, now) inside a clause, in order."""
    out: list[ast.expr] = []
    seen: set[str] = set()

    def visit(n: ast.AST) -> None:
        if isinstance(n, (ast.Attribute, ast.Subscript)) or (isinstance(n, ast.Name) and n.id == "now") or (
                isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in FUNCTIONS):
            key = ast.dump(n)
            if key not in seen:
                seen.add(key)
                out.append(n)
            if not isinstance(n, ast.Call):
                return
        for c in ast.iter_child_nodes(n):
            visit(c)

    visit(node)
    return out[:12]


def _walrus(name: str, value: ast.expr) -> ast.NamedExpr:
    return ast.NamedExpr(ast.Name(name, ast.Store()), value)


def _load(name: str) -> ast.Name:
    return ast.Name(name, ast.Load())


def _is_none(x: ast.expr) -> ast.Compare:
    return ast.Compare(x, [ast.Is()], [ast.Constant(None)])


def _is_not_none(x: ast.expr) -> ast.Compare:
    return ast.Compare(x, [ast.IsNot()], [ast.Constant(None)])


def _call(name: str, args: list[ast.expr], keywords: list[ast.keyword] | None = None) -> ast.Call:
    if "." in name:
        obj, attr = name.split(".")
        func: ast.expr = ast.Attribute(ast.Name(obj, ast.Load()), attr, ast.Load())
    else:
        func = ast.Name(name, ast.Load())
    return ast.Call(func, args, keywords or [])


def _if_not_return(test: ast.expr, i: int) -> ast.stmt:
    return ast.If(ast.UnaryOp(ast.Not(), test), [ast.Return(ast.Constant(i))], [])


_ARGS = ast.arguments(posonlyargs=[], args=[ast.arg(a) for a in ("alert", "target", "now", "ctx")],
                      kwonlyargs=[], kw_defaults=[], defaults=[])


def _function(stmts: list[ast.stmt], returns: Any = -1, name: str = "rule",
              ns: Mapping[str, Any] | None = None) -> Callable:
    fn = ast.FunctionDef(name, _ARGS, stmts + [ast.Return(ast.Constant(returns))], [], None, None)
    mod = copy.deepcopy(ast.Module([fn], []))
    ast.fix_missing_locations(_strip_positions(mod))
    env: dict[str, Any] = {"__builtins__": {}, **HELPERS, **(ns or {})}
    exec(compile(mod, "<rule>", "exec"), env)  # noqa: S102 - a whitelisted AST, empty builtins
    return env[name]


def _lambda(expr: ast.expr) -> Callable:
    fn = ast.FunctionDef("leaf", _ARGS, [ast.Return(expr)], [], None, None)
    mod = copy.deepcopy(ast.Module([fn], []))
    ast.fix_missing_locations(_strip_positions(mod))
    ns: dict[str, Any] = {"__builtins__": {}, **HELPERS}
    exec(compile(mod, "<rule>", "exec"), ns)  # noqa: S102
    return ns["leaf"]


def _values_display(leaves: list[tuple[str, ast.expr]], as_tuple: bool = False) -> ast.expr:
    """``{text: value}`` of the leaves, each read and made JSON-safe inline (no call per leaf).

    ``as_tuple``: the values alone, one per distinct text (the last leaf of a text, as the dict keeps).

    What :func:`json_leaves` does leaf by leaf, one Python call per leaf, as one dict display with
    each value's check inline (floats, the common case, first)::

        {"alert.mag": (_j0 if _j0 - _j0 == 0.0 else None) if (_jt0 := type(_j0 := alert.mag)) is float
                      else _j0 if _jt0 is str or _jt0 is int or _jt0 is bool or _j0 is None
                      else _json_value(_j0), ...}
    """
    keys, values = [], []
    for k, (text, expr) in enumerate(leaves):
        v, t = f"_j{k}", f"_jt{k}"
        is_t = lambda name: ast.Compare(_load(t), [ast.Is()], [_load(name)])  # noqa: E731
        finite = ast.IfExp(ast.Compare(ast.BinOp(_load(v), ast.Sub(), _load(v)), [ast.Eq()], [ast.Constant(0.0)]),
                           _load(v), ast.Constant(None))
        plain = ast.BoolOp(ast.Or(), [is_t("str"), is_t("int"), is_t("bool"),
                                      ast.Compare(_load(v), [ast.Is()], [ast.Constant(None)])])
        read = ast.Compare(_walrus(t, ast.Call(_load("type"), [_walrus(v, expr)], [])), [ast.Is()], [_load("float")])
        keys.append(ast.Constant(text))
        values.append(ast.IfExp(read, finite, ast.IfExp(plain, _load(v), _call("_json_value", [_load(v)]))))
    if as_tuple:  # in the dict's order: each text where it first comes, with its last value
        last = {k.value: j for j, k in enumerate(keys)}
        return ast.Tuple([values[last[t]] for t in dict.fromkeys(k.value for k in keys)], ast.Load())
    return ast.Dict(keys, values)


def _values_function(leaves: list[tuple[str, ast.expr]]) -> Callable:
    """fn(alert, target, now, ctx) -> {text: JSON-safe value} of every leaf, in one call (_values_display)."""
    return _function([ast.Return(_values_display(leaves))], returns=None, name="values", ns=_VALUES_NS)


def _strip_positions(tree: ast.AST) -> ast.AST:
    # Nodes are shared between the fast and safe trees; give them fresh positions.
    for n in ast.walk(tree):
        for a in ("lineno", "col_offset", "end_lineno", "end_col_offset"):
            if hasattr(n, a):
                try:
                    delattr(n, a)
                except AttributeError:
                    pass
    return tree


def compile_expression(text: str, features: Sequence[str] = ()) -> Compiled:
    """Check and compile ``text``; raises :class:`ExprError` with the position inside ``text``."""
    return _Compiler(text, features).compile()
