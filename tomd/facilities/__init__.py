"""Facilities: the ``Facility`` protocol, the LCO/SOAR portal client, the simulated observatory,
the Gemini ToO trigger client and the Swift TOO client.

``open_facilities(config)`` builds one client per ``[facilities.NAME]``; a
``kind = "sim"`` facility without a ``url`` gets an in-process
``SimObservatory`` started for it (stopped by ``Facilities.close``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tomd.errors import InputError
from tomd.facilities.base import Facility

SIM_TEMPLATES: dict[str, dict[str, Any]] = {
    "1m-gri": {"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"], "exposure_time": 300},
    "spectrum": {"instrument_type": "2M0-FLOYDS-SCICAM", "exposures": [{"slit": "slit_1.2as", "exposure_time": 900}],
                 "configuration_type": "SPECTRUM"},
}


@dataclass
class Facilities(Mapping[str, Facility]):
    """The configured facilities by name, plus what must be stopped with them."""

    clients: dict[str, Facility]
    _sims: list[Any] = field(default_factory=list)

    def __getitem__(self, name: str) -> Facility:
        try:
            return self.clients[name]
        except KeyError:
            known = ", ".join(sorted(self.clients)) or "none configured"
            raise InputError(f"no facility {name!r} (configured: {known})") from None

    def __iter__(self):
        return iter(self.clients)

    def __len__(self) -> int:
        return len(self.clients)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for sim in self._sims:
            sim.stop()
        self._sims.clear()

    def __enter__(self) -> "Facilities":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_facilities(config: Any, *, only: str | None = None, **client_kw: Any) -> Facilities:
    """One client per configured facility."""
    from tomd.facilities.gemini import GeminiClient
    from tomd.facilities.lco import LCOClient
    from tomd.facilities.sim import SIM_SITES, SimObservatory
    from tomd.facilities.swift import SwiftClient

    out = Facilities({})
    for name, cfg in config.facilities.items():
        if only is not None and name != only:
            continue
        if cfg.kind in ("lco", "soar"):
            out.clients[name] = LCOClient.from_config(name, cfg, **client_kw)
        elif cfg.kind == "sim":
            kw = dict(client_kw)
            if cfg.url is None:
                sim = SimObservatory(token=None, proposals=(cfg.proposal or "SIM2026A-001",)).start()
                out._sims.append(sim)
                kw["url"] = sim.url
            templates = cfg.templates or SIM_TEMPLATES
            kw.setdefault("templates", templates)
            kw.setdefault("proposal", cfg.proposal or "SIM2026A-001")
            kw.setdefault("sites", SIM_SITES)
            out.clients[name] = LCOClient.from_config(name, cfg, **kw)
        elif cfg.kind == "gemini":
            out.clients[name] = GeminiClient.from_config(name, cfg, **client_kw)
        elif cfg.kind == "swift":
            out.clients[name] = SwiftClient.from_config(name, cfg, **client_kw)
    return out
