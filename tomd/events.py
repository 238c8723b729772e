"""Frozen events: the contract between stages, hooks and metrics.

Each event has a ``kind`` (dotted name) and a ``version``; its payload is the
dataclass as JSON. A change that breaks a payload's shape bumps the version.
State changes write their event to the outbox table in the same transaction
(``tomd.db.repository.add_event``), so hooks and notifications never miss one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    version: ClassVar[int] = 1

    def payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TargetCreated(Event):
    kind: ClassVar[str] = "target.created"
    target_id: int
    name: str
    ra: float | None = None
    dec: float | None = None
    origin: str = ""  # "cli", "import:<file>", "alert:<source>", ...


@dataclass(frozen=True)
class TargetUpdated(Event):
    kind: ClassVar[str] = "target.updated"
    target_id: int
    name: str
    changes: dict[str, Any] = field(default_factory=dict)  # field → new value
    new_names: tuple[str, ...] = ()
    origin: str = ""


EVENT_TYPES: dict[str, type[Event]] = {e.kind: e for e in (TargetCreated, TargetUpdated)}
