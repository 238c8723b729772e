"""Log formatting: readable on a terminal, JSON lines for machines.

Every record passes through ``redact`` so a token in an exception message
never reaches a log file. Extra fields given with ``extra={"coords": ...}``
(Kafka coordinates, alert ids) are kept in JSON output and appended in text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from tomd.errors import redact as _redact_errors

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

# Beyond tomd.errors.redact: bare bearer tokens, Slack webhook paths, and
# common token shapes (GitHub, Slack, AWS keys) wherever they appear.
_MORE_SECRETS = [
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(hooks\.slack\.com/(?:services|workflows|triggers)/)[A-Za-z0-9/_-]+"),
    re.compile(r"\b(?:xox[abposr]-[A-Za-z0-9-]{10,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b"),
]
# An extra whose key says it holds a secret is hidden whatever its value.
_SECRET_KEY = re.compile(r"(?i)(token|password|passwd|secret|api[_-]?key|authorization|credential)")


def redact(text: str) -> str:
    """``tomd.errors.redact`` plus the log-only patterns above."""
    out = _redact_errors(text)
    for pat in _MORE_SECRETS:
        out = pat.sub(lambda m: (m.group(1) if pat.groups else "") + "***", out)
    return out


def _clean(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of an extra with every string redacted (before encoding,
    so redaction can never break the JSON)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return redact(value)
    if depth < 4 and isinstance(value, Mapping):
        return {str(k): ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else _clean(v, depth + 1))
                for k, v in value.items()}
    if depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v, depth + 1) for v in value]
    return redact(str(value))


def _extras(record: logging.LogRecord) -> dict:
    return {k: ("***" if _SECRET_KEY.search(k) else v) for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        extra = " ".join(f"{k}={_clean(v)}" for k, v in _extras(record).items())
        line = f"{ts}Z {record.levelname:7s} {record.name}: {msg}" + (f" [{extra}]" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for k, v in _extras(record).items():
            doc.setdefault(k, _clean(v))  # an extra never replaces time/level/logger/message
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exception"] = redact(record.exc_text)
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(doc, ensure_ascii=False)


def alert_fields(stored: Any = None, **more: Any) -> dict[str, Any]:
    """The structured fields of a log line about an alert: ``alert_id``, ``object_id``,
    ``coords`` (stream coordinates, ``topic[partition]@offset`` or the file) and ``target_id``
    from a stored alert (``tomd.alerts.ingest.Ingested``), plus ``more`` (rule, decision_id,
    request, ...). Fields that are None are left out: ``extra=alert_fields(st, rule=r)``."""
    out: dict[str, Any] = {}
    if stored is not None:
        alert = getattr(stored, "alert", None)
        out = {"alert_id": getattr(stored, "alert_id", None),
               "object_id": getattr(alert, "object_id", None),
               "alert_key": getattr(alert, "key", None),
               "coords": getattr(stored, "coords", None),
               "target_id": getattr(stored, "target_id", None)}
    out.update(more)
    return {k: v for k, v in out.items() if v is not None}


def request_fields(work: Any, **more: Any) -> dict[str, Any]:
    """The structured fields of a log line about an observation request (a submitter's claimed
    intent): ``request`` (its name), ``request_id``, ``facility``, ``decision_id`` (the rule
    decision, which names the alert) and ``target_id``; None fields left out."""
    out = {"request": getattr(work, "name", None), "request_id": getattr(work, "id", None),
           "facility": getattr(work, "facility", None), "decision_id": getattr(work, "decision_id", None),
           "target_id": getattr(work, "target_id", None), **more}
    return {k: v for k, v in out.items() if v is not None}


class AlertLog(logging.LoggerAdapter):
    """A logger whose every line carries an alert's coordinates:
    ``AlertLog(log, "ztf_20250101[3]@1234").warning("...")`` → ``coords`` field."""

    def __init__(self, logger: logging.Logger, coords: str, **fields: Any):
        super().__init__(logger, {"coords": coords, **fields})

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}
        return msg, kwargs


class FailureLog:
    """Logs a failure that repeats without flooding the log: a loop that retries every second
    through a database outage logs the first failure at ERROR with its traceback, then one
    WARNING line (no traceback) at most every ``every_s`` seconds counting the failures since,
    then one INFO line when it works again. ``on_error(exc)`` is told of every failure (for
    ``tomd_database_errors_total``); an error in it is never the loop's problem. Thread-safe.

    ::

        failures = FailureLog(log, "data retrieval run")
        try: run_once(); failures.ok()
        except Exception as exc: failures.failed(exc)
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, what: str, *, every_s: float = 30.0,
                 on_error: Callable[[BaseException], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.what = what
        self.every_s = every_s
        self.on_error = on_error
        self.clock = clock
        self.failures = 0  # in the current run of failures (0: working)
        self._since_line = 0
        self._first = 0.0
        self._last_line = 0.0
        self._lock = threading.Lock()

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, exc: BaseException, *, extra: Mapping[str, Any] | None = None) -> None:
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:  # noqa: BLE001 - metrics never break the loop
                self.logger.debug("error observer failed", exc_info=True)
        now = self.clock()
        with self._lock:
            self.failures += 1
            self._since_line += 1
            first = self.failures == 1
            if first:
                self._first = now
            elif now - self._last_line < self.every_s:
                return
            count, self._since_line, self._last_line = self._since_line, 0, now
            total, since = self.failures, now - self._first
        if first:
            self.logger.error("%s failed; retrying (repeats are logged at most every %.0f s): %s", self.what,
                              self.every_s, _one_line(exc), exc_info=exc, extra=dict(extra or {}))
        else:
            self.logger.warning("%s still failing: %d more failure(s), %d in %.0f s: %s", self.what, count,
                                total, since, _one_line(exc), extra=dict(extra or {}))

    def ok(self) -> None:
        if not self.failures:  # the common case: no lock, nothing to say
            return
        now = self.clock()
        with self._lock:
            total, since, self.failures, self._since_line = self.failures, now - self._first, 0, 0
        if total:
            self.logger.info("%s works again after %d failure(s) in %.0f s", self.what, total, since)


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return redact(text[:300])


def configure(*, fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that chatter at INFO.
    for name in ("alembic", "httpx", "apscheduler", "botocore"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
