"""Minor-planet designations: MPC packed form and Rubin's ``ssObjectId``.

Rubin identifies a known solar-system object by ``ssObjectId``: the ASCII
bytes of the MPC *packed* primary provisional designation read as a
big-endian integer ("K13L24L" → 21164719644750924, i.e. 2013 LL24). Ingest
attaches an ssSource alert to the target named ``ssObject <id>`` (see
``tomd.alerts.ingest``), so targets made from the MPC or Horizons carry that
name too.
"""

from __future__ import annotations

import re

_CENTURY = {"18": "I", "19": "J", "20": "K"}
_PROVISIONAL = re.compile(r"^(1[89]|20)(\d\d) ([A-HJ-Y])([A-HJ-Z])(\d*)$")
_CYCLE_LETTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def pack_provisional(unpacked: str) -> str | None:
    """"2013 LL24" → "K13L24L" (MPC packed provisional designation); None for other forms."""
    m = _PROVISIONAL.match(" ".join(unpacked.split()))
    if not m:
        return None
    century, yy, half, second, cycle = m.groups()
    n = int(cycle) if cycle else 0
    if n >= 620:
        return None  # beyond the 7-character packed form
    return f"{_CENTURY[century]}{yy}{half}{_CYCLE_LETTERS[n // 10]}{n % 10}{second}"


def rubin_ss_object_id(packed: str) -> int | None:
    """Rubin's ssObjectId of a packed designation (7 or 8 ASCII characters)."""
    if not 7 <= len(packed) <= 8 or not packed.isascii():
        return None
    return int.from_bytes(packed.encode("ascii"), "big")


def rubin_alias(packed: str | None) -> str | None:
    """The target name ingest looks for: ``ssObject <ssObjectId>``."""
    ss = rubin_ss_object_id(packed) if packed else None
    return f"ssObject {ss}" if ss else None
