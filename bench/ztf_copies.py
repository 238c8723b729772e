"""Copies of the real ZTF packets in ../shared/data with unique ids and spread positions.

Each copy keeps its packet's schema, history and cutouts (the bytes a real
stream carries) and gets a new candid, objectId and a random sky position,
so ingest creates a new target per copy, as a fresh night would.
"""

from __future__ import annotations

import io
import string
from pathlib import Path

import fastavro
import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _object_id(i: int) -> str:
    letters = string.ascii_lowercase
    s = ""
    for _ in range(7):
        i, r = divmod(i, 26)
        s = letters[r] + s
    return f"ZTF26{s}"


def ztf_copies(n: int, seed: int = 0) -> list[bytes]:
    packets = []
    for p in sorted((SHARED / "ztf").rglob("*.avro")):
        with open(p, "rb") as fh:
            r = fastavro.reader(fh)
            schema = fastavro.parse_schema(r.writer_schema)
            packets += [(schema, rec) for rec in r]
    if not packets:
        raise SystemExit(f"no ZTF samples under {SHARED / 'ztf'}")
    rng = np.random.default_rng(seed)
    ras = rng.uniform(0, 360, n)
    decs = np.degrees(np.arcsin(rng.uniform(-0.5, 1.0, n)))  # ZTF's sky: dec > -30
    out = []
    for i in range(n):
        schema, rec = packets[i % len(packets)]
        rec = dict(rec)
        cand = dict(rec["candidate"])
        dra, ddec = ras[i] - cand["ra"], decs[i] - cand["dec"]
        cand["candid"] = 3_000_000_000_000_000_000 + i
        cand["ra"], cand["dec"] = float(ras[i]), float(decs[i])
        rec["candidate"] = cand
        rec["candid"] = cand["candid"]
        rec["objectId"] = _object_id(i)
        # Move the history with the object, so its points stay "on" it.
        rec["prv_candidates"] = [
            {**p, "ra": (p["ra"] + dra) % 360 if p.get("ra") is not None else None,
             "dec": max(-90.0, min(90.0, p["dec"] + ddec)) if p.get("dec") is not None else None}
            for p in (rec.get("prv_candidates") or [])
        ]
        buf = io.BytesIO()
        fastavro.writer(buf, schema, [rec])
        out.append(buf.getvalue())
    return out
