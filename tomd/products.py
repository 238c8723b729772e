"""Data products: skymaps from notices, uploads, photometry export, light curves.

Stage 6 of the flow (the facility download loop lives beside it once the
facility client exists). Every file goes through a :class:`tomd.storage.Store`
and is recorded as a ``data_products`` row with its size and MD5, plus a
``data.stored`` event in the same transaction. ``(facility, product_id)`` is
unique, so storing the same product again (a replayed notice, the same file
uploaded twice) changes nothing.

Order of effects: the file is written to storage first, then the row and the
event are added in the caller's transaction. A crash in between leaves an
unrecorded object under a deterministic key, which the retry overwrites with
the same bytes; a product is never recorded before its bytes are complete.

Photometry files (CSV or ECSV) become photometry rows:

- time: ``mjd`` (MJD, UTC), ``jd`` (JD, UTC), or ``time``/``date``/``date_obs``
  (ISO 8601 in UTC; a number there is read as MJD, or JD when > 2,400,000).
  An ECSV ``Time`` column carries its own scale (``tai``, ``tt``…) and is
  converted to UTC with astropy.
- ``mag`` (AB) with ``mag_err``, and/or ``flux`` (nJy; ``flux_ujy``,
  ``flux_mjy``, ``flux_jy`` or an ECSV unit are converted) with
  ``flux_err``; ``limit`` (limiting AB magnitude); ``band`` (or ``filter``);
  optional ``kind`` = detection | upper_limit | forced.
- each point's source is ``upload:<filename>`` and its dedupe key the one
  ingest uses, so uploading the same file again adds nothing.
- every bad row is reported as ``FILE:LINE: field: reason``; good rows are kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, BinaryIO

from sqlalchemy.orm import Session, sessionmaker

from tomd.alerts.formats._common import flux_err_to_mag_err, flux_to_mag
from tomd.db import repository as repo
from tomd.db.models import DataProduct, Target, utcnow
from tomd.errors import InputError, NotFoundError
from tomd.events import DataStored
from tomd.storage import Store, put_bytes, safe_component

PRODUCT_KINDS = ("photometry", "spectroscopy", "image", "skymap")
_SOURCE_LEN = 32  # photometry.source column width

# ---------------------------------------------------------------- record --


@dataclass(frozen=True)
class ProductResult:
    """A data product as recorded: ``created`` is False when it was already there."""

    id: int
    facility: str
    product_id: str
    storage_key: str
    size: int
    md5: str
    created: bool


def record_product(s: Session, *, facility: str, product_id: str, kind: str, filename: str, storage_key: str,
                   size: int, md5: str, target_id: int | None = None, request_id: int | None = None,
                   notice_id: int | None = None, meta: dict[str, Any] | None = None) -> ProductResult:
    """Add a stored product's row and its data.stored event (once per facility/product_id)."""
    row, created = repo.add_data_product(s, {
        "facility": facility, "product_id": product_id, "kind": kind, "filename": filename,
        "storage_key": storage_key, "size": size, "md5": md5, "state": "stored", "stored_at": utcnow(),
        "target_id": target_id, "request_id": request_id, "notice_id": notice_id, "meta": meta or {},
    })
    if created:
        repo.add_event(s, DataStored(row.id, facility, product_id, kind, filename, storage_key, size, md5,
                                     target_id, request_id, notice_id), target_id=target_id)
    return ProductResult(row.id, row.facility, row.product_id, row.storage_key or "", row.size or 0, row.md5 or "",
                         created)


# ------------------------------------------------------------- downloads --


def store_download(sessions: sessionmaker[Session], storage: Store, *, facility: str, product_id: str,
                   filename: str, kind: str, opener: Callable[[], IO[bytes]], target_id: int | None = None,
                   request_id: int | None = None, request_label: str | None = None, size: int | None = None,
                   md5: str | None = None, meta: dict[str, Any] | None = None) -> ProductResult:
    """Download one facility product into storage and record it; the facility loop calls this.

    ``opener()`` returns the byte stream (an HTTP response body); it is not
    called when the product is already stored. The file goes to
    ``target/facility/request/filename``. ``size``/``md5`` from the archive
    are checked before the object is completed. A failed or short download
    is recorded with state ``failed`` (and the error) and re-raised; it is
    never ``stored``, and a later call retries it. The ``data.stored`` event
    is written once, when the product becomes stored.
    """
    from tomd.errors import redact
    from tomd.storage import product_key

    with sessions() as s:
        existing = repo.get_data_product(s, facility, product_id)
        t = repo.get_target(s, target_id) if target_id is not None else None
        tdir = target_dir(t) if t is not None else "untargeted"
    if existing is not None and existing.state == "stored" and existing.storage_key \
            and storage.exists(existing.storage_key):
        return ProductResult(existing.id, facility, product_id, existing.storage_key, existing.size or 0,
                             existing.md5 or "", False)
    key = product_key(tdir, facility, request_label or (str(request_id) if request_id is not None else "_"),
                      filename)
    base = {"facility": facility, "product_id": product_id, "kind": kind, "filename": filename,
            "target_id": target_id, "request_id": request_id, "meta": dict(meta or {})}
    try:
        stream = opener()
        try:
            stored = storage.put(key, stream, size=size, md5=md5)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    except Exception as exc:
        with sessions.begin() as s:
            row, _ = repo.add_data_product(s, base | {"state": "failed", "storage_key": None})
            err = redact(f"{type(exc).__name__}: {exc}")[:1000]
            repo.update_data_product(s, row.id, {"state": "failed", "error": err, "attempts": (row.attempts or 0) + 1,
                                                 "meta": {**(row.meta or {}), **base["meta"], "error": err}})
        raise
    with sessions.begin() as s:
        row = repo.get_data_product(s, facility, product_id)
        if row is None:
            return record_product(s, **{k: v for k, v in base.items()}, storage_key=stored.key,
                                  size=stored.size, md5=stored.md5)
        if row.state == "stored":  # another worker finished it meanwhile
            return ProductResult(row.id, facility, product_id, row.storage_key or "", row.size or 0,
                                 row.md5 or "", False)
        clean = {k: v for k, v in (row.meta or {}).items() if k != "error"} | base["meta"]
        repo.update_data_product(s, row.id, {"state": "stored", "storage_key": stored.key, "size": stored.size,
                                             "md5": stored.md5, "stored_at": utcnow(), "meta": clean,
                                             "error": None})
        repo.add_event(s, DataStored(row.id, facility, product_id, kind, filename, stored.key, stored.size,
                                     stored.md5, target_id, request_id, row.notice_id), target_id=target_id)
        return ProductResult(row.id, facility, product_id, stored.key, stored.size, stored.md5, True)


