"""What a hook sees and can do: :class:`HookContext`.

The API is small on purpose and stays stable:

- ``ctx.event``: the frozen event (``tomd.events``), rebuilt from the outbox;
  ``ctx.event_id`` its outbox id; ``ctx.hook`` the hook's name.
- ``ctx.target``: a read-only :class:`TargetSnapshot` of the event's target
  (None if the event has none).
- read-only queries: ``ctx.find_target(name_or_id)``, ``ctx.photometry()``,
  ``ctx.observations()``, ``ctx.products()`` (each for the event's target
  unless given another ``target_id``).
- storage: ``ctx.open_product(key)`` (a binary file object, local or S3),
  ``ctx.local_copy(key)`` (a temporary local path, for programs that want one).
- ``ctx.log``: a logger whose lines carry the hook name and event id.
- ``ctx.settings``: the ``[hooks.settings.<file stem>]`` table of the config.
- actions: ``ctx.tag(...)``, ``ctx.add_to_list(...)``,
  ``ctx.request_observation(...)``, ``ctx.notify(...)``.

Actions are *recorded* while the hook runs and applied by the daemon when it
returns, in the same transaction that records the run as done: a hook that
fails half-way changes nothing, and a retried hook cannot tag, notify or
request twice (notification dedupe keys and request names also derive from
the hook name and event id, so even a hand run with ``--apply`` repeats
nothing). Side effects outside tomd (files, programs, HTTP) happen when the
hook's code does them and may repeat after a crash: delivery is at least once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

from tomd.events import EVENT_TYPES, Event

__all__ = ["HookContext", "ObservationInfo", "Point", "ProductInfo", "TargetSnapshot", "apply_actions",
           "event_from_json", "event_to_json", "facility_map"]


# ----------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class TargetSnapshot:
    id: int
    name: str
    names: tuple[str, ...]
    ra: float | None
    dec: float | None
    type: str
    tags: tuple[str, ...]
    lists: tuple[str, ...]
    extras: Mapping[str, Any]
    created_at: datetime | None = None


@dataclass(frozen=True)
class Point:
    mjd: float
    band: str
    kind: str  # detection | upper_limit | forced
    mag: float | None
    mag_err: float | None
    flux: float | None  # nJy
    flux_err: float | None
    limit: float | None
    source: str


@dataclass(frozen=True)
class ObservationInfo:
    id: int
    name: str
    facility: str
    state: str
    facility_state: str | None
    facility_id: str | None
    template: str | None
    window_start: datetime | None
    window_end: datetime | None
    submitted_at: datetime | None


@dataclass(frozen=True)
class ProductInfo:
    id: int
    kind: str
    facility: str
    product_id: str
    filename: str
    storage_key: str | None
    size: int | None
    md5: str | None
    state: str
    request_id: int | None
    target_id: int | None
    stored_at: datetime | None


# -------------------------------------------------------------------- events


def event_from_json(data: Mapping[str, Any], *, where: str = "event") -> Event:
    """``{"kind": …, "version": …, "payload": {…}}`` → the frozen event.

    Raises ValueError naming the field at fault (``where`` prefixes it:
    a file name for ``tomd hook run``, ``outbox #ID`` in the daemon).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object with kind, version and payload")
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{where}: kind: unknown event kind {kind!r} (known: {', '.join(sorted(EVENT_TYPES))})")
    version = data.get("version", cls.version)
    if version != cls.version:
        raise ValueError(f"{where}: version: {kind} version {version!r} is not the one this tomd knows "
                         f"({cls.version})")
    payload = data.get("payload", {})
    if not isinstance(payload, Mapping):
        raise ValueError(f"{where}: payload: expected an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise ValueError(f"{where}: payload.{unknown[0]}: not a field of {kind} v{cls.version} "
                         f"(fields: {', '.join(fields)})")
    hints = _hints(cls)
    values = {}
    for name, value in payload.items():
        # JSON has no tuples: fields typed tuple[...] come back as lists.
        if isinstance(value, list) and typing.get_origin(hints.get(name)) is tuple:
            value = tuple(value)
        values[name] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: payload.{missing[0]}: required by {kind} v{cls.version}")
    return cls(**values)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def event_to_json(event: Event) -> dict[str, Any]:
    payload = {k: list(v) if isinstance(v, tuple) else v for k, v in event.payload().items()}
    return {"kind": event.kind, "version": event.version, "payload": payload}


def target_of(event: Event, outbox_target_id: int | None = None) -> int | None:
    tid = getattr(event, "target_id", None)
    return tid if isinstance(tid, int) else outbox_target_id


# ------------------------------------------------------------------- context


class Reader:
    """Read-only queries for hooks, each in a short transaction of its own."""

    def __init__(self, sessions: Callable[[], Any] | None, storage: Any = None):
        self._sessions = sessions
        self.storage = storage

    def _session(self):
        if self._sessions is None:
            raise RuntimeError("this hook context has no database (hooks.paths only, no [database])")
        return self._sessions()

    def target(self, target_id: int) -> TargetSnapshot | None:
        from tomd.db import repository as repo

        with self._session() as s:
            t = repo.get_target(s, target_id)
            if t is None:
                return None
            names = [n.name for n in repo.names_of(s, [t.id])[t.id]]
            return TargetSnapshot(id=t.id, name=t.name, names=tuple(names), ra=t.ra, dec=t.dec, type=t.type,
                                  tags=tuple(repo.tags_of(s, [t.id])[t.id]),
                                  lists=tuple(repo.lists_of(s, [t.id])[t.id]), extras=dict(t.extras or {}),
                                  created_at=t.created_at)

    def target_id_by_name(self, name: str) -> int | None:
        from tomd.db import repository as repo
        from tomd.targets.names import normalize

        with self._session() as s:
            return repo.target_id_by_norm(s, [normalize(name)]).get(normalize(name))

    def photometry(self, target_id: int) -> list[Point]:
        from tomd.db import repository as repo

        with self._session() as s:
            return [Point(mjd=p.mjd, band=p.band, kind=p.kind, mag=p.mag, mag_err=p.mag_err, flux=p.flux,
                          flux_err=p.flux_err, limit=p.limit, source=p.source)
                    for p in repo.photometry_of(s, target_id)]

    def observations(self, target_id: int | None) -> list[ObservationInfo]:
        from tomd.db import repository as repo

        with self._session() as s:
            return [ObservationInfo(id=r.id, name=r.name, facility=r.facility, state=r.state,
                                    facility_state=r.facility_state, facility_id=r.facility_id, template=r.template,
                                    window_start=r.window_start, window_end=r.window_end,
                                    submitted_at=r.submitted_at)
                    for r in repo.query_observations(s, target_id=target_id, limit=1000)]

    def products(self, target_id: int | None, kind: str | None = None) -> list[ProductInfo]:
        from tomd.db import repository as repo

        with self._session() as s:
            return [ProductInfo(id=p.id, kind=p.kind, facility=p.facility, product_id=p.product_id,
                                filename=p.filename, storage_key=p.storage_key, size=p.size, md5=p.md5,
                                state=p.state, request_id=p.request_id, target_id=p.target_id,
                                stored_at=p.stored_at)
                    for p in repo.data_products(s, target_id=target_id, kind=kind, limit=1000)]


class HookContext:
    """Given to each hook call. See the module docstring for the whole API."""

    def __init__(self, *, hook: str, event: Event, event_id: int, reader: Reader,
                 target_id: int | None = None, settings: Mapping[str, Any] | None = None,
                 logger: logging.Logger | None = None, attempt: int = 1):
        self.hook = hook
        self.event = event
        self.event_id = event_id
        self.attempt = attempt  # 1 on the first try
        self.target_id = target_of(event, target_id)
        self.settings: Mapping[str, Any] = dict(settings or {})
        self.log = logging.LoggerAdapter(logger or logging.getLogger("tomd.hooks.user"),
                                         {"hook": hook, "event_id": event_id})
        self.log.process = lambda msg, kw: (f"hook {hook} event #{event_id}: {msg}", kw)  # type: ignore[method-assign]
        self.actions: list[dict[str, Any]] = []
        self._reader = reader
        self._target: Any = _UNSET

    # ------------------------------------------------------------ reading

    @property
    def target(self) -> TargetSnapshot | None:
        if self._target is _UNSET:
            self._target = self._reader.target(self.target_id) if self.target_id is not None else None
        return self._target

    def find_target(self, name_or_id: str | int) -> TargetSnapshot | None:
        """A target by id or by any of its names (case and spacing as tomd normalises them)."""
        if isinstance(name_or_id, int):
            return self._reader.target(name_or_id)
        tid = self._reader.target_id_by_name(str(name_or_id))
        return self._reader.target(tid) if tid is not None else None

    def _tid(self, target_id: int | None) -> int:
        tid = self.target_id if target_id is None else target_id
        if tid is None:
            raise ValueError(f"{self.event.kind} has no target: pass target_id=")
        return tid

    def photometry(self, target_id: int | None = None) -> list[Point]:
        return self._reader.photometry(self._tid(target_id))

    def observations(self, target_id: int | None = None) -> list[ObservationInfo]:
        return self._reader.observations(self._tid(target_id))

    def products(self, target_id: int | None = None, *, kind: str | None = None) -> list[ProductInfo]:
        return self._reader.products(self._tid(target_id), kind)

    # ------------------------------------------------------------ storage

    @property
    def storage(self):
        if self._reader.storage is None:
            raise RuntimeError("no [storage] configured for hooks")
        return self._reader.storage

    def open_product(self, key: str) -> BinaryIO:
        """The stored file ``key`` (``DataStored.storage_key``) for reading; close it (``with``)."""
        return self.storage.open(key)

    @contextlib.contextmanager
    def local_copy(self, key: str, *, suffix: str | None = None) -> Iterator[Path]:
        """A temporary local file with the stored bytes of ``key`` (removed afterwards)."""
        suffix = suffix if suffix is not None else "".join(Path(key).suffixes[-2:])
        fd, name = tempfile.mkstemp(prefix="tomd-hook-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as out, self.open_product(key) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            yield Path(name)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    # ------------------------------------------------------------ actions

    def tag(self, *tags: str, target_id: int | None = None) -> None:
        """Tag the target (the event's unless given)."""
        clean = [_word(t, "tag", 100) for t in tags]
        if clean:
            self.actions.append({"action": "tag", "target_id": self._tid(target_id), "tags": clean})

    def add_to_list(self, *lists: str, target_id: int | None = None) -> None:
        """Put the target on lists (created as needed)."""
        clean = [_word(n, "list", 200) for n in lists]
        if clean:
            self.actions.append({"action": "list", "target_id": self._tid(target_id), "lists": clean})

    def request_observation(self, facility: str, template: str, *, target_id: int | None = None,
                            mode: str | None = None, priority: float | None = None,
                            window: str | float | None = None, key: str = "") -> str:
        """Ask for an observation; the daemon's submitter sends it exactly once.

        ``window``: duration from now ("24h"). ``key`` tells apart several
        requests of one hook run. Returns the request's name (its
        idempotency key at the facility).
        """
        name = request_name(self.hook, self.event_id, key)
        seconds = None
        if window is not None:
            from tomd.config import _Invalid, parse_duration

            try:
                seconds = parse_duration(window)
            except _Invalid as exc:
                raise ValueError(f"request_observation(window=...): {exc}") from None
        self.actions.append({"action": "request", "target_id": self._tid(target_id), "facility": str(facility),
                             "template": str(template), "mode": mode, "priority": priority,
                             "window_s": seconds, "name": name})
        return name

    def notify(self, channel: str, subject: str, text: str = "", *, fields: Any = (), links: Any = (),
               level: str = "info", image: bool = False, key: str = "", target_id: int | None = None) -> None:
        """Queue a message for a notification channel (``[notify.channels.NAME]``).

        Queued once per (channel, hook, event, key), however often the hook runs.
        """
        from tomd.notify import Message

        tid = self.target_id if target_id is None else target_id
        msg = Message(subject=subject, text=text, fields=fields, links=links, target_id=tid, image=image,
                      level=level, kind=f"hook:{self.hook}")
        self.actions.append({"action": "notify", "channel": str(channel), "message": msg.as_json(),
                             "dedupe_key": f"hook:{self.hook}:{self.event_id}:{key}", "target_id": tid})


_UNSET = object()


def _word(value: Any, what: str, limit: int) -> str:
    text = str(value).strip()
    if not text or len(text) > limit:
        raise ValueError(f"{what}: expected 1 to {limit} characters, got {value!r}")
    return text


def request_name(hook: str, event_id: int, key: str = "") -> str:
    """A stable request name per (hook, event, key): the idempotency key sent to the facility (≤ 50 chars)."""
    digest = hashlib.sha256(f"{hook}\0{event_id}\0{key}".encode()).hexdigest()[:20]
    return f"tomd-hook-{event_id}-{digest}"[:50]


# ------------------------------------------------------------------ applying


def facility_map(config: Any) -> dict[str, dict[str, Any]]:
    """What applying a hook's request needs of the config's ``[facilities]``, as plain dicts.

    ``{facility: {"proposal": str | None, "templates": {name: {"proposal": str | None,
    "hours": float | None}}}}``: the hook worker has no Config (it crosses the process
    boundary, and holds tokens), so it gets this instead: names, proposals and estimated
    hours, no secrets. A sim facility without templates knows the simulator's built-in
    ones (as ``tomd obs submit`` does), with no estimate.
    """
    from tomd.rules.load import estimate_hours

    out: dict[str, dict[str, Any]] = {}
    for name, fc in (getattr(config, "facilities", None) or {}).items():
        templates: dict[str, dict[str, Any]] = {}
        for t, fields in (fc.templates or {}).items():
            if isinstance(fields, Mapping):
                p = fields.get("proposal")
                templates[str(t)] = {"proposal": p if isinstance(p, str) else None, "hours": estimate_hours(fields)}
        if not fc.templates and fc.kind == "sim":
            from tomd.facilities import SIM_TEMPLATES

            templates = {str(t): {"proposal": None, "hours": None} for t in SIM_TEMPLATES}
        out[str(name)] = {"proposal": fc.proposal, "templates": templates}
    return out


def _facility_view(facilities: Mapping[str, Mapping[str, Any]], facility: str, template: str) -> Any:
    """The one facility of :func:`facility_map` as the ``config`` tomd.submit.create_intent reads
    (``config.facilities[f].proposal`` and ``.templates[t]``; ``hours`` is the estimate it takes);
    ValueError naming an unknown facility or template."""
    from types import SimpleNamespace

    fc = facilities.get(facility)
    if fc is None:
        raise ValueError(f"request_observation: no facility {facility!r} in the config's [facilities] "
                         f"(known: {', '.join(sorted(facilities)) or 'none configured'})")
    templates = fc.get("templates") or {}
    if template not in templates:
        raise ValueError(f"request_observation: facility {facility} has no template {template!r} "
                         f"(known: {', '.join(sorted(templates)) or 'none configured'})")
    t = templates[template]
    fields = {k: v for k, v in (("proposal", t.get("proposal")), ("hours", t.get("hours"))) if v is not None}
    view = SimpleNamespace(proposal=fc.get("proposal"), templates={template: fields} if "hours" in fields else {})
    return SimpleNamespace(facilities={facility: view})


def apply_actions(s, actions: Sequence[Mapping[str, Any]], *, hook: str, event_id: int | None,
                  facilities: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Apply recorded actions in the caller's transaction; returns one line per change made.

    Idempotent: tags and list memberships are sets, notifications are
    unique per (channel, dedupe key), requests per name. With ``facilities``
    (:func:`facility_map`) a request records its proposal and estimated hours
    (so the rules' hours_per_night counts it), and one for a facility or
    template the config does not know is refused (ValueError naming them):
    the run fails with that reason rather than leaving an intent no submitter
    can send. None (older callers) checks nothing.
    """
    from tomd import notify
    from tomd import submit
    from tomd.db import repository as repo
    from tomd.events import TargetUpdated

    done: list[str] = []
    for a in actions:
        kind = a.get("action")
        if kind == "tag":
            added = repo.add_tags(s, a["target_id"], a["tags"])
            if added:
                _target_updated(s, repo, TargetUpdated, a["target_id"], {"tags": added}, hook)
                done.append(f"target {a['target_id']}: tagged {', '.join(added)}")
        elif kind == "list":
            joined = repo.add_to_lists(s, a["target_id"], a["lists"])
            if joined:
                _target_updated(s, repo, TargetUpdated, a["target_id"], {"lists": joined}, hook)
                done.append(f"target {a['target_id']}: joined {', '.join(joined)}")
        elif kind == "request":
            if repo.observation_by_name(s, a["name"]) is None:
                config = _facility_view(facilities, a["facility"], a["template"]) if facilities is not None else None
                start = datetime.now(timezone.utc)
                end = start + timedelta(seconds=a["window_s"]) if a.get("window_s") else None
                rid = submit.create_intent(s, target_id=a["target_id"], facility=a["facility"],
                                           template=a["template"], name=a["name"], mode=a.get("mode"),
                                           priority=a.get("priority"), window_start=start if end else None,
                                           window_end=end, config=config)
                done.append(f"request #{rid} {a['name']} at {a['facility']} ({a['template']})")
        elif kind == "notify":
            if notify.enqueue(s, channel=a["channel"], dedupe_key=a["dedupe_key"], message=a["message"],
                              event_id=event_id or None, target_id=a.get("target_id")):
                done.append(f"notification to {a['channel']}: {a['message'].get('subject', '')}")
        else:
            raise ValueError(f"unknown hook action {kind!r}")
    return done


def _target_updated(s, repo, cls, target_id: int, changes: dict[str, Any], hook: str) -> None:
    t = repo.get_target(s, target_id)
    if t is None:
        raise ValueError(f"target {target_id} does not exist")
    repo.add_event(s, cls(target_id, t.name, changes, (), f"hook:{hook}"), target_id=target_id)
