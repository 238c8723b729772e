"""One exception tree for tomd.

::

    TomdError                      anything tomd raises on purpose
    ├── UserError                  a person's mistake: fix the input, not the code
    │   ├── ConfigError            bad config file (file: key.path: message)
    │   ├── InputError             bad CSV row, rule file, hook, CLI argument
    │   └── NotFoundError          no such target / request / product
    ├── DatabaseNotReady           database unreachable or not migrated
    ├── AlertError                 an alert could not be decoded or parsed
    │   ├── DecodeError            bytes → dict failed (framing, schema)
    │   └── ParseError             dict → Alert failed (missing field, bad value)
    ├── RetryableError             transient: safe to try again later
    │   └── AmbiguousError         the outcome is unknown (timeout after a POST):
    │                              look before retrying
    └── PermanentError             final: recorded with the other side's words

Messages never contain secrets: code that formats a message from a URL or a
header must redact it first (see ``redact``).
"""

from __future__ import annotations

import re


class TomdError(Exception):
    """Base of every error tomd raises on purpose."""


class UserError(TomdError):
    """A person's mistake. The message is shown as it is, without a traceback."""


class ConfigError(UserError):
    """The configuration is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class InputError(UserError):
    """Bad user input: a CSV row, a rule file, a CLI argument.

    ``where`` is ``FILE:LINE`` or ``FILE:LINE:COL`` when known, ``field`` the
    column or key at fault.
    """

    def __init__(self, message: str, where: str | None = None, field: str | None = None):
        self.where = where
        self.field = field
        self.reason = message
        parts = [p for p in (where, field) if p]
        super().__init__(": ".join(parts + [message]))


class NotFoundError(UserError):
    """The thing asked for does not exist."""


class DatabaseNotReady(TomdError):
    """The database is unreachable or its schema is not at the current revision."""


class AlertError(TomdError):
    """An alert could not be turned into an Alert. Goes to the dead-letter store."""


class DecodeError(AlertError):
    """The bytes could not be decoded (framing, schema, compression)."""


class ParseError(AlertError):
    """The decoded record lacks a field or has a value that makes no sense."""


class RetryableError(TomdError):
    """A transient failure: the same call may succeed later."""

    def __init__(self, message: str, retry_after: float | None = None):
        self.retry_after = retry_after
        super().__init__(message)


class AmbiguousError(RetryableError):
    """The other side may or may not have acted (timeout after sending).

    Never retry blindly: ask first whether the action took effect.
    """


class PermanentError(TomdError):
    """A final failure (4xx rejection); retrying will not help."""


_SECRET_PATTERNS = [
    re.compile(r"(?i)(authorization:\s*(?:token|bearer|basic)\s+)\S+"),
    re.compile(r"(?i)((?:token|password|passwd|secret|api[_-]?key)\s*[=:]\s*)[^\s&,;'\"]+"),
    re.compile(r"(?i)(://[^:/@\s]+:)[^@/\s]+(@)"),
]


def redact(text: str) -> str:
    """Remove things that look like credentials from ``text``."""
    out = text
    for pat in _SECRET_PATTERNS:
        if pat.groups == 2:
            out = pat.sub(r"\1***\2", out)
        else:
            out = pat.sub(r"\1***", out)
    return out
