"""Typed configuration, read once from one TOML file and validated at load.

``config.example.toml`` at the top of the repository documents every key.
The schema is the set of frozen dataclasses below; a small generic walker
(:func:`_build`) turns the parsed TOML into them by following their type
hints, so a new key is one new dataclass field (plus a line in the example).

Every problem becomes one line, ``FILE[:LINE]: key.path: what was expected``,
and all of them are raised together as :class:`~tomd.errors.ConfigError`.

Strings may use ``${VAR}`` and ``${VAR:-default}``. A secret (a field typed
:class:`Secret`) may instead be read from a file named by ``<name>_file``.
Secrets are never shown in messages nor in ``repr()``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import hmac
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union
from urllib.parse import quote, unquote, urlsplit

from tomd.errors import ConfigError, redact

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Channel",
    "Config",
    "Database",
    "Facility",
    "Hooks",
    "Logging",
    "Metrics",
    "Notify",
    "Rules",
    "Secret",
    "Storage",
    "Stream",
    "Targets",
    "check_config_file",
    "load_config",
    "parse_duration",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = Path("tomd.toml")
ENV_VAR = "TOMD_CONFIG"


# --------------------------------------------------------------------------
# Secret


class Secret:
    """A string that never shows itself: ``str()``/``repr()`` give ``***``.

    Call :meth:`reveal` at the one place the value is really needed
    (an HTTP header, a connection string).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


# --------------------------------------------------------------------------
# Field checks. Each takes the converted value and returns it (possibly
# normalised) or raises _Invalid("expected ...").


class _Invalid(Exception):
    """A value failed a check; the message says what was expected."""


def _expects(text: str):
    """Name what a check wants ("an http(s) URL"), also used for type errors."""
    def mark(check):
        check.expected = text
        return check
    return mark


def opt(default: Any = MISSING, *, factory: Any = MISSING,
        check: Callable[[Any], Any] | None = None,
        parse: Callable[[Any], Any] | None = None,
        precheck: Callable[[Any, tuple, Any], None] | None = None,
        redacted: bool = False, repr: bool = True) -> Any:
    """A dataclass field with validation metadata.

    ``parse`` replaces type conversion (it gets the raw TOML value, strings
    already ``${}``-expanded); ``check`` runs after conversion; ``precheck``
    looks at the raw value (reporting through ``ctx.bad``) before; ``redacted``
    hides a URL's password in messages; ``repr=False``
    keeps a credential-like value (a Slack webhook URL) out of ``repr()``.
    """
    meta: dict[str, Any] = {"redacted": redacted}
    if check is not None:
        meta["check"] = check
    if parse is not None:
        meta["parse"] = parse
    if precheck is not None:
        meta["precheck"] = precheck
    return field(default=default, default_factory=factory, metadata=meta, repr=repr)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_HELP = 'expected a duration like "30s", "5m", "2h" or "2d"'


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"2h"``, ``"2d"``, ``"1h30m"``, ``"250ms"`` or a
    number of seconds → seconds (float, > 0)."""
    if isinstance(value, bool):
        raise _Invalid(_DURATION_HELP)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+", value.strip()):
        seconds = sum(float(n) * _DURATION_UNITS[u]
                      for n, u in _DURATION_PART.findall(value.strip()))
    else:
        raise _Invalid(_DURATION_HELP)
    if not seconds > 0:
        raise _Invalid("expected a duration greater than zero")
    return seconds


def _between(lo: float | None = None, hi: float | None = None, *, above: float | None = None):
    """A range check: ``lo <= v <= hi`` and ``v > above`` (each optional)."""
    if lo is not None and hi is not None:
        bounds = f"from {lo:g} to {hi:g}"
    else:
        bounds = " and ".join(([f"greater than {above:g}"] if above is not None else [])
                              + ([f"at least {lo:g}"] if lo is not None else [])
                              + ([f"at most {hi:g}"] if hi is not None else []))

    def check(v):
        if ((above is not None and not v > above) or (lo is not None and v < lo)
                or (hi is not None and v > hi)):
            raise _Invalid(f"expected {'an integer' if isinstance(v, int) else 'a number'} {bounds}")
        return v
    return check


@_expects('an http(s) URL')
def _http_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in v):
        raise _Invalid("expected an http(s) URL")
    return v


_HOSTPORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


@_expects('host:port, like "127.0.0.1:9464"')
def _listen(v: str) -> str:
    """host:port to listen on; port 0 picks a free port (tests, several daemons on one host)."""
    m = _HOSTPORT.fullmatch(v)
    if not m or not 0 <= int(m.group(1)) < 65536:
        raise _Invalid('expected host:port, like "127.0.0.1:9464" (port 0: any free port)')
    return v


@_expects('host:port[,host:port...], like "localhost:9092"')
def _bootstrap(v: str) -> str:
    parts = [p.strip() for p in v.split(",")]
    for p in parts:
        m = _HOSTPORT.fullmatch(p)
        if not m or not 0 < int(m.group(1)) < 65536:
            raise _Invalid('expected host:port[,host:port...], like "localhost:9092"')
    return ",".join(parts)


@_expects('sqlite:///PATH or postgresql+psycopg://USER@HOST/DB')
def _database_url(v: str) -> str:
    if v.startswith("postgresql://"):
        v = "postgresql+psycopg://" + v[len("postgresql://"):]
    if v.startswith("sqlite:///") and len(v) > len("sqlite:///"):
        return v
    if v.startswith("postgresql+psycopg://") and len(v) > len("postgresql+psycopg://"):
        return v
    raise _Invalid("expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")


@_expects('file://PATH or s3://BUCKET/PREFIX')
def _storage_url(v: str) -> str:
    if v.startswith("file://") and len(v) > len("file://"):
        return v
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?", v)
    if m:
        return v
    raise _Invalid("expected file://PATH or s3://BUCKET/PREFIX")


def _start(v: Any) -> str:
    """"earliest", "latest" or a timestamp, returned as ISO-8601 with an
    explicit offset (a timestamp without one is UTC)."""
    if v in ("earliest", "latest"):
        return v
    when = None
    if isinstance(v, _dt.datetime):  # an unquoted TOML date-time
        when = v
    elif isinstance(v, _dt.date):
        when = _dt.datetime(v.year, v.month, v.day)
    elif isinstance(v, str):
        try:
            when = _dt.datetime.fromisoformat(v)
        except ValueError:
            pass
    if when is None:
        raise _Invalid('expected "earliest", "latest" or an ISO-8601 timestamp')
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.isoformat()


def _topics(v: list[str]) -> list[str]:
    if not v:
        raise _Invalid("expected a non-empty list of topics")
    for t in v:
        if not t:
            raise _Invalid("expected non-empty topic names")
        if t.startswith("^"):
            try:
                re.compile(t)
            except re.error as e:
                raise _Invalid(f"expected a valid regular expression for topic {t!r} ({e})") from None
    return v


# --------------------------------------------------------------------------
# The schema. Dataclasses are frozen and keyword-only. An optional classmethod
# ``_check(values, path, ctx)`` does cross-field checks on the converted values
# (it may normalise ``values``) and reports through ``ctx.bad``.

StreamFormat = Literal[
    "ztf-avro", "rubin-avro", "rubin-avro-file", "fink-avro", "lasair-json",
    "gcn-json", "gcn-voevent", "gcn-binary", "lvk-avro", "lvk-json", "antares",
    "hop", "auto",
]
# kind = "poll": the format names the REST service polled (tomd/brokers/).
POLL_FORMATS = ("tns-api", "alerce-api", "fink-api")


def _stream_format(v: Any) -> str:
    """A StreamFormat, or one of POLL_FORMATS (kind = "poll" checks which goes with which)."""
    if isinstance(v, str) and (v in typing.get_args(StreamFormat) or v in POLL_FORMATS):
        return v
    raise _Invalid(f"expected one of {', '.join(typing.get_args(StreamFormat))}")
FacilityKind = Literal["lco", "soar", "sim", "gemini", "swift"]
ChannelKind = Literal["slack", "email", "webhook", "log"]
KafkaValue = Union[str, int, float, bool]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_HELP = "expected a name of letters, digits, '-', '_' or '.'"


def _simple_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise _Invalid(_NAME_HELP)
    return v


def _consumer_group(v: str) -> str:
    if not v.strip() or any(c.isspace() for c in v):
        raise _Invalid("expected a consumer group name without spaces")
    return v


def _redact_url(url: str) -> str:
    """``scheme://user:PASSWORD@host/...`` → ``scheme://user:***@host/...``.

    Everything up to the last "@" is user info, so a password holding "@" or
    "/" is still hidden (over-redacting an odd path is the safe error)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
    return redact(url)


