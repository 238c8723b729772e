"""Survey formats: how to decode a message's bytes and parse its records.

``FORMATS`` maps a stream's configured ``format`` name to a :class:`Format`:
a decode step (bytes → records, see :mod:`tomd.alerts.decode`) and a parse
step (record → Alerts, one module per survey here). ``"auto"`` sniffs the
framing and picks the parser from the record's shape. A decode step gets a
:class:`DecodeContext`: the stream's schema sources, fixed per stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tomd.alerts import decode
from tomd.alerts.model import Alert
from tomd.errors import DecodeError, ParseError

from . import antares, fink, gcn_binary, gcn_json, hop, lasair, lvk, rubin, voevent, ztf
from . import alerce_api, fink_api, tns_api  # broker REST results (tomd/brokers/)


@dataclass(frozen=True, slots=True)
class DecodeContext:
    """What a decode step may need beyond the bytes, fixed per stream."""

    schema_source: decode.SchemaSource | None = None  # Confluent schema ids (Rubin)
    schema_file: decode.SchemaFile | None = None  # schemaless Avro (Fink livestream)


NO_CONTEXT = DecodeContext()
Decoder = Callable[[bytes, DecodeContext], list[Any]]
Parser = Callable[[Any], list[Alert]]


@dataclass(frozen=True, slots=True)
class Format:
    """One message format: its name, its decode step and its parse step."""

    name: str
    decode: Decoder
    parse: Parser
    description: str = ""


def _ocf(data: bytes, _ctx: DecodeContext) -> list[Any]:
    return decode.decode_avro_ocf(data)


def _ocf_or_schemaless(data: bytes, ctx: DecodeContext) -> list[Any]:
    """Fink: data-transfer files are containers, the livestream is schemaless Avro."""
    if data[:4] == decode.OCF_MAGIC or ctx.schema_file is None:
        try:
            return decode.decode_avro_ocf(data)
        except DecodeError as exc:
            if data[:4] == decode.OCF_MAGIC:
                raise
            raise DecodeError(f"{exc}; a schemaless Avro stream (the Fink livestream) needs the stream's "
                              "schema_file (the published .avsc)") from None
    return decode.decode_avro_schemaless(data, ctx.schema_file)


def _confluent(data: bytes, ctx: DecodeContext) -> list[Any]:
    return decode.decode_confluent(data, ctx.schema_source)


def _json(data: bytes, _ctx: DecodeContext) -> list[Any]:
    return decode.decode_json(data)


def _json_object(data: bytes, _ctx: DecodeContext) -> list[Any]:
    records = decode.decode_json(data)
    for r in records:
        if not isinstance(r, dict):
            raise DecodeError(f"expected a JSON object, got {type(r).__name__}")
    return records


def _voevent(data: bytes, _ctx: DecodeContext) -> list[Any]:
    return decode.decode_voevent(data)


def _gcn_binary(data: bytes, _ctx: DecodeContext) -> list[Any]:
    return decode.decode_gcn_binary(data)


def _antares(data: bytes, _ctx: DecodeContext) -> list[Any]:
    return decode.decode_antares(data)


def _auto_decode(data: bytes, ctx: DecodeContext) -> list[Any]:
    kind = decode.sniff(data)
    if kind == "avro-ocf":
        return decode.decode_avro_ocf(data)
    if kind == "json":
        return decode.decode_json(data)
    if kind == "xml":
        return decode.decode_voevent(data)
    # A schemaless record has no framing to sniff: its first byte is the
    # first field's (often a union branch 0x00, which looks like Confluent's
    # magic byte). A stream that names a schema_file says what it carries.
    if ctx.schema_file is not None:
        return decode.decode_avro_schemaless(data, ctx.schema_file)
    if kind == "confluent-avro":
        try:
            return decode.decode_confluent(data, ctx.schema_source)
        except DecodeError as exc:
            raise DecodeError(f"{exc} (read as Confluent wire format; if the stream carries schemaless "
                              "Avro, as the Fink livestream does, set its schema_file)") from None
    if kind == "gcn-binary":
        return decode.decode_gcn_binary(data)
    if kind == "zlib":
        return decode.decode_antares(data)
    raise DecodeError(f"cannot tell the format of a {len(data)}-byte message (starts {bytes(data[:8])!r})")


def pick_parser(record: Any) -> Parser:
    """The parser for a decoded record, chosen by its shape (for "auto")."""
    if not isinstance(record, dict):
        raise ParseError(f"record is a {type(record).__name__}, not an object")
    keys = record.keys()
    if "candidate" in keys:
        return fink.parse if any(k not in ztf.PACKET_KEYS for k in keys) else ztf.parse
    if "diaSource" in keys:
        return fink.parse if any(k not in rubin.PACKET_KEYS for k in keys) else rubin.parse
    if "superevent_id" in keys:
        return lvk.parse
    if "words" in keys and "packet_type" in keys:
        return gcn_binary.parse
    if "ivorn" in keys and "params" in keys:
        return voevent.parse
    if "content" in keys or "_id" in keys:
        return hop.parse
    if ("diaObjectId" in keys or "objectId" in keys) and "$schema" not in keys:
        return lasair.parse
    if "data" in keys and isinstance(record.get("data"), dict) and "attributes" in record["data"]:
        return antares.parse
    if "locus_id" in keys:
        return antares.parse
    return gcn_json.parse


def _auto_parse(record: Any) -> list[Alert]:
    return pick_parser(record)(record)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("ztf-avro", _ocf, ztf.parse, "ZTF alert: Avro container, schema embedded"),
        Format("rubin-avro", _confluent, rubin.parse, "Rubin alert: Confluent wire format"),
        Format("rubin-avro-file", _ocf, rubin.parse, "Rubin alert(s) in an Avro container"),
        Format("fink-avro", _ocf_or_schemaless, fink.parse,
               "Fink output (ZTF or Rubin + Fink columns): Avro container, or schemaless with schema_file"),
        Format("lasair-json", _json_object, lasair.parse, "Lasair filter output"),
        Format("gcn-json", _json_object, gcn_json.parse, "GCN Kafka JSON notice (gcn-schema)"),
        Format("gcn-voevent", _voevent, voevent.parse, "VOEvent 2.0 XML"),
        Format("gcn-binary", _gcn_binary, gcn_binary.parse, "classic GCN 160-byte packet"),
        Format("lvk-avro", _ocf, lvk.parse, "LVK igwn.gwalert, Avro container"),
        Format("lvk-json", _json_object, lvk.parse, "LVK igwn.gwalert, JSON"),
        Format("antares", _antares, antares.parse, "ANTARES locus: zlib + BSON"),
        Format("hop", _json_object, hop.parse, "SCiMMA hop envelope (JSON)"),
        Format("auto", _auto_decode, _auto_parse, "sniff the framing, pick by record shape"),
        Format("tns-api", _json_object, tns_api.parse, "TNS API object (kind = \"poll\")"),
        Format("alerce-api", _json_object, alerce_api.parse, "ALeRCE API object + light curve (kind = \"poll\")"),
        Format("fink-api", _json_object, fink_api.parse, "Fink API row (kind = \"poll\")"),
    )
}
