"""Target names: one normal form so that "ZTF 25abc" is "ZTF25abc".

Matching ignores case, spaces and punctuation. TNS designations also ignore
their prefix, because TNS renames "AT 2025abc" to "SN 2025abc" when the
object is classified: it stays the same object.
"""

from __future__ import annotations

import re
import unicodedata

# TNS object-type prefixes (https://www.wis-tns.org): the name after the
# prefix is the designation.
_TNS = re.compile(r"^(?:at|sn|tde|kn|frb|lrn|lbv|ilrt|nova)?((?:19|20)\d\d[a-z]{1,4})$")
_DROP = re.compile(r"[\W_]+", re.UNICODE)


def normalize(name: str) -> str:
    """The match key of ``name``: casefolded, punctuation and spaces removed."""
    key = _DROP.sub("", name.casefold())
    m = _TNS.match(key)
    if m:
        return "tns" + m.group(1)
    return key


def check_name(name: object) -> str:
    """A usable display name, or ValueError saying why not."""
    if not isinstance(name, str):
        raise ValueError(f"a name must be text, got {name!r}")
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in name):
        raise ValueError(f"a name must not contain control characters, got {name!r}")
    shown = " ".join(name.split())
    if not shown:
        raise ValueError("a name must not be empty")
    if len(shown) > 200:
        raise ValueError(f"a name must be at most 200 characters, got {len(shown)}")
    if not normalize(shown):
        raise ValueError(f"a name needs at least one letter or digit, got {name!r}")
    return shown
