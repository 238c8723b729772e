"""Real ZTF packets from ../shared/data and realistic copies of them.

``next_alert`` makes the alert a survey would send next for the same object:
a new candid, a later time, the previous candidate moved into the history.
The copies are re-encoded with the packet's own writer schema.
"""

from __future__ import annotations

import copy
import functools
import io
from pathlib import Path

import fastavro

from tests.conftest import SHARED_DATA


def ztf_files() -> list[Path]:
    """The shared ZTF packets, those whose alerts are all positive subtractions first.

    A negative subtraction (isdiffpos 'f': fainter than the reference) has no
    ``alert.mag``, and most tests' rules read it (``alert.mag > 0``): the
    first files are alerts with a magnitude. Sorted by path within each group.
    """
    return sorted(sorted((SHARED_DATA / "ztf").rglob("*.avro")), key=lambda p: not _all_positive(p))


@functools.cache
def _all_positive(path: Path) -> bool:
    with open(path, "rb") as fh:
        return all(str(r["candidate"]["isdiffpos"]).lower() not in ("f", "0") for r in fastavro.reader(fh))


def read_ztf(path: Path) -> tuple[dict, list[dict]]:
    with open(path, "rb") as fh:
        reader = fastavro.reader(fh)
        return reader.writer_schema, list(reader)


def encode(schema: dict, records: list[dict]) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, fastavro.parse_schema(schema), records)
    return buf.getvalue()


def next_alert(schema: dict, record: dict, *, new_candid: int, days_later: float = 1.0,
               mag_change: float = -0.3) -> dict:
    rec = copy.deepcopy(record)
    prev = copy.deepcopy(record["candidate"])
    history_fields = {f["name"] for f in _prv_fields(schema)}
    prev_entry = {k: v for k, v in prev.items() if k in history_fields}
    for f in history_fields - prev_entry.keys():
        prev_entry[f] = None
    rec["prv_candidates"] = list(rec.get("prv_candidates") or []) + [prev_entry]
    cand = rec["candidate"]
    cand["candid"] = new_candid
    cand["jd"] = prev["jd"] + days_later
    cand["magpsf"] = prev["magpsf"] + mag_change
    rec["candid"] = new_candid
    return rec


def _prv_fields(schema: dict) -> list[dict]:
    for f in schema["fields"]:
        if f["name"] == "prv_candidates":
            t = f["type"]
            arr = next(x for x in t if isinstance(x, dict) and x.get("type") == "array")
            return arr["items"]["fields"]
    raise KeyError("prv_candidates")