def _check_names(raw: Any, path: tuple, ctx: _Ctx) -> None:
    """Table keys that name things (facilities, channels) must be simple names."""
    for name in raw if isinstance(raw, dict) else ():
        if not _NAME.fullmatch(name):
            ctx.bad(path + (name,), f"{_NAME_HELP}, got {_show(name)}")


def _check_unique_names(raw: Any, path: tuple, ctx: _Ctx) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(raw if isinstance(raw, list) else ()):
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and name in seen:
            ctx.bad(path + (i, "name"), f'duplicate stream name "{name}" (also streams[{seen[name]}])')
        elif isinstance(name, str):
            seen[name] = i


def _is_kafka_secret(key: str) -> bool:
    k = key.lower()
    return k == "sasl.password" or "secret" in k or "password" in k


@dataclass(frozen=True, kw_only=True)
class Database:
    """``url`` is ready for SQLAlchemy: normalised, password merged in.
    ``repr()`` redacts it; use :attr:`safe_url` in messages."""

    url: str = opt("sqlite:///tomd.db", check=_database_url, redacted=True)
    password: Optional[Secret] = None
    pool_size: int = opt(5, check=_between(1, 1000))
    echo: bool = False

    @property
    def safe_url(self) -> str:
        return _redact_url(self.url)

    def __repr__(self) -> str:
        return (f"Database(url={self.safe_url!r}, password={self.password!r}, "
                f"pool_size={self.pool_size!r}, echo={self.echo!r})")

    @classmethod
    def _check(cls, values: dict, path: tuple, ctx: _Ctx) -> None:
        url = values.get("url", "sqlite:///tomd.db")
        password = values.get("password")
        if url is _FAIL or password is _FAIL:
            return
        parts = urlsplit(url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        user, colon, inline_pw = userinfo.partition(":")
        if url.startswith("sqlite:"):
            if password is not None:
                ctx.bad(path + ("password",), "a sqlite database takes no password")
            return
        if colon and password is not None:
            ctx.bad(path + ("password",), "the password is given both in url and here; keep one")
            return
        if colon:
            values["password"] = Secret(unquote(inline_pw))
        elif password is not None:
            if not user:
                ctx.bad(path + ("url",), "expected a user name in the URL (USER@HOST) to go with the password")
                return
            netloc = f"{user}:{quote(password.reveal(), safe='')}@{hostport}"
            values["url"] = parts._replace(netloc=netloc).geturl()


# librdkafka settings tomd sets itself for a stream (tomd.alerts.consumer):
# accepted by `config check` they would be refused or overridden by `run`.
_KAFKA_OWNED = {
    "enable.auto.commit": "tomd commits offsets itself, only after the database transaction "
                          "(at-least-once); remove it",
    "enable.auto.offset.store": "tomd stores offsets itself, only after the database transaction "
                                "(at-least-once); remove it",
    "client.id": "set by tomd to tomd-<stream name>, so broker logs and quotas name the stream; remove it",
}
# Formats that read schemaless Avro with a stream's schema_file.
SCHEMALESS_FORMATS = ("fink-avro", "auto")


@dataclass(frozen=True, kw_only=True)
class Stream:
    name: str = opt(check=_simple_name)
    kind: Literal["kafka", "file", "poll"] = "kafka"
    bootstrap: Optional[str] = opt(None, check=_bootstrap)
    topics: list[str] = opt(factory=list, check=_topics)  # required for kafka and file streams
    format: StreamFormat = opt(parse=_stream_format)  # or a POLL_FORMATS name for kind = "poll"
    group: str = opt("tomd", check=_consumer_group)
    start: str = opt("earliest", parse=_start)
    batch_size: int = opt(500, check=_between(1, 100000))
    batch_timeout: float = opt(0.5, parse=parse_duration)
    schema_registry: Optional[str] = opt(None, check=_http_url)
    # The .avsc of a schemaless Avro stream (the Fink livestream publishes its
    # schema apart from the messages); relative to the config file. Parsed once.
    schema_file: Optional[str] = None
    include_test: bool = False
    localization_max_deg: float = opt(0.1, check=_between(hi=180.0, above=0.0))
    store_cutouts: bool = True  # ZTF/Rubin image stamps as data products (~0.4 ms of CPU per alert: bench/ingest.py)
    # Kafka streams: processes that parse beside the stream thread's database work (0: the stream
    # thread parses). Worth it only with a core to spare (README, Benchmarks).
    parse_workers: int = opt(0, check=_between(0, 8))
    kafka: dict[str, Union[str, int, float, bool, Secret]] = opt(factory=dict)
    # kind = "poll" (tomd/brokers/): a broker's REST API queried every `interval`.
    url: Optional[str] = opt(None, check=_http_url)  # default: the service's public API
    interval: float = opt(300.0, parse=parse_duration)
    overlap: Optional[float] = opt(None, parse=parse_duration)  # reach back before the cursor; None: per service
    lookback: float = opt(86400.0, parse=parse_duration)  # first poll without a start timestamp
    page_size: int = opt(100, check=_between(1, 10000))
    timeout: float = opt(30.0, parse=parse_duration)
    query: dict[str, Any] = opt(factory=dict)  # service query parameters (class, classifier, ...)
    api_key: Optional[Secret] = None  # TNS bot API key
    bot_id: Optional[int] = opt(None, check=_between(1, 10**12))
    bot_name: Optional[str] = None

    def kafka_config(self) -> dict[str, KafkaValue]:
        """The librdkafka settings with secrets revealed (not bootstrap/group)."""
        return {k: (v.reveal() if isinstance(v, Secret) else v) for k, v in self.kafka.items()}

    @classmethod
    def _check(cls, values: dict, path: tuple, ctx: _Ctx) -> None:
        if values.get("kind", "kafka") == "kafka" and "bootstrap" not in values:
            ctx.bad(path + ("bootstrap",), 'missing required key for a kafka stream; expected host:port[,host:port...]')
        cls._check_poll(values, path, ctx)
        cls._check_schema_file(values, path, ctx)
        if values.get("kafka", {}) is _FAIL:
            return
        kafka = dict(values.get("kafka", {}))
        for key in ("bootstrap.servers", "group.id"):
            if key in kafka:
                own = "bootstrap" if key == "bootstrap.servers" else "group"
                ctx.bad(path + ("kafka", key), f"set {_render(path + (own,))} instead")
        for key, why in _KAFKA_OWNED.items():
            if key in kafka:
                ctx.bad(path + ("kafka", key), why)
        for key in list(kafka):
            base = key[:-len("_file")] if key.endswith("_file") else None
            if base is not None and _is_kafka_secret(base):
                file_name = kafka.pop(key)
                if base in kafka:
                    ctx.bad(path + ("kafka", key), f"{base} and {key} are both set; keep one")
                    continue
                value = ctx.read_secret_file(file_name, path + ("kafka", key))
                if value is not None:
                    kafka[base] = value
        emptied = set()  # secrets given as "" (e.g. ${VAR:-} unset): not set, but SASL may need them
        for key, value in list(kafka.items()):
            if _is_kafka_secret(key) and not isinstance(value, Secret):
                if value == "":
                    del kafka[key]  # e.g. ${VAR:-}: not set
                    emptied.add(key)
                elif not isinstance(value, str):
                    ctx.bad(path + ("kafka", key), f"expected a string, got {_kind_word(value)}")
                else:
                    kafka[key] = Secret(value)
        if values.get("kind", "kafka") == "kafka":
            given = set(values.get("kafka", {}))
            cls._check_sasl_credentials(kafka, emptied, given, path, ctx)
        values["kafka"] = kafka

    @classmethod
    def _check_sasl_credentials(cls, kafka: dict, emptied: set[str], given: set[str], path: tuple,
                                ctx: _Ctx) -> None:
        """The credentials librdkafka needs to log in. Without them it refuses to make the
        consumer at start; with a blank one (a secret from an unset ${VAR:-}, a stray space)
        it retries authentication forever with warnings only, and no alert ever arrives.
        Messages name the key, never a secret's value."""
        def text(key: str) -> str:
            value = kafka.get(key)
            return value.strip().lower() if isinstance(value, str) else ""

        needs: list[tuple[str, str]] = []  # (key, what it is to the setting that needs it)
        if text("sasl.oauthbearer.method") == "oidc":
            why = f'"sasl.oauthbearer.method" = {_show(kafka["sasl.oauthbearer.method"])}'
            if text("sasl.oauthbearer.metadata.authentication.type") == "azure_imds":
                return  # the token comes from the VM's metadata service: librdkafka checks the rest
            if text("sasl.oauthbearer.grant.type") in ("", "client_credentials"):
                # the jwt-bearer grant signs an assertion instead (librdkafka checks its key file)
                needs += [("sasl.oauthbearer.client.id", "the OIDC client id to get a token"),
                          ("sasl.oauthbearer.client.secret", "the OIDC client secret to get a token")]
            needs.append(("sasl.oauthbearer.token.endpoint.url", "the token endpoint URL (GCN: "
                          "https://auth.gcn.nasa.gov/oauth2/token) to get a token"))
        else:
            mech_key = "sasl.mechanisms" if "sasl.mechanisms" in kafka else "sasl.mechanism"
            # librdkafka uses sasl.* only over a SASL protocol (PLAINTEXT and SSL ignore them)
            if (text("security.protocol") in ("sasl_plaintext", "sasl_ssl")
                    and text(mech_key).upper() in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")):
                why = f'"{mech_key}" = {_show(kafka[mech_key])}'
                needs += [("sasl.username", "the SASL user name"), ("sasl.password", "the SASL password")]
        for key, what in needs:
            where = path + ("kafka", key)
            value = kafka.get(key)
            raw = ctx.raw(where)
            from_env = f" ({_show(raw)} expands to \"\")" if isinstance(raw, str) and "${" in raw else ""
            if key in emptied or value == "":
                ctx.bad(where, f"empty{from_env}; {why} needs {what}")
            elif value is None:
                if key + "_file" not in given:  # an unreadable or empty file is reported already
                    ctx.bad(where, f"missing; {why} needs {what}")
            elif isinstance(value, Secret):
                if not value.reveal().strip():
                    ctx.bad(where, f"blank; {why} needs {what}")
            elif not isinstance(value, str):
                if not _is_kafka_secret(key):  # a secret of the wrong type is reported already
                    ctx.bad(where, f"expected a string, got {_kind_word(value)}")
            elif not value.strip():
                ctx.bad(where, f"blank; {why} needs {what}")
            elif key.endswith(".url"):
                try:
                    _http_url(value)
                except _Invalid as e:
                    ctx.bad(where, f"{e}, got {_show(value)}")


    @classmethod
    def _check_schema_file(cls, values: dict, path: tuple, ctx: _Ctx) -> None:
        name, fmt = values.get("schema_file"), values.get("format", _FAIL)
        if not isinstance(name, str):
            return
        if fmt is not _FAIL and fmt not in SCHEMALESS_FORMATS:
            ctx.bad(path + ("schema_file",), f"only {' and '.join(SCHEMALESS_FORMATS)} streams read schemaless "
                    f"Avro; this stream's format is {_show(fmt)}")
            return
        from tomd.alerts.decode import load_schema_file  # fastavro: imported only when used
        from tomd.errors import DecodeError

        file = str((ctx.base_dir / name).absolute())
        try:
            load_schema_file(file)
        except DecodeError as exc:
            ctx.bad(path + ("schema_file",), str(exc))
            return
        values["schema_file"] = file

    @classmethod
    def _check_poll(cls, values: dict, path: tuple, ctx: _Ctx) -> None:
        kind, fmt = values.get("kind", "kafka"), values.get("format", _FAIL)
        if kind != "poll":
            if "topics" not in values:
                ctx.bad(path + ("topics",), "missing required key; expected a list of strings")
            return
        if fmt is not _FAIL and fmt not in POLL_FORMATS:
            ctx.bad(path + ("format",), f"a poll stream needs one of {', '.join(POLL_FORMATS)}, got {_show(fmt)}")
        if fmt == "tns-api":
            for key in ("api_key", "bot_id", "bot_name"):
                if key not in values:
                    ctx.bad(path + (key,), "missing required key for a TNS poll stream (the bot's credentials)")
        query = values.get("query", {})
        if query is not _FAIL:
            from tomd.brokers import owned_query_keys

            for key in query:
                if key in owned_query_keys(fmt):
                    ctx.bad(path + ("query", key), "set by tomd (from the cursor and page_size); remove it")


@dataclass(frozen=True, kw_only=True)
class Facility:
    kind: FacilityKind = opt()
    url: Optional[str] = opt(None, check=_http_url)
    token: Optional[Secret] = None
    proposal: Optional[str] = None
    timeout: float = opt(30.0, parse=parse_duration)
    rate_limit: float = opt(5.0, check=_between(above=0.0, hi=1000.0))
    poll_interval: float = opt(300.0, parse=parse_duration)
    templates: dict[str, dict[str, Any]] = opt(factory=dict)
    # gemini: the e-mail of the OT user key (token is the key's password).
    email: Optional[str] = None
    # swift: the TOO API user name (token is the shared secret).
    username: Optional[str] = None
    # swift: how long a submission polls its queued TOO job for a decision.
    job_wait: float = opt(60.0, parse=parse_duration)
    # false: accept a certificate that fails verification (some Gemini ODB hosts).
    tls_verify: bool = True

    @classmethod
    def _check(cls, values: dict, path: tuple, ctx: _Ctx) -> None:
        kind = values.get("kind", _FAIL)
        if kind is _FAIL:
            return
        if kind != "sim" and "url" not in values:
            ctx.bad(path + ("url",), f'missing required key for a "{kind}" facility; expected an http(s) URL')
        if kind in ("lco", "soar") and "token" not in values:
            ctx.bad(path + ("token",), f'missing required key for a "{kind}" facility; '
                    "expected an API token (or token_file)")
        if kind == "swift":
            for key, what in (("username", "the TOO API user name"), ("token", "the TOO API shared secret "
                                                                           "(or token_file)")):
                if key not in values:
                    ctx.bad(path + (key,), f'missing required key for a "swift" facility; expected {what}')


@dataclass(frozen=True, kw_only=True)
class Storage:
    url: str = opt("file://./tomd-data", check=_storage_url)
    s3_endpoint_url: Optional[str] = opt(None, check=_http_url)
    s3_region: Optional[str] = None
    multipart_threshold_mb: int = opt(64, check=_between(5, 5120))

    @property
    def local_dir(self) -> Path | None:
        """The directory of a ``file://`` store (relative to the working directory)."""
        return Path(self.url[len("file://"):]) if self.url.startswith("file://") else None

    @property
    def s3_bucket(self) -> str | None:
        return urlsplit(self.url).netloc if self.url.startswith("s3://") else None

    @property
    def s3_prefix(self) -> str:
        return urlsplit(self.url).path.strip("/") if self.url.startswith("s3://") else ""


@dataclass(frozen=True, kw_only=True)
class Targets:
    match_radius_arcsec: float = opt(1.5, check=_between(hi=3600.0, above=0.0))


@dataclass(frozen=True, kw_only=True)
class Rules:
    paths: list[str] = opt(factory=lambda: ["rules"])
    # Named feature functions for `when` expressions: name → "module:function".
    features: dict[str, str] = opt(factory=dict)
    # While this file exists, rules are evaluated and recorded but nothing fires.
    kill_switch: Optional[str] = None
    # false: the global kill switch, from the config.
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class Hooks:
    paths: list[str] = opt(factory=lambda: ["hooks"])
    timeout: float = opt(60.0, parse=parse_duration)
    max_attempts: int = opt(5, check=_between(1, 100))
    enabled: bool = True
    # First retry delay; doubles per attempt (with jitter) up to retry_max.
    retry_backoff: float = opt(10.0, parse=parse_duration)
    retry_max: float = opt(3600.0, parse=parse_duration)
    # Worker processes, each running one hook at a time.
    workers: int = opt(1, check=_between(1, 32))
    # How often the outbox is read when nothing wakes the runner.
    poll: float = opt(2.0, parse=parse_duration)
    # PostgreSQL: how long after a later event an earlier one may still commit.
    commit_window: float = opt(120.0, parse=parse_duration)
    # Scheduling priority of the hook workers (nice, 0..19): hooks yield the CPU to the pipeline.
    nice: int = opt(10, check=_between(0, 19))
    # While alerts keep coming, the workers spend at most this share of the time on hook runs
    # (1.0: no pacing); "busy" lasts busy_hold after each ingest commit. Runs wait, never drop.
    busy_share: float = opt(0.2, check=_between(above=0.0, hi=1.0))
    busy_hold: float = opt(1.0, parse=parse_duration)
    # Per hook file: [hooks.settings.<file stem>] → ctx.settings.
    settings: dict[str, dict[str, Any]] = opt(factory=dict)


@dataclass(frozen=True, kw_only=True)
class Metrics:
    listen: str = opt("127.0.0.1:9464", check=_listen)
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class Logging:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, kw_only=True)
class Channel:
    kind: ChannelKind = opt()
    # Slack/webhook URLs often carry a token: left out of repr().
    url: Optional[str] = opt(None, check=_http_url, repr=False)
    secret: Optional[Secret] = None
    to: list[str] = opt(factory=list)
    smtp_host: Optional[str] = None
    smtp_port: int = opt(587, check=_between(1, 65535))
    username: Optional[str] = None
    password: Optional[Secret] = None
    starttls: bool = True
    # Implicit TLS from the first byte (port 465) instead of STARTTLS.
    smtp_ssl: bool = False
    # A CA bundle (PEM) to trust for the SMTP server or the webhook's HTTPS, e.g. a private CA.
    ca_file: Optional[str] = None
    sender: Optional[str] = None  # the e-mail From address (default: tomd@<this host>)
    rate_limit_per_hour: Optional[int] = opt(None, check=_between(1, 1_000_000))
    # Batch: at most one message per this interval, holding everything queued meanwhile.
    digest: Optional[float] = opt(None, parse=parse_duration)
    # Event kinds sent to this channel besides rules' notify: "observation.failed", "observation.*".
    events: list[str] = opt(factory=list)
    timeout: float = opt(10.0, parse=parse_duration)  # per send (connect, TLS, upload, answer)
    max_attempts: int = opt(8, check=_between(1, 100))  # then the notification is recorded failed
    image: bool = True  # light curves: attached to e-mails, a presigned S3 URL on Slack

    @classmethod
    def _check(cls, values: dict, path: tuple, ctx: _Ctx) -> None:
        kind = values.get("kind", _FAIL)
        if kind is _FAIL:
            return
        if kind in ("slack", "webhook") and "url" not in values:
            ctx.bad(path + ("url",), f'missing required key for a "{kind}" channel; expected an http(s) URL')
        from tomd.events import EVENT_TYPES

        for i, pattern in enumerate(values.get("events", []) if values.get("events") is not _FAIL else []):
            stem = pattern[:-1] if pattern.endswith(".*") else None
            if pattern == "*" or pattern in EVENT_TYPES or (stem and any(k.startswith(stem) for k in EVENT_TYPES)):
                continue
            close = difflib.get_close_matches(pattern, sorted(EVENT_TYPES), n=1)
            hint = f'; did you mean "{close[0]}"?' if close else f" (known: {', '.join(sorted(EVENT_TYPES))})"
            ctx.bad(path + ("events", i), f'expected an event kind like "observation.failed" or '
                    f'"observation.*", got {_show(pattern)}{hint}')
        if kind == "email" and isinstance(values.get("sender"), str) and not re.fullmatch(
                r"(?:[^<>]*<)?[^@\s<>]+@[^@\s<>]+>?", values["sender"]):
            ctx.bad(path + ("sender",), f"expected an e-mail address, got {_show(values['sender'])}")
        if kind == "email":
            if "smtp_host" not in values:
                ctx.bad(path + ("smtp_host",), 'missing required key for an "email" channel; expected a host name')
            to = values.get("to", [])
            if not to:
                ctx.bad(path + ("to",), 'missing required key for an "email" channel; expected a list of addresses')
            for i, addr in enumerate(to if to is not _FAIL else []):
                if not re.fullmatch(r"[^@\s]+@[^@\s]+", addr):
                    ctx.bad(path + ("to", i), f"expected an e-mail address, got {_show(addr)}")


@dataclass(frozen=True, kw_only=True)
class Notify:
    channels: dict[str, Channel] = opt(factory=dict, precheck=_check_names)
    # How often the notifier looks for due messages when nothing wakes it.
    interval: float = opt(5.0, parse=parse_duration)


@dataclass(frozen=True, kw_only=True)
class Data:
    """Data retrieval (tomd/retrieve.py): completed requests' products fetched into [storage]."""

    interval: float = opt(60.0, parse=parse_duration)  # how often requests whose data is due are looked for
    max_attempts: int = opt(12, check=_between(1, 1000))  # attempts per request before giving up
    backoff: float = opt(60.0, parse=parse_duration)  # the wait after a failed attempt, doubling…
    backoff_max: float = opt(6 * 3600.0, parse=parse_duration)  # …up to this
    timeout: float = opt(60.0, parse=parse_duration)  # silence allowed within one download
    min_rate_kbps: float = opt(50.0, check=_between(above=0.0))  # slower on average (after 60 s): cut, retried


@dataclass(frozen=True, kw_only=True)
class Catalogs:
    """Catalog look-ups (tomd/catalogs/): SIMBAD, NED, JPL Horizons, MPC, TNS."""

    timeout: float = opt(20.0, parse=parse_duration)
    # Answers are kept in the database (table catalog_cache) this long.
    cache_ttl: float = opt(7 * 86400.0, parse=parse_duration)
    # Service URLs (default: each service's public one).
    simbad_url: Optional[str] = opt(None, check=_http_url)  # SIMBAD TAP base (…/simbad/sim-tap)
    ned_url: Optional[str] = opt(None, check=_http_url)  # NED object search (…/cgi-bin/objsearch)
    horizons_url: Optional[str] = opt(None, check=_http_url)  # …/api/horizons.api
    mpc_url: Optional[str] = opt(None, check=_http_url)  # MPC Orbits API (…/api/get-orb)
    tns_url: Optional[str] = opt(None, check=_http_url)  # TNS API base (…/api)
    tns_bot_id: Optional[int] = opt(None, check=_between(1, 10**12))
    tns_bot_name: Optional[str] = None
    tns_api_key: Optional[Secret] = None

    @classmethod
    def _check(cls, values: dict, path: tuple, ctx: _Ctx) -> None:
        given = [k for k in ("tns_bot_id", "tns_bot_name", "tns_api_key") if k in values]
        if given:
            for key in ("tns_bot_id", "tns_bot_name", "tns_api_key"):
                if key not in values:
                    ctx.bad(path + (key,), f"missing required key when {given[0]} is set (TNS bot credentials)")


def _default_facilities() -> dict[str, Facility]:
    return {"sim": Facility(kind="sim")}


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration. ``Config()`` is the embedded default."""

    database: Database = opt(factory=Database)
    streams: list[Stream] = opt(factory=list, precheck=_check_unique_names)
    facilities: dict[str, Facility] = opt(factory=_default_facilities, precheck=_check_names)
    storage: Storage = opt(factory=Storage)
    data: Data = opt(factory=Data)
    targets: Targets = opt(factory=Targets)
    rules: Rules = opt(factory=Rules)
    hooks: Hooks = opt(factory=Hooks)
    metrics: Metrics = opt(factory=Metrics)
    logging: Logging = opt(factory=Logging)
    notify: Notify = opt(factory=Notify)
    catalogs: Catalogs = opt(factory=Catalogs)
    source: Optional[Path] = field(default=None, compare=False, metadata={"internal": True})
    """The file this was read from (None for the embedded defaults)."""


# --------------------------------------------------------------------------
# The walker


KeyPath = tuple  # a key path: ("streams", 1, "format")
_FAIL = object()   # conversion failed; the problem is already recorded
_ABSENT = object()  # key not given


class _Ctx:
    def __init__(self, env: Mapping[str, str], base_dir: Path):
        self.env = env
        self.base_dir = base_dir
        self.problems: list[tuple[KeyPath, str]] = []
        self.doc: Any = None  # the parsed TOML as written (before ${VAR} expansion)

    def raw(self, path: KeyPath) -> Any:
        """The value at ``path`` as written in the file (None if absent), to say where
        a value came from, e.g. which ${VAR} gave an empty string."""
        node = self.doc
        for part in path:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        return node

    def bad(self, path: KeyPath, message: str) -> None:
        self.problems.append((path, message))

    def read_secret_file(self, raw: Any, path: KeyPath) -> Secret | None:
        """Read a ``*_file`` secret; None (and a problem) on failure."""
        if not isinstance(raw, str):
            self.bad(path, f"expected a file path, got {_show(raw)}")
            return None
        name = self.expand(raw, path)
        if name is _FAIL:
            return None
        file = self.base_dir / name
        try:
            value = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            self.bad(path, f"cannot read secret file {_show(name)}: {why}")
            return None
        if not value:
            self.bad(path, f"secret file {_show(name)} is empty")
            return None
        return Secret(value)

    _REF = re.compile(r"\$\{([^}]*)\}")
    _REF_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)

    def expand(self, text: str, path: KeyPath) -> Any:
        """Expand ``${VAR}`` / ``${VAR:-default}``; _FAIL (and a problem) on error."""
        if "${" not in text:
            return text
        out, pos, ok = [], 0, True
        for m in self._REF.finditer(text):
            out.append(text[pos:m.start()])
            pos = m.end()
            ref = self._REF_NAME.fullmatch(m.group(1))
            if not ref:
                self.bad(path, f"expected ${{NAME}} or ${{NAME:-default}}, got {_show(m.group(0))}")
                ok = False
                continue
            name, default = ref.groups()
            value = self.env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    self.bad(path, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
                    ok = False
                    continue
                value = default
            out.append(value)
        out.append(text[pos:])
        result = "".join(out)
        if ok and "${" in text[pos:]:
            self.bad(path, "unclosed ${ in string; expected ${NAME} or ${NAME:-default}")
            ok = False
        return result if ok else _FAIL


def _build(cls: type, raw: Any, path: KeyPath, ctx: _Ctx) -> Any:
    """Turn a TOML table into dataclass ``cls``, reporting every problem."""
    if not isinstance(raw, dict):
        ctx.bad(path, f"expected a table, got {_show(raw)}")
        return _FAIL
    hints = typing.get_type_hints(cls)
    flds = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    secrets = {n for n in flds if _strip_optional(hints[n]) is Secret}
    known = set(flds) | {n + "_file" for n in secrets}
    for key in raw:
        if key not in known:
            ctx.bad(path + (key,), _unknown_key(key, known))
    values: dict[str, Any] = {}  # given keys only; _FAIL where conversion failed
    ok = True
    for name, f in flds.items():
        if name in secrets:
            value = _secret_field(raw, name, path, ctx)
        elif name in raw:
            value = _field(raw[name], hints[name], f.metadata, path + (name,), ctx)
        else:
            value = _ABSENT
        if value is _ABSENT:
            if f.default is MISSING and f.default_factory is MISSING:
                ctx.bad(path + (name,), f"missing required key; expected {_describe(hints[name], f.metadata)}")
                ok = False
        else:
            values[name] = value
            ok = ok and value is not _FAIL
    # Cross-field checks run even when some field failed (they skip _FAIL
    # values), so that every problem is reported in one go.
    check = getattr(cls, "_check", None)
    before = len(ctx.problems)
    if check is not None:
        check(values, path, ctx)
    if not ok or len(ctx.problems) > before:
        return _FAIL
    return cls(**values)


def _secret_field(raw: dict, name: str, path: KeyPath, ctx: _Ctx) -> Any:
    file_key = name + "_file"
    if name in raw and file_key in raw:
        ctx.bad(path + (file_key,), f"{name} and {file_key} are both set; keep one")
        return _FAIL
    if file_key in raw:
        secret = ctx.read_secret_file(raw[file_key], path + (file_key,))
        return _FAIL if secret is None else secret
    if name not in raw:
        return _ABSENT
    value = raw[name]
    if not isinstance(value, str):
        ctx.bad(path + (name,), f"expected a string, got {_kind_word(value)}")
        return _FAIL
    value = ctx.expand(value, path + (name,))
    if value is _FAIL:
        return _FAIL
    return Secret(value) if value else _ABSENT  # "" (e.g. ${X:-}) means not set


def _field(raw: Any, hint: Any, meta: Mapping, path: KeyPath, ctx: _Ctx) -> Any:
    if "precheck" in meta:
        before = len(ctx.problems)
        meta["precheck"](raw, path, ctx)
        if len(ctx.problems) > before:
            _field(raw, hint, {k: v for k, v in meta.items() if k != "precheck"}, path, ctx)
            return _FAIL
    shown = raw
    if "parse" in meta:
        if isinstance(raw, str):
            raw = ctx.expand(raw, path)
            if raw is _FAIL:
                return _FAIL
            shown = raw
        try:
            return meta["parse"](raw)
        except _Invalid as e:
            ctx.bad(path, f"{e}, got {_show(shown, meta.get('redacted', False))}")
            return _FAIL
    expected = getattr(meta.get("check"), "expected", None)
    value = _convert(raw, hint, path, ctx, meta.get("redacted", False), expected)
    if value is _FAIL or "check" not in meta or value is None:
        return value
    try:
        return meta["check"](value)
    except _Invalid as e:
        ctx.bad(path, f"{e}, got {_show(value, meta.get('redacted', False))}")
        return _FAIL


def _convert(raw: Any, hint: Any, path: KeyPath, ctx: _Ctx, redacted: bool = False,
             expected: str | None = None) -> Any:
    """Convert one TOML value to ``hint``; _FAIL (and a problem) if it does not fit."""
    from_env = isinstance(raw, str) and "${" in raw
    if isinstance(raw, str):
        raw = ctx.expand(raw, path)
        if raw is _FAIL:
            return _FAIL
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong() -> Any:
        ctx.bad(path, f"expected {expected or _describe(hint)}, got {_show(raw, redacted)}")
        return _FAIL

    if hint is Any:
        return _expand_deep(raw, path, ctx)
    if origin in (Union, types.UnionType):
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:
            return _convert(raw, choices[0], path, ctx, redacted, expected)
        # a union of scalars (kafka settings): keep the TOML value as it is
        scalars = tuple(a for a in choices if a in (str, int, float, bool))
        return raw if isinstance(raw, scalars) else wrong()
    if origin is Literal:
        return raw if isinstance(raw, str) and raw in args else wrong()
    if origin is list:
        if not isinstance(raw, list):
            return wrong()
        items = [_convert(x, args[0], path + (i,), ctx) for i, x in enumerate(raw)]
        return _FAIL if any(x is _FAIL for x in items) else items
    if origin is dict or hint is dict:
        if not isinstance(raw, dict):
            return wrong()
        item_hint = args[1] if args else Any
        out = {k: _convert(v, item_hint, path + (k,), ctx) for k, v in raw.items()}
        return _FAIL if any(v is _FAIL for v in out.values()) else out
    if is_dataclass(hint):
        return _build(hint, raw, path, ctx)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if from_env and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        return wrong()
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if from_env and re.fullmatch(r"[+-]?\d+", raw.strip()):
            return int(raw)
        return wrong()
    if hint is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if from_env:
            try:
                return float(raw)
            except ValueError:
                pass
        return wrong()
    if hint is str:
        return raw if isinstance(raw, str) else wrong()
    raise TypeError(f"config schema uses an unsupported type {hint!r}")  # a bug, not a user error


def _expand_deep(raw: Any, path: KeyPath, ctx: _Ctx) -> Any:
    if isinstance(raw, str):
        return ctx.expand(raw, path)
    if isinstance(raw, list):
        items = [_expand_deep(x, path + (i,), ctx) for i, x in enumerate(raw)]
        return _FAIL if any(x is _FAIL for x in items) else items
    if isinstance(raw, dict):
        out = {k: _expand_deep(v, path + (k,), ctx) for k, v in raw.items()}
        return _FAIL if any(v is _FAIL for v in out.values()) else out
    return raw


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _describe(hint: Any, meta: Mapping = {}) -> str:
    if getattr(meta.get("check"), "expected", None):
        return meta["check"].expected
    hint = _strip_optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin in (Union, types.UnionType):
        return "a string, number or boolean"
    if origin is dict or hint is dict or is_dataclass(hint):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number",
            bool: "true or false", Secret: "a string"}.get(hint, "a value")


def _plural(hint: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(
        hint, "tables" if is_dataclass(hint) or typing.get_origin(hint) is dict else "values")


def _kind_word(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (_dt.date, _dt.time)):
        return "a date/time"
    return type(value).__name__


def _show(value: Any, redacted: bool = False) -> str:
    """A value as it would appear in TOML, short; tables and lists by kind."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if redacted:
            value = _redact_url(value)
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:76] + '..."'
    if value == [] or value == {}:
        return "[]" if value == [] else "{}"
    return _kind_word(value)


