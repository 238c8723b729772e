"""Finding hooks: the ``@on`` decorator, loading hook files, builtin subscribers.

A hook file is plain Python in one of ``hooks.paths``::

    from tomd.hooks import on

    @on("data.stored", timeout="5m", max_attempts=3)
    def check_quality(ctx):          # name: "<file stem>.check_quality"
        ...

``@on`` only *marks* the function (``fn.__tomd_hooks__``); nothing global
happens at import. :func:`load_hooks` imports each file as its own module and
collects the marked functions defined in it, so a file that fails to import
costs only its own hooks and is reported as ``FILE:LINE: error``.

User files are imported in the hook worker process (tomd.hooks.worker), never
in the daemon: a file that loops forever or calls ``os._exit`` at import takes
only the worker down. Builtin subscribers (:meth:`Registry.add_builtin`) are
tomd's own code and run in the daemon, inside the transaction that records
their run.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomd.events import EVENT_TYPES

__all__ = ["Builtin", "HookSpec", "LoadResult", "Registry", "load_hooks", "on"]

ANY_KIND = "*"
SINCE = ("registered", "all")


@dataclass(frozen=True)
class HookSpec:
    """What the daemon knows about one user hook (picklable: it crosses the worker pipe)."""

    name: str  # "<file stem>.<function>"
    kinds: tuple[str, ...]  # event kinds, or ("*",)
    file: str
    line: int  # the @on line
    timeout: float | None = None  # seconds; None: hooks.timeout
    max_attempts: int | None = None  # None: hooks.max_attempts
    since: str = "registered"  # "registered": events after the hook first appeared; "all": the whole outbox
    is_async: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def wants(self, kind: str) -> bool:
        return ANY_KIND in self.kinds or kind in self.kinds


@dataclass(frozen=True)
class Builtin:
    """An in-process subscriber: ``fn(session, event)`` inside the transaction that marks its run done."""

    name: str
    kinds: tuple[str, ...]
    fn: Callable[[Any, Any], None]
    max_attempts: int | None = None
    since: str = "registered"
    file: str = "<builtin>"
    line: int = 0
    timeout: float | None = None  # not enforced: builtins are tomd's own code
    is_async: bool = False

    @property
    def where(self) -> str:
        return self.file if not self.line else f"{self.file}:{self.line}"

    def wants(self, kind: str) -> bool:
        return ANY_KIND in self.kinds or kind in self.kinds


def _duration(value: Any, what: str) -> float | None:
    if value is None:
        return None
    from tomd.config import _Invalid, parse_duration

    try:
        return parse_duration(value)
    except _Invalid as exc:
        raise ValueError(f"@on({what}=...): {exc}") from None


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if not kinds:
        raise ValueError('@on(...): name at least one event kind, e.g. @on("data.stored")')
    for k in kinds:
        if not isinstance(k, str):
            raise ValueError(f"@on(...): event kinds are strings, got {k!r}")
        if k != ANY_KIND and k not in EVENT_TYPES:
            import difflib

            close = difflib.get_close_matches(k, list(EVENT_TYPES), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else f" (known: {', '.join(sorted(EVENT_TYPES))})"
            raise ValueError(f"@on(...): unknown event kind {k!r}{hint}")
    return tuple(dict.fromkeys(kinds))


def on(*kinds: str, timeout: str | float | None = None, max_attempts: int | None = None,
       since: str = "registered") -> Callable[[Callable], Callable]:
    """Mark a function (sync or ``async def``) as a hook for events of ``kinds``.

    ``"*"`` takes every kind. ``timeout`` ("30s", "5m", seconds) and
    ``max_attempts`` override ``[hooks]`` for this hook. ``since``:
    ``"registered"`` (default) delivers events written after the hook was
    first seen by a daemon; ``"all"`` also every older event still in the
    outbox. The function gets one argument, a :class:`tomd.hooks.HookContext`.
    A mistake here raises at import, so the loader reports this line.
    """
    kinds_t = _check_kinds(kinds)
    seconds = _duration(timeout, "timeout")
    if max_attempts is not None and (not isinstance(max_attempts, int) or isinstance(max_attempts, bool)
                                     or not 1 <= max_attempts <= 100):
        raise ValueError(f"@on(max_attempts=...): expected an integer from 1 to 100, got {max_attempts!r}")
    if since not in SINCE:
        raise ValueError(f'@on(since=...): expected "registered" or "all", got {since!r}')
    caller = sys._getframe(1)
    line = caller.f_lineno

    def mark(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"@on(...) decorates a function, got {fn!r}")
        marks = list(getattr(fn, "__tomd_hooks__", ()))
        marks.append({"kinds": kinds_t, "timeout": seconds, "max_attempts": max_attempts, "since": since,
                      "line": line})
        try:
            fn.__tomd_hooks__ = tuple(marks)
        except AttributeError:  # a builtin or a bound method: nothing to attach to
            raise TypeError("@on(...) decorates a plain function defined in the hook file") from None
        return fn
    return mark


# ------------------------------------------------------------------ loading


@dataclass
class LoadResult:
    """Hooks found, their functions (in the loading process only), and problems as ``FILE:LINE: message``."""

    specs: list[HookSpec] = field(default_factory=list)
    functions: dict[str, Callable] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def hook_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """The ``*.py`` files under ``paths`` (files or directories, sorted; ``_*.py`` skipped)."""
    files: list[Path] = []
    problems: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(sorted(f for f in path.glob("*.py") if not f.name.startswith("_")))
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory (hooks.paths)")
    return list(dict.fromkeys(files)), problems


def _where(exc: BaseException, file: Path) -> str:
    """``FILE:LINE`` of the deepest traceback frame in the hook file (or its syntax error)."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{exc.filename or file}:{exc.lineno}"
    line = None
    resolved = str(file.resolve())
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if str(Path(frame.f_code.co_filename).resolve()) == resolved:
            line = lineno
    return f"{file}:{line}" if line else str(file)


