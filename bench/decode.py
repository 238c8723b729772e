"""Decode + parse throughput on the shared ZTF samples.

Prints one JSON object (alerts/s for tomd's ``parse_message("ztf-avro")``,
for its decode step alone, and for plain ``fastavro.reader`` per message as
the baseline) and one human line. Usage: ``python bench/decode.py [N]``.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import fastavro

from tomd.alerts.decode import decode_avro_ocf
from tomd.alerts.parse import parse_message

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ztf"


def _rate(fn, messages: list[bytes], rounds: int) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for m in messages:
            n += len(fn(m))
    return n / (time.perf_counter() - t0), n


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    messages = [p.read_bytes() for p in sorted(DATA.rglob("*.avro"))]
    if not messages:
        print(json.dumps({"error": f"no ZTF samples under {DATA}"}))
        return 1
    parse_message("ztf-avro", messages[0])  # warm the schema cache and imports
    tomd_rate, n = _rate(lambda m: parse_message("ztf-avro", m), messages, rounds)
    decode_rate, _ = _rate(decode_avro_ocf, messages, rounds)
    base_rate, _ = _rate(lambda m: list(fastavro.reader(io.BytesIO(m))), messages, rounds)
    result = {
        "benchmark": "ztf-decode-parse",
        "messages": len(messages),
        "rounds": rounds,
        "alerts": n,
        "tomd_decode_parse_alerts_per_s": round(tomd_rate, 1),
        "tomd_decode_only_alerts_per_s": round(decode_rate, 1),
        "fastavro_reader_alerts_per_s": round(base_rate, 1),
        "speedup_decode_vs_fastavro_reader": round(decode_rate / base_rate, 2),
    }
    print(json.dumps(result))
    print(
        f"tomd decode+parse {tomd_rate:,.0f} alerts/s (decode alone {decode_rate:,.0f}/s) vs "
        f"fastavro.reader {base_rate:,.0f}/s on {len(messages)} ZTF packets x {rounds}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