def _unknown_key(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return "unknown key; expected one of " + ", ".join(sorted(known))


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _render(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += ("." if out else "") + text
    return out


# --------------------------------------------------------------------------
# Best-effort line numbers: tomllib gives none, so scan the text for table
# headers and ``key =`` lines, skipping multi-line strings and arrays.

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*\]\]?")
_KEYVAL_RE = re.compile(rf"\s*({_DOTTED})\s*=")


def _split_key(dotted: str) -> tuple[str, ...] | None:
    try:
        doc = tomllib.loads(f"{dotted} = 0")
    except tomllib.TOMLDecodeError:
        return None
    keys: list[str] = []
    while isinstance(doc, dict) and len(doc) == 1:
        (k, doc), = doc.items()
        keys.append(k)
    return tuple(keys)


def _scan_rest(text: str, state: dict) -> None:
    """Advance over ``text`` tracking open brackets and multi-line strings."""
    i, n = 0, len(text)
    while i < n:
        if state["ml"]:
            end = text.find(state["ml"], i)
            if end < 0:
                return
            i, state["ml"] = end + 3, None
            continue
        c = text[i]
        if c == "#":
            return
        if text.startswith('"""', i) or text.startswith("'''", i):
            state["ml"] = text[i:i + 3]
            i += 3
        elif c == '"':
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(text, i)
            i = m.end() if m else n
        elif c == "'":
            end = text.find("'", i + 1)
            i = end + 1 if end >= 0 else n
        else:
            if c in "[{":
                state["depth"] += 1
            elif c in "]}":
                state["depth"] = max(0, state["depth"] - 1)
            i += 1