def load_hooks(paths: Iterable[str | Path]) -> LoadResult:
    """Import every hook file; a file that fails is reported and skipped, the others load."""
    result = LoadResult()
    files, result.problems = hook_files(paths)
    seen: dict[str, str] = {}
    for file in files:
        result.files.append(str(file))
        module_name = f"tomd_user_hooks.{file.stem}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: one file never stops the others
            sys.modules.pop(module_name, None)
            msg = exc.msg if isinstance(exc, SyntaxError) else str(exc)
            result.problems.append(f"{_where(exc, file)}: {type(exc).__name__}: {msg}")
            continue
        for attr, fn in sorted(vars(module).items()):
            marks = getattr(fn, "__tomd_hooks__", None) if callable(fn) else None
            if not marks or getattr(fn, "__module__", None) != module_name:
                continue  # imported from elsewhere: registered by its own file
            name = f"{file.stem}.{getattr(fn, '__name__', attr)}"
            if name in seen:
                result.problems.append(f"{file}:{marks[0]['line']}: hook {name} is already defined in {seen[name]}")
                continue
            seen[name] = str(file)
            kinds = tuple(dict.fromkeys(k for m in marks for k in m["kinds"]))
            first = marks[-1]  # decorators apply bottom-up: the last mark is the top @on line
            opts = {k: next((m[k] for m in reversed(marks) if m[k] is not None), None)
                    for k in ("timeout", "max_attempts")}
            result.specs.append(HookSpec(
                name=name, kinds=kinds, file=str(file), line=first["line"], timeout=opts["timeout"],
                max_attempts=opts["max_attempts"], since=first["since"],
                is_async=inspect.iscoroutinefunction(fn)))
            result.functions[name] = fn
    return result


# ----------------------------------------------------------------- registry


class Registry:
    """The hooks a runner dispatches to: user hooks (loaded by the worker) and builtins."""

    def __init__(self) -> None:
        self.user: dict[str, HookSpec] = {}
        self.builtins: dict[str, Builtin] = {}
        self.problems: list[str] = []

    def add_builtin(self, name: str, kinds: Iterable[str], fn: Callable[[Any, Any], None], *,
                    max_attempts: int | None = None, since: str = "registered") -> Builtin:
        """Subscribe ``fn(session, event)`` to ``kinds``; it runs in the daemon, in the transaction
        that marks its run done (so what it writes commits exactly once per event)."""
        if name in self.builtins or name in self.user:
            raise ValueError(f"hook name {name!r} is taken")
        if since not in SINCE:
            raise ValueError(f'since: expected "registered" or "all", got {since!r}')
        b = Builtin(name=name, kinds=_check_kinds(tuple(kinds)), fn=fn, max_attempts=max_attempts, since=since,
                    file=getattr(getattr(fn, "__code__", None), "co_filename", "<builtin>"),
                    line=getattr(getattr(fn, "__code__", None), "co_firstlineno", 0))
        self.builtins[name] = b
        return b

    def set_user(self, specs: Iterable[HookSpec], problems: Iterable[str]) -> None:
        """Replace the user hooks (a reload); a name a builtin holds is refused."""
        user: dict[str, HookSpec] = {}
        self.problems = list(problems)
        for s in specs:
            if s.name in self.builtins:
                self.problems.append(f"{s.where}: hook {s.name} has the name of a builtin subscriber; ignored")
                continue
            user[s.name] = s
        self.user = user

    def all(self) -> dict[str, HookSpec | Builtin]:
        return {**self.user, **self.builtins}

    def get(self, name: str) -> HookSpec | Builtin | None:
        return self.builtins.get(name) or self.user.get(name)
