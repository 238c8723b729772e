"""Raw message bytes → normalised Alerts, for any configured format.

This is the one entry point the consumer (and ``tomd replay``) calls::

    alerts = parse_message("ztf-avro", message.value())

Errors: :class:`DecodeError` when the bytes cannot be decoded,
:class:`ParseError` when a decoded record lacks a field or has a bad value;
both name what was wrong. Test/mock messages are dropped unless
``include_test`` is set.
"""

from __future__ import annotations

from tomd.alerts.decode import SchemaFile, SchemaSource
from tomd.alerts.formats import FORMATS, NO_CONTEXT, DecodeContext, Format
from tomd.alerts.model import Alert
from tomd.errors import AlertError, ParseError


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS))
        raise ParseError(f"unknown alert format {name!r} (known: {known})") from None


def parse_message(
    format_name: str,
    data: bytes,
    *,
    schema_source: SchemaSource | None = None,
    schema_file: SchemaFile | None = None,
    include_test: bool = False,
) -> list[Alert]:
    """Decode ``data`` as ``format_name`` and parse every record into Alerts.

    ``schema_source`` resolves Confluent schema ids (Rubin); by default the
    schemas shipped in lsst-alert-packet are used. ``schema_file`` is the
    writer schema of a schemaless Avro stream (the Fink livestream; see
    :func:`tomd.alerts.decode.load_schema_file`).
    """
    fmt = get_format(format_name)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ParseError(f"message value must be bytes, got {type(data).__name__}")
    ctx = NO_CONTEXT if schema_source is None and schema_file is None else DecodeContext(schema_source, schema_file)
    records = fmt.decode(bytes(data), ctx)
    alerts: list[Alert] = []
    for i, record in enumerate(records):
        try:
            parsed = fmt.parse(record)
        except AlertError as exc:
            if len(records) > 1:  # say which record of a multi-record container failed
                raise type(exc)(f"record {i}: {exc}") from exc
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A record of the right framing but an unexpected shape.
            raise ParseError(f"record {i}: unexpected structure ({type(exc).__name__}: {exc})") from exc
        alerts.extend(parsed)
    if not include_test:
        alerts = [a for a in alerts if not a.test]
    return alerts
