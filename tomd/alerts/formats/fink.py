"""Fink output: ZTF (or Rubin) alert packets plus Fink's added columns → Alert.

Fink's Kafka output and data-transfer files carry the survey packet fields at
top level and add classification and cross-match columns (``cdsxmatch``,
``finkclass``, ``rf_snia_vs_nonia``, ``snn_*``, ``tns``, ``roid``, …; older
outputs ``rfscore``, ``snn``). The survey part is parsed by the ZTF or Rubin
parser; the added scalar columns go into ``fields`` as they are named, the
non-scalar ones stay in the payload.

Fink's ``tns`` column is the TNS *classification* of a cross-matched object
("SN Ia"), not its name: it is kept as ``fields["tns_class"]`` and becomes an
alias only if it is shaped like a designation (see :mod:`._tns`).

The photometry is the survey's own (ZTF candidates, Rubin diaSources), so
its points carry the survey as their source: the same ZTF point relayed by
Fink and read from ZTF's stream is then one point. ``fields["broker"]`` says
who relayed the alert.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tomd.alerts.model import Alert, payload_dict
from tomd.errors import ParseError

from . import rubin, ztf
from ._common import scalar_items
from ._tns import tns_designation
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
        fields["broker"] = source
        aliases = list(alert.aliases)
        tns = extra.get("tns")
        name = tns_designation(tns)
        if name:
            aliases.append(name)
            fields["tns_name"] = name
        elif isinstance(tns, str) and tns.strip():
            fields["tns_class"] = tns.strip()
        payload = payload_dict(alert.payload)  # a fresh dict: the survey parser's JSON read back
        payload.update(clean(extra))
        phot = tuple(dataclasses.replace(p, source=survey) for p in alert.photometry)
        out.append(dataclasses.replace(alert, fields=fields, payload=payload, aliases=tuple(aliases),
                                       photometry=phot))
    return out