# Facility downloads by several workers (tomd.retrieve): a product row is
# claimed before its download (state "downloading", the claim's owner and
# end in meta["claim"]), under a row lock, so two workers never fetch the
# same product at once; a claim whose worker died runs out and is taken over.

DOWNLOADING = "downloading"


def claim_download(s: Session, *, facility: str, product_id: str, worker: str, now: datetime,
                   until: datetime, values: dict[str, Any]) -> DataProduct | None:
    """Claim one product for download; None when it is stored or another worker's live claim holds it.

    ``values`` (kind, filename, target_id, request_id, meta) fill the row
    when it is new. Counts the attempt. The caller commits at once.
    """
    repo.add_data_product(s, {"facility": facility, "product_id": product_id, "state": "pending", **values})
    row = repo.lock_data_product(s, facility, product_id)
    if row is None or row.state == "stored":
        return None
    claim = (row.meta or {}).get("claim") or {}
    if row.state == DOWNLOADING and claim.get("by") != worker and _claim_end(claim) > now:
        return None
    meta = {**(row.meta or {}), **(values.get("meta") or {}), "claim": {"by": worker, "until": until.isoformat()}}
    repo.update_data_product(s, row.id, {"state": DOWNLOADING, "attempts": (row.attempts or 0) + 1, "meta": meta})
    row.state, row.meta, row.attempts = DOWNLOADING, meta, (row.attempts or 0) + 1
    return row


def _claim_end(claim: dict[str, Any]) -> datetime:
    try:
        return datetime.fromisoformat(str(claim["until"]))
    except (KeyError, ValueError):
        return datetime.min.replace(tzinfo=timezone.utc)


def finish_download(s: Session, row_id: int, stored: Any, *, meta: dict[str, Any] | None = None) -> ProductResult:
    """Record a completely stored download (``stored``: a ``tomd.storage.Stored``) and its data.stored event."""
    row = repo.get_data_product_by_id(s, row_id)
    if row is None:
        raise NotFoundError(f"data product #{row_id} vanished during its download")
    if row.state == "stored":  # a worker whose claim had run out finished it too: same key, same bytes
        return ProductResult(row.id, row.facility, row.product_id, row.storage_key or "", row.size or 0,
                             row.md5 or "", False)
    clean = {k: v for k, v in (row.meta or {}).items() if k not in ("claim", "error")} | dict(meta or {})
    repo.update_data_product(s, row.id, {"state": "stored", "storage_key": stored.key, "size": stored.size,
                                         "md5": stored.md5, "stored_at": utcnow(), "meta": clean, "error": None})
    repo.add_event(s, DataStored(row.id, row.facility, row.product_id, row.kind, row.filename, stored.key,
                                 stored.size, stored.md5, row.target_id, row.request_id, row.notice_id),
                   target_id=row.target_id)
    return ProductResult(row.id, row.facility, row.product_id, stored.key, stored.size, stored.md5, True)


def fail_download(s: Session, row_id: int, error: str) -> None:
    """Record a failed download (never ``stored``): the error, and the claim released."""
    row = repo.get_data_product_by_id(s, row_id)
    if row is None or row.state == "stored":
        return
    meta = {k: v for k, v in (row.meta or {}).items() if k != "claim"}
    repo.update_data_product(s, row.id, {"state": "failed", "error": error[:2000], "meta": meta})


# --------------------------------------------------------------- skymaps --

_SKYMAP_SUFFIX = {"multiorder-fits": ".multiorder.fits", "fits": ".fits", "fits.gz": ".fits.gz"}


def store_skymap(s: Session, storage: Store, notice_id: int | None, source: str, event_id: str,
                 skymap: bytes, fmt: str | None, *, label: str | None = None,
                 target_id: int | None = None) -> ProductResult:
    """Store a notice's skymap under ``notices/<source>/<event_id>/<name>`` and record it.

    The product id is ``<event_id>/<md5>``: the same skymap (a replayed or
    repeated notice) is stored once, a refined skymap in a later notice is a
    new product. ``label`` (e.g. the notice type) starts the file name:
    ``preliminary-<md5[:8]>.multiorder.fits``. Writes to storage before the
    row; the caller commits.
    """
    if not skymap:
        raise InputError(f"{source} {event_id}: empty skymap")
    md5 = hashlib.md5(skymap, usedforsecurity=False).hexdigest()
    product_id = f"{event_id}/{md5}"
    if len(product_id) > 200:
        product_id = f"{hashlib.sha1(event_id.encode()).hexdigest()}/{md5}"
    existing = repo.get_data_product(s, source, product_id)
    if existing is not None and existing.state == "stored" and existing.storage_key \
            and storage.exists(existing.storage_key):
        return ProductResult(existing.id, existing.facility, existing.product_id, existing.storage_key,
                             existing.size or 0, existing.md5 or "", False)
    suffix = _SKYMAP_SUFFIX.get((fmt or "").lower(), ".fits" if skymap[:6] == b"SIMPLE" else ".bin")
    name = f"{safe_component((label or 'skymap').lower())}-{md5[:8]}{suffix}"
    key = "/".join(("notices", safe_component(source), safe_component(event_id), name))
    stored = put_bytes(storage, key, skymap)
    return record_product(s, facility=source, product_id=product_id, kind="skymap", filename=name,
                          storage_key=stored.key, size=stored.size, md5=stored.md5, notice_id=notice_id,
                          target_id=target_id, meta={"format": fmt, "event_id": event_id, "label": label})


# ------------------------------------------------------------ photometry --


