"""Fink output: ZTF (or Rubin) alert packets plus Fink's added columns → Alert.

Fink's Kafka output and data-transfer files carry the survey packet fields at
top level and add classification and cross-match columns (``cdsxmatch``,
``finkclass``, ``rf_snia_vs_nonia``, ``snn_*``, ``tns``, ``roid``, …; older
outputs ``rfscore``, ``snn``). The survey part is parsed by the ZTF or Rubin
parser; the added scalar columns go into ``fields`` as they are named, the
non-scalar ones stay in the payload.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tomd.alerts.model import Alert
from tomd.errors import ParseError

from . import rubin, ztf
from ._common import scalar_items
from .ztf import clean


def parse(record: dict, *, source: str = "fink") -> list[Alert]:
    if "candidate" in record:
        survey, base, packet_keys = "ztf", ztf.parse(record, source=source), ztf.PACKET_KEYS
    elif "diaSource" in record:
        survey, base, packet_keys = "rubin", rubin.parse(record, source=source), rubin.PACKET_KEYS
    else:
        raise ParseError("Fink record has neither candidate (ZTF) nor diaSource (Rubin)")
    extra = {k: v for k, v in record.items() if k not in packet_keys}
    out = []
    for alert in base:
        fields: dict[str, Any] = dict(alert.fields)
        fields.update(scalar_items(extra))
        fields["survey"] = survey
        aliases = list(alert.aliases)
        tns = extra.get("tns")
        if isinstance(tns, str) and tns.strip():
            aliases.append(tns.strip())
        payload = dict(alert.payload)
        payload.update(clean(extra))
        out.append(dataclasses.replace(alert, fields=fields, payload=payload, aliases=tuple(aliases)))
    return out
