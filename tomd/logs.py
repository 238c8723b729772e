"""Log formatting: readable on a terminal, JSON lines for machines.

Every record passes through ``redact`` so a token in an exception message
never reaches a log file. Extra fields given with ``extra={"coords": ...}``
(Kafka coordinates, alert ids) are kept in JSON output and appended in text.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from tomd.errors import redact

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        extra = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts}Z {record.levelname:7s} {record.name}: {msg}" + (f" [{extra}]" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, default=str))


def configure(*, fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that chatter at INFO.
    for name in ("alembic", "httpx", "apscheduler", "botocore"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