@dataclass
class UploadReport:
    """What an upload did. ``errors`` holds one ``FILE:LINE: field: reason`` line per bad row."""

    path: str
    kind: str
    target_id: int
    target_name: str
    rows: int = 0
    stored: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    product: ProductResult | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


_TIME_MJD = ("mjd", "mjd_utc", "time_mjd", "obs_mjd")
_TIME_JD = ("jd", "jd_utc", "time_jd")
_TIME_ANY = ("time", "time_utc", "date", "date_obs", "date-obs", "obsdate", "datetime", "t", "epoch")
_COLS = {
    "mag": ("mag", "magnitude", "mag_ab", "m", "magpsf"),
    "mag_err": ("mag_err", "magerr", "e_mag", "mag_error", "emag", "dmag", "sigmamagpsf", "mag_unc"),
    "flux": ("flux", "flux_njy", "fnu"),
    "flux_err": ("flux_err", "fluxerr", "e_flux", "flux_error", "dflux", "flux_unc", "flux_err_njy"),
    "limit": ("limit", "lim", "limiting_mag", "limmag", "maglim", "upper_limit", "lim_mag", "mag_lim",
              "diffmaglim"),
    "band": ("band", "filter", "passband", "flt", "filt"),
    "kind": ("kind", "type", "phot_type"),
}
_FLUX_SCALED = {"flux_ujy": 1e3, "flux_mjy": 1e6, "flux_jy": 1e9}
_FLUX_ERR_SCALED = {"flux_err_ujy": 1e3, "fluxerr_ujy": 1e3, "flux_err_mjy": 1e6, "flux_err_jy": 1e9}
_KINDS = {"detection": "detection", "det": "detection", "upper_limit": "upper_limit", "limit": "upper_limit",
          "ul": "upper_limit", "nondetection": "upper_limit", "non_detection": "upper_limit",
          "forced": "forced", "forced_photometry": "forced"}
_MISSING = {"", "nan", "--", "null", "none", "na", "n/a", "masked"}
_MJD_RANGE = (15000.0, 100000.0)  # 1900 .. 2132


@dataclass
class _Column:
    name: str  # as in the file
    scale: float = 1.0  # multiply to get the unit tomd stores (nJy for fluxes)
    time_format: str | None = None  # mjd | jd | iso | auto (for the time column)
    time_scale: str = "utc"


@dataclass
class _Table:
    rows: list[tuple[int, dict[str, str]]]  # (line number, column → text)
    columns: dict[str, _Column]  # tomd field → column


def _lines_with_numbers(text: str) -> Iterator[tuple[int, str]]:
    for i, line in enumerate(text.splitlines(), 1):
        yield i, line


