"""Bulk import and export of targets: CSV and ECSV.

Columns named after target fields fill those fields (``ra``/``dec`` in
degrees or sexagesimal); ``name2`` … ``nameN`` are aliases; ``tags`` and
``lists`` hold ``;``-separated values; every other column becomes an extra,
typed (int, float, bool, text). Reading is pure: rows come out as
``(line, TargetSpec)`` or ``(line, error)``; the caller stores the good ones.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomd import sky
from tomd.errors import InputError
from tomd.targets.model import ELEMENT_FIELDS, SpecError, TargetSpec, validate

_ALIAS = re.compile(r"^name(\d+)$")
_NUMERIC = ("epoch", "pm_ra", "pm_dec", "parallax", "distance", *ELEMENT_FIELDS)
_RESERVED = {"name", "ra", "dec", "scheme", "tags", "lists", "type", *_NUMERIC}
LIST_SEP = ";"


@dataclass(frozen=True)
class Row:
    line: int
    spec: TargetSpec | None
    error: str | None = None  # "field: reason"


def read_targets(path: Path) -> Iterator[Row]:
    """Rows of a CSV or ECSV file (ECSV when it starts with ``# %ECSV``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", where=str(path)) from None
    if head.startswith(b"# %ECSV"):
        yield from _read_ecsv(path)
    else:
        yield from _read_csv(path)


def count_rows(path: Path) -> int:
    """Rough row count for a progress bar (data lines, not comments)."""
    with open(path, "rb") as fh:
        return max(0, sum(1 for line in fh if line.strip() and not line.startswith(b"#")) - 1)


def _read_csv(path: Path) -> Iterator[Row]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        for fields in reader:
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields) or fields[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [h.strip() for h in fields]
                problem = _check_header(header)
                if problem:
                    raise InputError(problem, where=f"{path}:{line}")
                continue
            if len(fields) != len(header):
                yield Row(line, None, f"expected {len(header)} columns, got {len(fields)}")
                continue
            values = {h: (v.strip() if v.strip() != "" else None) for h, v in zip(header, fields)}
            yield _to_row(line, values, typed=False)
    if header is None:
        raise InputError("no header row (need at least a 'name' column)", where=str(path))


def _read_ecsv(path: Path) -> Iterator[Row]:
    from astropy.table import Table

    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as exc:  # astropy raises many kinds for a broken header
        raise InputError(f"not a valid ECSV file: {exc}", where=str(path)) from None
    problem = _check_header(list(table.colnames))
    if problem:
        raise InputError(problem, where=str(path))
    with open(path, encoding="utf-8") as fh:
        first_data = sum(1 for line in fh if line.startswith("#")) + 2  # + header line
    for i, rec in enumerate(table):
        values = {}
        for col in table.colnames:
            v = rec[col]
            if getattr(v, "mask", False) is True or v is None or (hasattr(table[col], "mask") and table[col].mask[i]):
                values[col] = None
            else:
                values[col] = v.item() if hasattr(v, "item") else v
        yield _to_row(first_data + i, values, typed=True)


def _check_header(header: list[str]) -> str | None:
    if "name" not in header:
        return f"no 'name' column (columns: {', '.join(header)})"
    dup = [h for h in header if header.count(h) > 1]
    if dup:
        return f"column {dup[0]!r} appears twice"
    return None


def _to_row(line: int, values: dict[str, Any], *, typed: bool) -> Row:
    try:
        return Row(line, validate(_to_spec(values, typed=typed)))
    except SpecError as exc:
        return Row(line, None, str(exc))


def _to_spec(values: dict[str, Any], *, typed: bool) -> TargetSpec:
    def num(field: str) -> float | None:
        v = values.get(field)
        if v is None:
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and math.isnan(v):
                return None
            return float(v)
        try:
            return float(str(v))
        except ValueError:
            raise SpecError(field, f"expected a number, got {v!r}") from None

    def angle(field: str, parse) -> float | None:
        v = values.get(field)
        if v is None:
            return None
        try:
            return parse(v)
        except ValueError as exc:
            raise SpecError(field, str(exc)) from None

    name = values.get("name")
    if name is None:
        raise SpecError("name", "required")
    aliases = []
    for key in sorted((k for k in values if _ALIAS.match(k)), key=lambda k: int(_ALIAS.match(k).group(1))):
        if values[key] is not None:
            aliases.append(str(values[key]))
    extras = {}
    for key, v in values.items():
        if key in _RESERVED or _ALIAS.match(key) or v is None:
            continue
        extras[key] = v if typed else _infer(v)
    scheme = values.get("scheme")
    return TargetSpec(
        name=str(name),
        ra=angle("ra", sky.parse_ra),
        dec=angle("dec", sky.parse_dec),
        scheme=str(scheme) if scheme else None,
        aliases=tuple(aliases),
        tags=_split(values.get("tags")),
        lists=_split(values.get("lists")),
        extras=extras,
        name_source="import",
        **{f: num(f) for f in _NUMERIC},
    )


def _split(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    return tuple(p.strip() for p in str(v).split(LIST_SEP) if p.strip())


def _infer(text: str) -> Any:
    """Type of an extra from its CSV text: int, float, bool, else text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
        return f if math.isfinite(f) else text
    except ValueError:
        return text


# ------------------------------------------------------------------ export --

EXPORT_FIELDS = ("name", "type", "ra", "dec", "epoch", "pm_ra", "pm_dec", "parallax", "distance",
                 "scheme", *ELEMENT_FIELDS)


def export_rows(targets: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows for export. Each target dict: fields, aliases, tags, lists, extras."""
    n_alias = max((len(t["aliases"]) for t in targets), default=0)
    extra_keys: list[str] = []
    for t in targets:
        for k in t["extras"]:
            if k not in extra_keys and k not in _RESERVED and not _ALIAS.match(k):
                extra_keys.append(k)
    header = [*EXPORT_FIELDS, *(f"name{i + 2}" for i in range(n_alias)), "tags", "lists", *extra_keys]
    rows: list[dict[str, Any]] = []
    for t in targets:
        row = {f: t.get(f) for f in EXPORT_FIELDS}
        for i, alias in enumerate(t["aliases"]):
            row[f"name{i + 2}"] = alias
        row["tags"] = LIST_SEP.join(t["tags"]) or None
        row["lists"] = LIST_SEP.join(t["lists"]) or None
        for k in extra_keys:
            row[k] = t["extras"].get(k)
        rows.append(row)
    # Columns empty for every target add nothing; "name" always stays.
    header = [h for h in header if h == "name" or any(r.get(h) is not None for r in rows)]
    return header, rows


def write_csv(header: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if row.get(h) is None else _fmt(row.get(h)) for h in header])
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def write_ecsv(header: list[str], rows: list[dict[str, Any]]) -> str:
    from astropy.table import MaskedColumn, Table

    cols = []
    for h in header:
        vals = [r.get(h) for r in rows]
        present = [v for v in vals if v is not None]
        kinds = {type(v) for v in present}
        if kinds <= {float, int} and kinds and not (kinds == {int} and h in ("ra", "dec")):
            dtype, fill = ("int64", 0) if kinds == {int} else ("float64", 0.0)
        elif kinds == {bool}:
            dtype, fill = "bool", False
        else:
            dtype, fill = "str", ""
            vals = [None if v is None else str(v) for v in vals]
        data = [fill if v is None else v for v in vals]
        mask = [v is None for v in vals]
        cols.append(MaskedColumn(data=data, name=h, mask=mask, dtype=dtype))
    table = Table(cols)
    buf = io.StringIO()
    table.write(buf, format="ascii.ecsv")
    return buf.getvalue()
