"""TNS designations in broker columns: a name, or only a classification?

Brokers add TNS columns under names that do not say which they hold: Fink's
``tns`` holds the TNS *classification* of a cross-matched object ("SN Ia",
"SN II"), Lasair's ``tns_name`` holds the designation ("2024abc"). Recording
a classification as a target alias would merge every object of that class
into one target (ingest matches by alias before position), so an alias is
made only from a value shaped like a real TNS designation: an optional
object-type prefix, a year and 1 to 4 letters ("AT 2025abc", "SN2024xyz",
"2025aa"; old IAU names such as "SN 1987A", and FRBs named by date, "FRB 20201124A").
"""

from __future__ import annotations

import re

# The TNS object-type prefixes, as in tomd.targets.names (which matches
# "AT 2025abc" and "SN 2025abc" as one object).
_DESIGNATION = re.compile(
    r"^(?:(AT|SN|TDE|KN|FRB|LRN|LBV|ILRT|NOVA)\s*)?((?:19|20)\d\d(?:[01]\d[0-3]\d)?)\s*([A-Za-z]{1,4})$", re.IGNORECASE
)


def tns_designation(value: object) -> str | None:
    """``value`` as a TNS designation ("SN 2025abc", "2025abc"), or None when it is not one."""
    if not isinstance(value, str):
        return None
    m = _DESIGNATION.match(value.strip())
    if not m:
        return None
    prefix, year, letters = m.groups()
    return f"{prefix.upper()} {year}{letters}" if prefix else year + letters