def _read_csv(path: str, text: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    lines = [(i, ln) for i, ln in _lines_with_numbers(text) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError("no header line", where=f"{path}:1")
    sample = lines[0][1]
    delim = "," if "," in sample else ("\t" if "\t" in sample else " ")
    reader = csv.reader([ln for _, ln in lines], delimiter=delim, skipinitialspace=delim == " ")
    header = [h.strip() for h in next(reader)]
    rows = []
    for (lineno, _), values in zip(lines[1:], reader):
        if len(values) != len(header):
            rows.append((lineno, {"__error__": f"{len(values)} values for {len(header)} columns"}))
            continue
        rows.append((lineno, dict(zip(header, (v.strip() for v in values)))))
    return header, rows


def _read_ecsv(path: str, text: str) -> tuple[list[str], list[tuple[int, dict[str, str]]], dict[str, dict]]:
    """Header (YAML) via astropy's loader; data lines parsed here so one bad row cannot sink the file."""
    from astropy.io.misc import yaml as ayaml

    head, data = [], []
    for i, ln in _lines_with_numbers(text):
        if ln.startswith("#"):
            head.append(ln[2:] if ln.startswith("# ") else ln[1:])
        elif ln.strip():
            data.append((i, ln))
    try:
        meta = ayaml.load("\n".join(h for h in head if not h.startswith("%ECSV") and h.strip() != "---")) or {}
    except Exception as exc:  # noqa: BLE001 - any YAML problem is the file's
        raise InputError(f"ECSV header is not valid YAML: {exc}", where=f"{path}:1") from None
    delim = meta.get("delimiter", " ")
    if not data:
        raise InputError("no column-name line after the ECSV header", where=f"{path}:{len(head) + 1}")
    reader = csv.reader([ln for _, ln in data], delimiter=delim, quotechar='"', skipinitialspace=delim == " ")
    header = next(reader)
    rows = []
    for (lineno, _), values in zip(data[1:], reader):
        if len(values) != len(header):
            rows.append((lineno, {"__error__": f"{len(values)} values for {len(header)} columns"}))
            continue
        rows.append((lineno, dict(zip(header, values))))
    info: dict[str, dict] = {c["name"]: dict(c) for c in meta.get("datatype", ()) if isinstance(c, dict)}
    table_meta = meta.get("meta") or {}
    if isinstance(table_meta, list):  # !!omap: a list of one-key mappings or pairs
        merged: dict[str, Any] = {}
        for item in table_meta:
            merged.update(item if isinstance(item, dict) else [tuple(item)])
        table_meta = merged
    serialized = table_meta.get("__serialized_columns__", {}) if isinstance(table_meta, dict) else {}
    serialized = serialized or {}
    for name, spec in serialized.items():
        if isinstance(spec, dict) and "Time" in str(spec.get("__class__", "")):
            info.setdefault(name, {"name": name})
            info[name]["time_format"] = spec.get("format")
            info[name]["time_scale"] = spec.get("scale", "utc")
    return header, rows, info


def _find(header: list[str], names: Iterable[str]) -> str | None:
    low = {h.lower(): h for h in header}
    for n in names:
        if n in low:
            return low[n]
    return None


def _flux_scale(path: str, col: str, unit: str | None) -> float:
    if not unit:
        return 1.0
    import astropy.units as u

    try:
        return float(u.Unit(unit).to(u.nJy))
    except (ValueError, u.UnitConversionError):
        raise InputError(f"unit {unit!r} is not a flux density (expected nJy, uJy, mJy, Jy…)",
                         where=path, field=col) from None


def _read_table(path: Path, shown: str) -> _Table:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not a text file ({exc.reason} at byte {exc.start})", where=shown) from None
    ecsv = text.lstrip().startswith("# %ECSV")
    info: dict[str, dict] = {}
    if ecsv:
        header, rows, info = _read_ecsv(shown, text)
    else:
        header, rows = _read_csv(shown, text)
    cols: dict[str, _Column] = {}
    # Time: one column, in this order of preference.
    for names, fmt in ((_TIME_MJD, "mjd"), (_TIME_JD, "jd"), (_TIME_ANY, "auto")):
        c = _find(header, names)
        if c is not None:
            ti = info.get(c, {})
            tf = {"mjd": "mjd", "jd": "jd", "isot": "iso", "iso": "iso", "fits": "iso"}.get(
                ti.get("time_format") or "", fmt)
            cols["time"] = _Column(c, time_format=tf, time_scale=(ti.get("time_scale") or "utc").lower())
            break
    else:
        raise InputError(f"no time column; expected one of mjd, jd, time, date_obs (columns: {', '.join(header)})",
                         where=f"{shown}:1")
    for f, names in _COLS.items():
        c = _find(header, names)
        if c is not None:
            cols[f] = _Column(c)
    for names, f in ((_FLUX_SCALED, "flux"), (_FLUX_ERR_SCALED, "flux_err")):
        if f not in cols:
            c = _find(header, names)
            if c is not None:
                cols[f] = _Column(c, scale=names[c.lower()])
    # Plain err/error columns belong to mag when there is one, else to flux.
    c = _find(header, ("err", "error", "e", "unc", "uncertainty", "sigma"))
    if c is not None:
        if "mag" in cols and "mag_err" not in cols:
            cols["mag_err"] = _Column(c)
        elif "flux" in cols and "flux_err" not in cols:
            cols["flux_err"] = _Column(c, scale=cols["flux"].scale)
    if ecsv:
        for f in ("flux", "flux_err"):
            if f in cols and info.get(cols[f].name, {}).get("unit"):
                cols[f].scale = _flux_scale(shown, cols[f].name, info[cols[f].name]["unit"])
    if not any(f in cols for f in ("mag", "flux", "limit")):
        raise InputError(f"no mag, flux or limit column (columns: {', '.join(header)})", where=f"{shown}:1")
    if "band" not in cols:
        raise InputError(f"no band (or filter) column (columns: {', '.join(header)})", where=f"{shown}:1")
    return _Table(rows, cols)


def _to_mjd_utc(text: str, col: _Column) -> float:
    """MJD (UTC) from one time cell; ValueError with a reason otherwise."""
    from astropy.time import Time

    fmt = col.time_format
    value: Any = text
    if fmt in ("mjd", "jd", "auto"):
        try:
            value = float(text)
        except ValueError:
            if fmt != "auto":
                raise ValueError(f"expected a number ({fmt.upper()}), got {text!r}") from None
            fmt = "iso"
        else:
            if fmt == "auto":
                fmt = "jd" if value > 2_400_000 else "mjd"
    if fmt == "iso":
        try:
            t = Time(text.strip().replace(" ", "T", 1) if "T" not in text else text.strip(), format="isot",
                     scale=col.time_scale)
        except ValueError:
            raise ValueError(f"expected an ISO 8601 time (2023-05-19T12:00:00) or MJD, got {text!r}") from None
    else:
        if not math.isfinite(value):
            raise ValueError(f"not a finite {fmt.upper()}: {text!r}")
        if col.time_scale == "utc":  # the common case: no astropy round trip
            mjd = value - 2_400_000.5 if fmt == "jd" else value
            t = None
        else:
            t = Time(value, format=fmt, scale=col.time_scale)
    if t is not None:
        mjd = float(t.utc.mjd)
    if not (_MJD_RANGE[0] <= mjd <= _MJD_RANGE[1]):
        raise ValueError(f"not a plausible time (MJD {mjd:.3f} is outside 1900..2132): {text!r}")
    return mjd


def _num(row: dict[str, str], col: _Column | None) -> float | None:
    if col is None:
        return None
    text = row.get(col.name, "")
    if text.strip().lower() in _MISSING:
        return None
    v = float(text)  # ValueError → reported by the caller
    if not math.isfinite(v):
        raise ValueError(f"not a finite number: {text!r}")
    return v * col.scale


def parse_photometry(path: str | os.PathLike[str], *, shown: str | None = None) \
        -> tuple[list[dict[str, Any]], list[str], int]:
    """Points (photometry row values without target/source/dedupe), errors, number of data rows.

    File-level problems (no time column, not text) raise InputError naming
    the file; each bad row becomes one ``FILE:LINE: field: reason`` line.
    """
    p = Path(path)
    shown = shown or str(path)
    table = _read_table(p, shown)
    cols = table.columns
    points, errors = [], []
    for lineno, row in table.rows:
        where = f"{shown}:{lineno}"
        if "__error__" in row:
            errors.append(f"{where}: {row['__error__']}")
            continue
        vals: dict[str, Any] = {}
        bad = False
        for f in ("mag", "mag_err", "flux", "flux_err", "limit"):
            try:
                vals[f] = _num(row, cols.get(f))
            except ValueError as exc:
                reason = str(exc) if "finite" in str(exc) else f"expected a number, got {row.get(cols[f].name)!r}"
                errors.append(f"{where}: {cols[f].name}: {reason}")
                bad = True
        try:
            mjd = _to_mjd_utc(row.get(cols["time"].name, ""), cols["time"])
        except ValueError as exc:
            errors.append(f"{where}: {cols['time'].name}: {exc}")
            bad = True
        band = row.get(cols["band"].name, "").strip()
        if not band:
            errors.append(f"{where}: {cols['band'].name}: missing band")
            bad = True
        elif len(band) > 32:
            errors.append(f"{where}: {cols['band'].name}: band longer than 32 characters")
            bad = True
        kind = None
        if "kind" in cols and row.get(cols["kind"].name, "").strip():
            raw = row[cols["kind"].name].strip().lower()
            kind = _KINDS.get(raw)
            if kind is None:
                errors.append(f"{where}: {cols['kind'].name}: expected detection, upper_limit or forced, got {raw!r}")
                bad = True
        if bad:
            continue
        problem = _check_point(vals, kind)
        if problem:
            errors.append(f"{where}: {cols.get(problem[0], cols['time']).name}: {problem[1]}")
            continue
        mag, mag_err, flux, flux_err, limit = (vals[f] for f in ("mag", "mag_err", "flux", "flux_err", "limit"))
        if kind is None:
            kind = "detection" if mag is not None or flux is not None else "upper_limit"
        if kind == "upper_limit" and limit is None:
            limit, mag, mag_err = mag, None, None
        if mag is None and flux is not None and kind != "upper_limit":
            mag, mag_err = flux_to_mag(flux), flux_err_to_mag_err(flux, flux_err)
        points.append({"mjd": mjd, "band": band, "kind": kind, "mag": mag, "mag_err": mag_err, "flux": flux,
                       "flux_err": flux_err, "limit": limit, "_line": lineno})
    return points, errors, len(table.rows)


def _check_point(v: dict[str, float | None], kind: str | None) -> tuple[str, str] | None:
    for f in ("mag", "limit"):
        if v[f] is not None and not (-30.0 <= v[f] <= 40.0):
            return f, f"{v[f]} is not a plausible AB magnitude (-30..40)"
    for f in ("mag_err", "flux_err"):
        if v[f] is not None and v[f] < 0:
            return f, f"an uncertainty cannot be negative ({v[f]})"
    if v["mag"] is None and v["flux"] is None and v["limit"] is None:
        return "mag", "no mag, flux or limit in this row"
    if kind == "upper_limit" and v["limit"] is None and v["mag"] is None:
        return "limit", "an upper limit needs a limiting magnitude"
    if kind in ("detection", "forced") and v["mag"] is None and v["flux"] is None:
        return "mag", f"a {kind} needs a mag or a flux"
    return None


def upload_source(filename: str) -> str:
    """``upload:<filename>``, fitted to the 32-character source column (long names keep a hash)."""
    src = f"upload:{filename}"
    if len(src) <= _SOURCE_LEN:
        return src
    h = hashlib.sha1(filename.encode()).hexdigest()[:8]
    return f"upload:{filename[:_SOURCE_LEN - 7 - 9]}~{h}"


def _dedupe(source: str, p: dict[str, Any]) -> str:
    return f"{source}|{p['band']}|{p['kind']}|{p['mjd']:.6f}"  # the key ingest uses


# ----------------------------------------------------------------- FITS --

FITS_KEYS = ("DATE-OBS", "MJD-OBS", "FILTER", "EXPTIME", "INSTRUME", "TELESCOP", "OBJECT", "RA", "DEC",
             "AIRMASS", "OBSERVER", "BUNIT")


def fits_meta(stream: BinaryIO) -> dict[str, Any]:
    """Header metadata of a FITS file read from a stream (seekable: see ``storage.seekable``).

    The first HDU that has the keys wins for each key. RA/DEC in degrees or
    sexagesimal also give ``ra_deg``/``dec_deg``. Raises ValueError if the
    stream is not FITS.
    """
    from astropy.io import fits

    from tomd import sky

    head = stream.read(6)
    stream.seek(0)
    if head != b"SIMPLE":
        raise ValueError("not a FITS file (no SIMPLE card)")
    meta: dict[str, Any] = {}
    with fits.open(stream, lazy_load_hdus=True, memmap=False) as hdul:
        for i, hdu in enumerate(hdul):
            h = hdu.header
            for k in FITS_KEYS:
                if k in h and k not in meta and h[k] not in (None, ""):
                    v = h[k]
                    meta[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
            naxis = int(h.get("NAXIS", 0) or 0)
            # The data's shape: the primary's, or the first extension with data (.fz files)
            if i == 0 or (not meta.get("shape") and naxis and h.get("XTENSION") in ("IMAGE", "BINTABLE")
                          and getattr(hdu, "is_image", False)):
                meta["NAXIS"] = naxis
                meta["shape"] = [h.get(f"NAXIS{j}") for j in range(naxis, 0, -1)]  # numpy order (rows, cols)
            if i >= 4:  # a large multi-extension file: the first few HDUs are enough
                break
        meta["n_hdu"] = len(hdul) if i < 4 else None
    for k, parse, out in (("RA", sky.parse_ra, "ra_deg"), ("DEC", sky.parse_dec, "dec_deg")):
        if k in meta:
            try:
                meta[out] = parse(meta[k])
            except (ValueError, TypeError):
                pass
    return meta


def header_meta(head: bytes, *, max_hdus: int = 2) -> dict[str, Any]:
    """Header metadata from the first bytes of a FITS file (captured while it streams by).

    Reads the primary header and, when the head holds it, the next one
    (compressed ``.fz`` images keep their keys in the first extension);
    never the data. ``{}`` when the bytes are not FITS or no header ends
    within them: the metadata is a convenience, never a reason to fail.
    """
    from astropy.io import fits

    from tomd import sky

    if head[:6] != b"SIMPLE":
        return {}
    meta: dict[str, Any] = {}
    pos = 0
    for i in range(max_hdus):
        end = _header_end(head, pos)
        if end is None:
            break
        try:
            h = fits.Header.fromstring(head[pos:end].decode("ascii", "replace"))
        except Exception:  # noqa: BLE001 - a damaged header gives no metadata, not an error
            break
        for k in FITS_KEYS:
            if k in h and k not in meta and h[k] not in (None, ""):
                v = h[k]
                meta[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
        prefix = "Z" if h.get("ZIMAGE") else ""
        naxis = int(h.get(f"{prefix}NAXIS", 0) or 0)
        if naxis and "shape" not in meta:
            meta["shape"] = [h.get(f"{prefix}NAXIS{j}") for j in range(naxis, 0, -1)]
        try:  # skip the data unit to the next header
            raw_axes = [int(h.get(f"NAXIS{j}", 0) or 0) for j in range(1, int(h.get("NAXIS", 0) or 0) + 1)]
            n = math.prod(raw_axes) if raw_axes else 0
            size = abs(int(h.get("BITPIX", 8))) // 8 * int(h.get("GCOUNT", 1) or 1) * \
                (int(h.get("PCOUNT", 0) or 0) + n)
        except (TypeError, ValueError):
            break
        pos = end + -(-size // 2880) * 2880
    for k, parse, out in (("RA", sky.parse_ra, "ra_deg"), ("DEC", sky.parse_dec, "dec_deg")):
        if k in meta:
            try:
                meta[out] = parse(meta[k])
            except (ValueError, TypeError):
                pass
    return meta


def _header_end(head: bytes, pos: int) -> int | None:
    """Where the header starting at ``pos`` ends (after its END card, padded to 2880), or None."""
    for card in range(pos, len(head) - 79, 80):
        if head[card:card + 3] == b"END" and head[card + 3:card + 80].strip() == b"":
            end = pos + -(-(card + 80 - pos) // 2880) * 2880
            return end if end <= len(head) else None
    return None


def _looks_like_spectrum(meta: dict[str, Any]) -> bool:
    shape = meta.get("shape") or []
    return meta.get("NAXIS") == 1 or (len(shape) == 2 and min(shape) == 1)


# --------------------------------------------------------------- uploads --

_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz", ".fz")
_TABLE_SUFFIXES = (".csv", ".ecsv", ".txt", ".dat", ".tsv")


def guess_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_FITS_SUFFIXES):
        return "image"
    if name.endswith(_TABLE_SUFFIXES):
        return "photometry"
    raise InputError("cannot tell the kind of file from its name; give --type photometry|spectroscopy|image",
                     where=str(path))


def _resolve_target(s: Session, target: str | int | Target) -> Target:
    from tomd.targets.store import resolve

    if isinstance(target, Target):
        return target
    t = resolve(s, f"#{target}" if isinstance(target, int) else str(target))
    if t is None:
        raise NotFoundError(f"no target named {target!r}")
    return t


def _file_md5(path: Path) -> tuple[str, int]:
    h = hashlib.md5(usedforsecurity=False)
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def target_dir(t: Target) -> str:
    """The first key component for a target's files: ``<id>-<name>`` (ids are stable, names help people)."""
    return safe_component(f"{t.id}-{t.name}")


def upload(sessions: sessionmaker[Session], storage: Store, target_name: str | int, path: str | os.PathLike[str],
           kind: str | None = None) -> UploadReport:
    """Upload a photometry table, a FITS image or a spectrum for a target.

    Photometry: rows become photometry points (bad rows reported, good ones
    kept) and the file itself is kept as a ``photometry`` data product.
    Images and spectra: stored through ``storage`` and recorded with their
    FITS header metadata. The data product id is ``<target id>:<md5>``, so
    the same file uploaded again is recorded once.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("no such file", where=str(path))
    kind = kind or guess_kind(p)
    if kind not in ("photometry", "spectroscopy", "image"):
        raise InputError(f"expected photometry, spectroscopy or image, got {kind!r}", field="--type")
    with sessions() as s:
        t = _resolve_target(s, target_name)
        tid, tname, tdir = t.id, t.name, target_dir(t)
    report = UploadReport(str(path), kind, tid, tname)
    meta: dict[str, Any] = {"original_name": p.name}
    points: list[dict[str, Any]] = []
    if kind == "photometry":
        points, report.errors, report.rows = parse_photometry(p)
        meta["rows"], meta["bad_rows"] = report.rows, len(report.errors)
        if not points:
            return report  # nothing usable: nothing stored
    elif p.name.lower().endswith(_FITS_SUFFIXES):
        try:
            with open(p, "rb") as f:
                meta.update(fits_meta(f))
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot read FITS header: {exc}", where=str(path)) from None
        if kind == "image" and _looks_like_spectrum(meta):
            meta["note"] = "one-dimensional data: perhaps a spectrum (--type spectroscopy)"
    elif kind == "image":
        raise InputError("an image must be a FITS file (.fits, .fit, .fts, .fz)", where=str(path))
    report.meta = meta

    md5, size = _file_md5(p)
    key = "/".join((tdir, "upload", safe_component(f"{kind}-{md5[:8]}"), safe_component(p.name)))
    product_id = f"{tid}:{md5}"
    with sessions() as s:
        existing = repo.get_data_product(s, "upload", product_id)
    if existing is None or not storage.exists(existing.storage_key or key):
        with open(p, "rb") as f:
            storage.put(key, f, size=size, md5=md5)  # refuses the file if it changed meanwhile
    source = upload_source(p.name)
    with sessions.begin() as s:
        report.product = record_product(s, facility="upload", product_id=product_id, kind=kind, filename=p.name,
                                         storage_key=key, size=size, md5=md5, target_id=tid, meta=meta)
        if points:
            rows, seen = [], set()
            for pt in points:
                d = _dedupe(source, pt)
                if d in seen:
                    report.duplicates += 1
                    continue
                seen.add(d)
                rows.append({k: v for k, v in pt.items() if k != "_line"} | {
                    "target_id": tid, "source": source, "dedupe": d, "alert_id": None})
            have: set[str] = set()
            for i in range(0, len(rows), 5000):
                have |= repo.existing_photometry_keys(s, tid, [r["dedupe"] for r in rows[i:i + 5000]])
            new = [r for r in rows if r["dedupe"] not in have]
            report.duplicates += len(rows) - len(new)
            for i in range(0, len(new), 5000):
                repo.insert_photometry(s, new[i:i + 5000])
            report.stored = len(new)
    return report


# ---------------------------------------------------------------- export --

EXPORT_COLUMNS = ("mjd", "time_utc", "band", "kind", "mag", "mag_err", "flux", "flux_err", "limit", "source")


def photometry_rows(sessions: sessionmaker[Session], target: str | int | Target) -> tuple[Target, list[dict]]:
    with sessions() as s:
        t = _resolve_target(s, target)
        pts = repo.photometry_of(s, t.id)
        s.expunge(t)
    from astropy.time import Time

    rows = []
    times = Time([p.mjd for p in pts], format="mjd", scale="utc").isot if pts else []
    for p, iso in zip(pts, times):
        rows.append({"mjd": p.mjd, "time_utc": iso, "band": p.band, "kind": p.kind, "mag": p.mag,
                     "mag_err": p.mag_err, "flux": p.flux, "flux_err": p.flux_err, "limit": p.limit,
                     "source": p.source})
    return t, rows


def export_photometry(sessions: sessionmaker[Session], target: str | int | Target, fmt: str = "csv") -> str:
    """The target's photometry as CSV or ECSV text (MJD in UTC, AB mag, flux in nJy).

    The output uploads back unchanged (``upload`` reads these columns).
    """
    t, rows = photometry_rows(sessions, target)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(EXPORT_COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else (repr(r[c]) if isinstance(r[c], float) else r[c])
                        for c in EXPORT_COLUMNS])
        return out.getvalue()
    if fmt != "ecsv":
        raise InputError(f"expected csv or ecsv, got {fmt!r}", field="--format")
    import numpy as np
    from astropy.table import MaskedColumn, Table

    units = {"mjd": "d", "mag": "mag", "mag_err": "mag", "flux": "nJy", "flux_err": "nJy", "limit": "mag"}
    desc = {"mjd": "Modified Julian Date (UTC)", "time_utc": "ISO 8601, UTC", "mag": "AB magnitude",
            "flux": "difference or total flux density", "limit": "limiting AB magnitude (upper limits)",
            "kind": "detection | upper_limit | forced", "source": "survey, or upload:<file>"}
    tab = Table(meta={"target": t.name, "target_id": t.id, "time_scale": "UTC",
                      "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    for c in EXPORT_COLUMNS:
        vals = [r[c] for r in rows]
        if c in units:
            data = np.array([np.nan if v is None else v for v in vals], dtype=float)
            tab[c] = MaskedColumn(data, mask=np.isnan(data), unit=units[c], description=desc.get(c))
        else:
            tab[c] = MaskedColumn(np.array(vals, dtype=str) if vals else np.array([], dtype=str),
                                  description=desc.get(c))
    out = io.StringIO()
    tab.write(out, format="ascii.ecsv")
    return out.getvalue()


# ------------------------------------------------------------------ plot --

# Colours per band family (survey prefixes such as "ztf" or "lsst" stripped).
_BAND_COLOURS = {
    "u": "#6a3d9a", "b": "#1f4e9c", "g": "#2ca02c", "v": "#7fbf3f", "r": "#d62728", "i": "#8c2d04",
    "z": "#555555", "y": "#e6a700", "w": "#17becf", "c": "#1f9ec9", "o": "#ff7f0e", "clear": "#444444",
    "l": "#444444", "j": "#b15928", "h": "#a6761d", "k": "#7f3b08",
}
_BAND_ORDER = "u b g c v w r o i z y j h k".split()


def _band_key(band: str) -> str:
    b = band.lower().replace("sdss", "").replace("ztf", "").replace("lsst", "").replace("ps1", "")
    b = re.sub(r"[^a-z]", "", b).rstrip("p") or band.lower()  # r' → r
    return b if b in _BAND_COLOURS else b[:1]


MIN_SNR_FOR_MAG = 3.0  # forced fluxes below this S/N stay on the flux panel only


def _significant(r: dict[str, Any]) -> bool:
    """A forced point worth a magnitude: positive flux at S/N >= 3 (or no flux to judge by)."""
    if r["flux"] is None:
        return True
    if r["flux"] <= 0:
        return False
    return not r["flux_err"] or r["flux"] / r["flux_err"] >= MIN_SNR_FOR_MAG


def _band_label(band: str) -> str:
    """"ztfg" → "ZTF g", "lsstr" → "LSST r"; other names as they are."""
    m = re.fullmatch(r"(ztf|lsst|sdss|ps1|atlas)[_-]?(\w+)", band, re.IGNORECASE)
    return f"{m.group(1).upper()} {m.group(2)}" if m else band


def plot_light_curve(sessions: sessionmaker[Session], target: str | int | Target, out_path: str | os.PathLike[str],
                     *, title: str | None = None) -> Path:
    """A publication-style light curve PNG (or PDF/SVG by suffix); returns the path.

    Detections with error bars per band; upper limits as downward arrows;
    forced photometry converted to magnitudes where the flux is positive
    and significant (S/N >= 3), and all forced/flux points on a lower flux
    panel (nJy or µJy) where negative fluxes are real measurements. Agg backend: no display needed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    t, rows = photometry_rows(sessions, target)
    if not rows:
        raise InputError(f"target {t.name!r} has no photometry to plot")
    mjd0 = math.floor(min(r["mjd"] for r in rows))
    flux_rows = [r for r in rows if r["flux"] is not None and (r["kind"] == "forced" or r["mag"] is None)]
    has_flux_panel = bool(flux_rows)
    bands = sorted({r["band"] for r in rows}, key=lambda b: (_BAND_ORDER.index(_band_key(b))
                                                             if _band_key(b) in _BAND_ORDER else 99, b))
    fallback = iter(plt.get_cmap("tab10").colors)
    colour = {b: _BAND_COLOURS.get(_band_key(b)) or next(fallback) for b in bands}

    rc = {"font.family": "serif", "font.size": 10, "axes.linewidth": 0.8, "xtick.direction": "in",
          "ytick.direction": "in", "xtick.top": True, "ytick.right": True, "xtick.minor.visible": True,
          "ytick.minor.visible": True, "legend.frameon": False, "mathtext.fontset": "dejavuserif"}
    with plt.rc_context(rc):
        fig = Figure(figsize=(7.0, 5.2 if has_flux_panel else 4.2), dpi=150)
        if has_flux_panel:
            ax, axf = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1], "hspace": 0.05})
        else:
            ax, axf = fig.subplots(1, 1), None
        mags_all: list[float] = []
        mag_values = [r["mag"] if r["mag"] is not None else r["limit"] for r in rows]
        mag_values = [m for m in mag_values if m is not None]
        arrow = max(0.15, 0.06 * (max(mag_values) - min(mag_values))) if mag_values else 0.3
        fluxes = [abs(r["flux"]) for r in flux_rows]
        fscale, funit = (1e3, "µJy") if fluxes and max(fluxes) >= 1e4 else (1.0, "nJy")
        for b in bands:
            c = colour[b]
            det = [r for r in rows if r["band"] == b and r["kind"] == "detection" and r["mag"] is not None]
            frc = [r for r in rows if r["band"] == b and r["kind"] == "forced" and r["mag"] is not None
                   and _significant(r)]
            lim = [r for r in rows if r["band"] == b and r["kind"] == "upper_limit" and r["limit"] is not None]
            label_used = False
            if det:
                ax.errorbar([r["mjd"] - mjd0 for r in det], [r["mag"] for r in det],
                            yerr=[r["mag_err"] or 0.0 for r in det], fmt="o", ms=4.5, color=c, mec="black",
                            mew=0.4, elinewidth=0.9, capsize=0, label=b, zorder=3)
                label_used = True
                mags_all += [r["mag"] for r in det]
            if frc:
                ax.errorbar([r["mjd"] - mjd0 for r in frc], [r["mag"] for r in frc],
                            yerr=[r["mag_err"] or 0.0 for r in frc], fmt="s", ms=3.5, mfc="white", color=c,
                            mew=0.9, elinewidth=0.8, capsize=0, label=None if label_used else b, zorder=2)
                label_used = True
                mags_all += [r["mag"] for r in frc]
            if lim:  # an arrow from the limit towards fainter magnitudes (down on the page)
                ax.scatter([r["mjd"] - mjd0 for r in lim], [r["limit"] for r in lim], marker="_", s=40,
                           color=c, alpha=0.6, linewidths=1.2, zorder=1)
                for r in lim:  # fainter = larger magnitude = lower on the page (inverted axis)
                    ax.annotate("", xy=(r["mjd"] - mjd0, r["limit"] + arrow), xytext=(r["mjd"] - mjd0, r["limit"]),
                                arrowprops={"arrowstyle": "-|>,head_length=0.35,head_width=0.18", "color": c,
                                            "alpha": 0.6, "lw": 1.0, "shrinkA": 0, "shrinkB": 0}, zorder=1)
                mags_all += [r["limit"] + arrow for r in lim]
            if axf is not None:
                fx = [r for r in flux_rows if r["band"] == b]
                if fx:
                    axf.errorbar([r["mjd"] - mjd0 for r in fx], [r["flux"] / fscale for r in fx],
                                 yerr=[(r["flux_err"] or 0.0) / fscale for r in fx], fmt="s" if fx[0]["kind"] == "forced"
                                 else "o", ms=3.5, color=c, mfc="white", mew=0.9, elinewidth=0.8, capsize=0,
                                 zorder=2)
        if mags_all:
            lo, hi = min(mags_all), max(mags_all)
            pad = max(0.3, 0.08 * (hi - lo))
            ax.set_ylim(hi + pad, lo - pad)  # magnitudes: brighter is up
        else:
            ax.invert_yaxis()
            ax.text(0.5, 0.5, "no magnitudes (flux only)", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_ylabel("AB magnitude")
        bottom = axf if axf is not None else ax
        bottom.set_xlabel(f"MJD − {mjd0} (UTC)")
        if axf is not None:
            axf.axhline(0.0, color="0.5", lw=0.7, ls="--", zorder=0)
            axf.set_ylabel(f"flux ({funit})")
        from astropy.time import Time

        start = Time(mjd0, format="mjd", scale="utc").iso[:10]
        fig.suptitle(title or t.name, x=0.125, ha="left", fontsize=12, y=1.0)
        ax.set_title(f"MJD {mjd0} = {start}", loc="right", fontsize=8, color="0.3")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="", marker="o", ms=5, color=colour[b], mec="black", mew=0.4) for b in bands]
        labels = [_band_label(b) for b in bands]
        keys = [Line2D([], [], ls="", marker="o", color="0.3", mec="black", mew=0.4, label="detection")]
        if any(r["kind"] == "forced" for r in rows):
            keys.append(Line2D([], [], ls="", marker="s", mfc="white", color="0.3", label="forced"))
        if any(r["kind"] == "upper_limit" for r in rows):
            keys.append(Line2D([], [], ls="", marker=r"$\downarrow$", color="0.3", alpha=0.6, ms=9,
                               label="upper limit"))
        if handles:  # bands in a row above the axes, symbol key inside
            bands_legend = ax.legend(handles, labels, ncols=min(len(labels), 8), loc="lower left",
                                     bbox_to_anchor=(0.0, 1.01), handletextpad=0.2, columnspacing=1.0,
                                     fontsize=9, borderaxespad=0.0)
            ax.add_artist(bands_legend)
        ax.legend(handles=keys, loc="best", fontsize=8, handletextpad=0.3)
        fig.align_ylabels()
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight")
    return out


# ------------------------------------------------------------- listings --


def list_products(sessions: sessionmaker[Session], target: str | int | None = None, *,
                  request_id: int | None = None) -> list[dict[str, Any]]:
    """Data products as plain dicts (newest last), optionally for one target and/or one request."""
    with sessions() as s:
        tid = _resolve_target(s, target).id if target is not None else None
        rows: list[DataProduct] = repo.query_data_products(s, target_id=tid, request_id=request_id)
        names = {t.id: t.name for t in repo.query_targets(s, ids=list({r.target_id for r in rows if r.target_id}))}
        return [{"id": r.id, "target": names.get(r.target_id), "target_id": r.target_id, "facility": r.facility,
                 "product_id": r.product_id, "kind": r.kind, "filename": r.filename, "size": r.size, "md5": r.md5,
                 "state": r.state, "storage_key": r.storage_key, "request_id": r.request_id,
                 "notice_id": r.notice_id, "meta": r.meta or {}, "attempts": r.attempts or 0, "error": r.error,
                 "stored_at": r.stored_at.isoformat() if r.stored_at else None} for r in rows]