def _key_lines(text: str) -> dict[KeyPath, int] | None:
    lines: dict[KeyPath, int] = {}
    counts: dict[KeyPath, int] = {}  # array-of-tables path → number of elements so far
    table: KeyPath = ()
    state = {"ml": None, "depth": 0}

    def resolve(keys: tuple[str, ...]) -> KeyPath:
        out: KeyPath = ()
        for k in keys:
            out += (k,)
            if out in counts:
                out += (counts[out] - 1,)
        return out

    for lineno, line in enumerate(text.splitlines(), 1):
        if state["ml"] or state["depth"]:
            _scan_rest(line, state)
            continue
        m = _HEADER_RE.match(line)
        if m and line.lstrip().startswith("["):
            keys = _split_key(m.group(2))
            if keys is None:
                return None
            if m.group(1) == "[[":
                prefix = resolve(keys[:-1]) + (keys[-1],)
                counts[prefix] = counts.get(prefix, 0) + 1
                lines.setdefault(prefix, lineno)
                table = prefix + (counts[prefix] - 1,)
            else:
                table = resolve(keys)
            lines.setdefault(table, lineno)
            _scan_rest(line[m.end():], state)
            continue
        m = _KEYVAL_RE.match(line)
        if m:
            keys = _split_key(m.group(1))
            if keys is None:
                return None
            for j in range(1, len(keys) + 1):
                lines.setdefault(table + keys[:j], lineno)
            _scan_rest(line[m.end():], state)
        elif line.strip() and not line.lstrip().startswith("#"):
            return None  # valid TOML has nothing else here: the scan lost track
    return None if state["ml"] or state["depth"] else lines


def _exists(doc: Any, path: KeyPath) -> bool:
    for part in path:
        if isinstance(part, int):
            if not isinstance(doc, list) or part >= len(doc):
                return False
        elif not isinstance(doc, dict) or part not in doc:
            return False
        doc = doc[part]
    return True


def _reliable_key_lines(text: str, doc: dict) -> dict[KeyPath, int]:
    """Line numbers only if the scan agrees with what tomllib parsed."""
    try:
        lines = _key_lines(text)
    except Exception:  # a scanner bug must never hide the real problem
        return {}
    if lines is None or not all(_exists(doc, p) for p in lines):
        return {}
    return lines


def _line_of(path: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        path = path[:-1]


# --------------------------------------------------------------------------
# Public entry points


def resolve_config_path(cli_value: str | os.PathLike | None, *, env: Mapping[str, str] | None = None) -> Path:
    """The config file to use: the CLI value, else ``$TOMD_CONFIG``, else ``./tomd.toml``."""
    env = os.environ if env is None else env
    if cli_value:
        return Path(cli_value)
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    return DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the configuration.

    ``path`` None means ``$TOMD_CONFIG`` or else ``./tomd.toml``; if that
    default file does not exist the embedded defaults (``Config()``) are
    returned. An explicit path (argument or ``$TOMD_CONFIG``) must exist.
    Raises :class:`ConfigError` with one line per problem, never anything else
    for a user mistake.
    """
    env = os.environ if env is None else env
    explicit = bool(path) or bool(env.get(ENV_VAR))
    file = resolve_config_path(path, env=env)
    if not explicit and not file.exists():
        return Config()
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such config file"]) from None
    except OSError as e:
        raise ConfigError([f"{file}: cannot read config file: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{file}: invalid TOML: not UTF-8 text (byte {e.start})"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        if m:
            raise ConfigError([f"{file}:{m.group(1)}:{m.group(2)}: invalid TOML: {msg[:m.start()]}"]) from None
        raise ConfigError([f"{file}: invalid TOML: {msg}"]) from None
    return _from_dict(raw, file, text, env)


def _from_dict(raw: dict, file: Path, text: str, env: Mapping[str, str]) -> Config:
    ctx = _Ctx(env, file.parent)
    ctx.doc = raw
    config = _build(Config, raw, (), ctx)
    if ctx.problems:
        lines = _reliable_key_lines(text, raw)
        located = [(_line_of(p, lines), p, message) for p, message in ctx.problems]
        located.sort(key=lambda x: x[0] or 0)  # file order; stable within a line
        out = []
        for line, p, message in located:
            where = f"{file}:{line}" if line else str(file)
            out.append(f"{where}: {_render(p)}: {message}" if p else f"{where}: {message}")
        raise ConfigError(out)
    return dataclasses.replace(config, source=file)


def check_config_file(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None) -> list[str]:
    """Problem lines for ``tomd config check`` (empty when the config is valid).

    ``path`` follows :func:`load_config`: None means ``$TOMD_CONFIG`` or the
    default ``./tomd.toml`` (absent → the valid embedded defaults).
    """
    try:
        load_config(path, env=env)
    except ConfigError as e:
        return e.problems
    return []
