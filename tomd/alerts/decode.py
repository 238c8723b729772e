"""Bytes → decoded records (dicts), one function per framing.

Every function here raises :class:`DecodeError` for bytes it cannot decode and
never builds an :class:`Alert`: that is the survey parsers' job
(``tomd.alerts.formats``).

Framings:

* Avro Object Container File (ZTF, Fink, LVK, broker-written Rubin): the
  writer schema is embedded in every message. Parsing that schema costs
  several times more than decoding the body, so the header is read here and
  each distinct schema text is parsed once (``_parsed_schema`` cache);
  the blocks are then decoded with cavro, fastavro where cavro cannot
  (``OcfSchema``).
* Confluent wire format (Rubin): ``0x00`` + big-endian int32 schema id +
  schemaless Avro. The schema comes from a :class:`SchemaSource`.
* Schemaless Avro (Fink livestream): the bare record, its schema published
  apart as an ``.avsc`` file (:class:`SchemaFile`, a stream's
  ``schema_file``), parsed once per file.
* JSON, VOEvent XML, classic GCN 160-byte binary, ANTARES zlib+BSON.
"""

from __future__ import annotations

import io
import json
import os
import struct
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator, Protocol

import cavro
import fastavro
from fastavro.schema import load_schema

from tomd.errors import DecodeError

OCF_MAGIC = b"Obj\x01"
CONFLUENT_MAGIC = 0
GCN_PACKET_SIZE = 160  # 40 big-endian int32 words
_GCN_WORDS = struct.Struct(">40i")


# --- sniffing --------------------------------------------------------------

def sniff(data: bytes) -> str:
    """Guess the framing of ``data``.

    Returns one of ``"avro-ocf"``, ``"gcn-binary"``, ``"confluent-avro"``,
    ``"json"``, ``"xml"``, ``"zlib"`` or ``"unknown"``. A classic GCN packet
    also starts with a zero byte (its type is a small big-endian int), so
    the 160-byte check comes before the Confluent one.
    """
    if not data:
        return "unknown"
    if data[:4] == OCF_MAGIC:
        return "avro-ocf"
    if len(data) == GCN_PACKET_SIZE and data[:3] == b"\x00\x00\x00" and 0 < data[3] < 255:
        return "gcn-binary"
    if data[0] == CONFLUENT_MAGIC and len(data) > 5:
        return "confluent-avro"
    head = data[:64].lstrip(b" \t\r\n")
    if head.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        head = head[3:].lstrip()
    if head[:1] in (b"{", b"["):
        return "json"
    if head[:1] == b"<":
        return "xml"
    if len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0:
        return "zlib"
    return "unknown"


# --- Avro Object Container Files --------------------------------------------

def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """Avro zig-zag varint at ``pos`` → (value, new position)."""
    result = 0
    shift = 0
    while True:
        try:
            b = buf[pos]
        except IndexError:
            raise DecodeError("Avro container truncated inside a length") from None
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift > 63:
            raise DecodeError("Avro container has a malformed varint")
    return (result >> 1) ^ -(result & 1), pos


@dataclass(frozen=True, slots=True)
class OcfHeader:
    schema_json: bytes
    codec: str
    sync: bytes
    data_start: int


def read_ocf_header(buf: bytes) -> OcfHeader:
    if buf[:4] != OCF_MAGIC:
        raise DecodeError(f"not an Avro container file (starts with {bytes(buf[:4])!r})")
    pos = 4
    meta: dict[str, bytes] = {}
    while True:
        count, pos = _read_long(buf, pos)
        if count == 0:
            break
        if count < 0:  # block with byte size: count is negated, size follows
            count = -count
            _, pos = _read_long(buf, pos)
        for _ in range(count):
            klen, pos = _read_long(buf, pos)
            key = bytes(buf[pos : pos + klen]).decode("utf-8", "replace")
            pos += klen
            vlen, pos = _read_long(buf, pos)
            if vlen < 0 or pos + vlen > len(buf):
                raise DecodeError("Avro container header truncated")
            meta[key] = bytes(buf[pos : pos + vlen])
            pos += vlen
    sync = bytes(buf[pos : pos + 16])
    if len(sync) != 16:
        raise DecodeError("Avro container header truncated (no sync marker)")
    if "avro.schema" not in meta:
        raise DecodeError("Avro container header has no avro.schema")
    codec = meta.get("avro.codec", b"null").decode() or "null"
    return OcfHeader(meta["avro.schema"], codec, sync, pos + 16)


@dataclass(frozen=True, slots=True)
class OcfSchema:
    """A writer schema parsed for reading records: fastavro's parse, which
    checks the schema and reads anything, and cavro's where cavro takes the
    schema (``None`` where it does not).

    cavro (Cython, like fastavro) decodes a ZTF packet in 0.06-0.08 ms where
    fastavro's ``schemaless_reader`` takes 0.17-0.2 ms (bench/decode.py), the
    largest single cost of ingesting one alert. Both return the same values
    (tests/test_alert_decode.py compares them on every real sample); fastavro
    stays the reference: it reads whatever cavro refuses and names the
    problem of a body neither can read.
    """

    reference: Any
    fast: Any | None


@lru_cache(maxsize=128)
def _parsed_schema(schema_json: bytes) -> OcfSchema:
    """Parse a writer schema once per distinct schema text (bounded cache)."""
    try:
        reference = fastavro.parse_schema(json.loads(schema_json))
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad schema
        raise DecodeError(f"invalid Avro schema: {exc}") from exc
    return OcfSchema(reference, _cavro_schema(schema_json))


def _cavro_schema(schema_json: bytes) -> Any | None:
    try:
        # Schemas in the wild (ZTF's among them) give unions a null default
        # whose first branch is not null: fastavro accepts that, so cavro must.
        return cavro.Schema(schema_json.decode("utf-8"), record_decodes_to_dict=True,
                            allow_union_default_any_member=True, allow_invalid_default_values=True)
    except Exception:  # noqa: BLE001 - cavro refuses what it does not model: fastavro reads it
        return None


def _ocf_blocks(buf: bytes, header: OcfHeader) -> Iterator[tuple[int, bytes | memoryview]]:
    """Each block's record count and bytes (a view into ``buf`` unless decompressed: a
    ZTF block with its cutouts is ~65 kB, and copying it cost as much as reading the header)."""
    pos = header.data_start
    end = len(buf)
    view = memoryview(buf)
    while pos < end:
        count, pos = _read_long(buf, pos)
        size, pos = _read_long(buf, pos)
        if count < 0 or size < 0 or pos + size + 16 > end:
            raise DecodeError("Avro container block truncated")
        block = view[pos : pos + size]
        pos += size
        if buf[pos : pos + 16] != header.sync:
            raise DecodeError("Avro container block has a wrong sync marker")
        pos += 16
        if header.codec == "deflate":
            try:
                block = zlib.decompress(block, -15)
            except zlib.error as exc:
                raise DecodeError(f"Avro deflate block: {exc}") from exc
        yield count, block


def decode_avro_ocf(data: bytes) -> list[dict]:
    """All records of an Avro Object Container File, schema parsed once per text."""
    buf = bytes(data)
    header = read_ocf_header(buf)
    if header.codec not in ("null", "deflate"):
        return _decode_ocf_fastavro(buf)
    schema = _parsed_schema(header.schema_json)
    blocks = list(_ocf_blocks(buf, header))  # a broken container is a DecodeError before any record
    if schema.fast is not None:
        try:
            return _read_cavro(schema.fast, blocks)
        except Exception:  # noqa: BLE001 - fastavro reads it again and names the problem
            pass
    records: list[dict] = []
    reader = fastavro.schemaless_reader
    try:
        for count, block in blocks:
            bio = io.BytesIO(block)
            for _ in range(count):
                records.append(reader(bio, schema.reference, None))
    except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds
        raise DecodeError(f"Avro container body does not match its schema: {exc!r}") from exc
    return records


def _read_cavro(schema: Any, blocks: list[tuple[int, bytes | memoryview]]) -> list[dict]:
    records = []
    for count, block in blocks:
        reader = cavro.MemoryReader(block)
        for _ in range(count):
            records.append(schema.binary_read(reader))
    return records


def _decode_ocf_fastavro(buf: bytes) -> list[dict]:
    """Other codecs (snappy, zstandard, ...): let fastavro handle them."""
    try:
        return list(fastavro.reader(io.BytesIO(buf)))
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"Avro container: {exc!r}") from exc


# --- Confluent wire format and schema sources --------------------------------

class SchemaSource(Protocol):
    """Looks up a parsed Avro schema by Confluent schema id."""

    def get(self, schema_id: int) -> Any:
        """The fastavro-parsed schema for ``schema_id``; DecodeError if unknown."""
        ...


class PackagedRubinSchemas:
    """Rubin alert schemas shipped in the PyPI package ``lsst-alert-packet``, then in tomd.

    Layout: ``lsst/alert/packet/schema/<major>/<minor>/lsst.v<major>_<minor>.alert.avsc``;
    the alert schema names its parts (``lsst.v9_0.diaSource``) that live in
    sibling files named after them, which ``fastavro.schema.load_schema``
    resolves. Rubin's schema id is ``100 * major + minor``. A version the
    released package lacks (10.1: in lsst/alert_packet's repository only) is
    read from ``tomd/alerts/schemas/lsst/`` in the same layout (see its
    README); the package's own copy wins when a later release has it.
    """

    def __init__(self) -> None:
        self._cache: dict[int, Any] = {}

    @staticmethod
    def _roots() -> list[Any]:
        roots = []
        try:
            roots.append(resources.files("lsst.alert.packet") / "schema")
        except ModuleNotFoundError:
            pass
        roots.append(resources.files("tomd.alerts") / "schemas" / "lsst")
        return roots

    def get(self, schema_id: int) -> Any:
        if schema_id in self._cache:
            return self._cache[schema_id]
        major, minor = divmod(int(schema_id), 100)
        name = f"lsst.v{major}_{minor}.alert.avsc"
        path = next((p for p in (r / str(major) / str(minor) / name for r in self._roots()) if p.is_file()), None)
        if path is None:
            raise DecodeError(
                f"schema id {schema_id}: no Rubin schema v{major}.{minor} in lsst-alert-packet"
                " (is it installed?) nor in tomd/alerts/schemas/lsst"
            )
        try:
            with resources.as_file(path) as p:
                schema = load_schema(str(p))
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"schema id {schema_id}: cannot load {path}: {exc}") from exc
        self._cache[schema_id] = schema
        return schema


@dataclass
class RegistrySchemaSource:
    """A Confluent Schema Registry (``GET /schemas/ids/{id}``), cached per id.

    ``client`` is an ``httpx.Client`` (injected, so the caller owns its
    lifetime, TLS and auth); every request carries ``timeout``. Schema
    references (``"references"``: subject + version) are fetched and parsed
    as named types first.
    """

    url: str
    client: Any
    timeout: float = 10.0
    _cache: dict[int, Any] = field(default_factory=dict, repr=False)

    def _get_json(self, path: str) -> dict:
        import httpx

        url = self.url.rstrip("/") + path
        try:
            resp = self.client.get(url, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise DecodeError(f"schema registry {path}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise DecodeError(f"schema registry {path}: HTTP {resp.status_code} {resp.text[:200]}")
        try:
            return resp.json()
        except ValueError as exc:
            raise DecodeError(f"schema registry {path}: body is not JSON") from exc

    def _parse(self, body: dict, named: dict, depth: int = 0) -> Any:
        if depth > 10:
            raise DecodeError("schema registry: schema references nest too deep")
        for ref in body.get("references") or []:
            sub = self._get_json(f"/subjects/{ref['subject']}/versions/{ref['version']}")
            self._parse(sub, named, depth + 1)
        try:
            return fastavro.parse_schema(json.loads(body["schema"]), named_schemas=named)
        except (KeyError, ValueError, TypeError) as exc:
            raise DecodeError(f"schema registry returned an unusable schema: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - fastavro SchemaParseException
            raise DecodeError(f"schema registry returned an invalid Avro schema: {exc}") from exc

    def get(self, schema_id: int) -> Any:
        if schema_id not in self._cache:
            body = self._get_json(f"/schemas/ids/{int(schema_id)}")
            self._cache[schema_id] = self._parse(body, {})
        return self._cache[schema_id]


@dataclass
class ChainSchemaSource:
    """Ask each source in turn (registry first, packaged schemas as fallback).

    The schema found is kept per id: an id the registry does not know would
    otherwise cost one HTTP request per message before the fallback answers.
    A failure is not kept, so a registry that was down is asked again.
    """

    sources: tuple[SchemaSource, ...]
    _cache: dict[int, Any] = field(default_factory=dict, repr=False)

    def get(self, schema_id: int) -> Any:
        if schema_id in self._cache:
            return self._cache[schema_id]
        errors = []
        for src in self.sources:
            try:
                schema = src.get(schema_id)
            except DecodeError as exc:
                errors.append(str(exc))
                continue
            self._cache[schema_id] = schema
            return schema
        raise DecodeError(f"schema id {schema_id} not found: " + "; ".join(errors))


@lru_cache(maxsize=1)
def default_schema_source() -> PackagedRubinSchemas:
    """One shared packaged-schema source, built on first use (not at import)."""
    return PackagedRubinSchemas()


def confluent_schema_id(data: bytes) -> int:
    if len(data) < 5 or data[0] != CONFLUENT_MAGIC:
        raise DecodeError("not Confluent wire format (needs magic byte 0x00 and a 4-byte schema id)")
    return struct.unpack_from(">I", data, 1)[0]


def decode_confluent(data: bytes, schema_source: SchemaSource | None = None) -> list[dict]:
    """One record from Confluent wire-format bytes."""
    schema_id = confluent_schema_id(data)
    schema = (schema_source or default_schema_source()).get(schema_id)
    bio = io.BytesIO(data)
    bio.seek(5)
    try:
        record = fastavro.schemaless_reader(bio, schema, None)
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"Avro body does not match schema id {schema_id}: {exc!r}") from exc
    if bio.tell() != len(data):
        raise DecodeError(
            f"Avro body for schema id {schema_id} left {len(data) - bio.tell()} bytes unread"
        )
    return [record]


# --- schemaless Avro with a separately distributed schema ------------------------

@dataclass(frozen=True, slots=True)
class SchemaFile:
    """A writer schema published apart from the messages (Fink's
    ``distribution_schema_*.avsc``): every message is one bare Avro record."""

    path: str
    schema: Any  # fastavro-parsed


def load_schema_file(path: str) -> SchemaFile:
    """Read and parse an ``.avsc`` once per path and version of the file.

    Raises :class:`DecodeError` naming the file when it is missing or not an
    Avro schema. Named types defined in sibling files (``<name>.avsc``, as
    ZTF splits its schema) resolve through ``fastavro.schema.load_schema``.
    The file's modification time is part of the cache key, so a reload
    after the file was replaced reads the new schema.
    """
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise DecodeError(f"schema file {path}: {exc.strerror or type(exc).__name__}") from exc
    return _load_schema_file(path, mtime)


@lru_cache(maxsize=32)
def _load_schema_file(path: str, _mtime_ns: int) -> SchemaFile:
    try:
        with open(path, "rb") as fh:
            obj = json.loads(fh.read())
    except OSError as exc:
        raise DecodeError(f"schema file {path}: {exc.strerror or type(exc).__name__}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"schema file {path}: not JSON: {exc}") from exc
    try:
        return SchemaFile(path, fastavro.parse_schema(obj))
    except Exception as exc:  # noqa: BLE001 - fastavro's SchemaParseException and friends
        first = exc
    try:
        return SchemaFile(path, load_schema(path))
    except Exception:  # noqa: BLE001 - report the plain parse's error, the clearer one
        raise DecodeError(f"schema file {path}: not an Avro schema: {type(first).__name__}: {first}") from first


@lru_cache(maxsize=8)
def schema_from_key(key: bytes) -> SchemaFile:
    """The writer schema a Fink livestream message carries in its Kafka key.

    fink-client reads the key as the JSON text of the schema first and only
    then falls back to a schema file: the schema then follows Fink's
    versions without a configuration change. Parsed once per distinct key.
    """
    try:
        obj = json.loads(key)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"message key is not a JSON Avro schema: {exc}") from exc
    try:
        return SchemaFile("the message key", fastavro.parse_schema(obj))
    except Exception as exc:  # noqa: BLE001 - fastavro's SchemaParseException and friends
        raise DecodeError(f"message key is not an Avro schema: {type(exc).__name__}: {exc}") from exc


def key_is_schema(key: bytes | None) -> bool:
    """Whether a message key looks like an Avro schema's JSON (Fink), not an id or a name."""
    return bool(key) and key.lstrip()[:1] == b"{"


def decode_avro_schemaless(data: bytes, schema_file: SchemaFile) -> list[dict]:
    """One bare Avro record written with ``schema_file``'s schema.

    The whole message must be consumed: bytes left over mean another schema
    (or framing) wrote it, which would otherwise decode into nonsense quietly.
    """
    bio = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(bio, schema_file.schema, None)
    except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds
        raise DecodeError(f"schemaless Avro does not match {schema_file.path}: {exc!r}") from exc
    if bio.tell() != len(data):
        raise DecodeError(f"schemaless Avro read with {schema_file.path} left "
                          f"{len(data) - bio.tell()} of {len(data)} bytes unread (another schema?)")
    return [record]


# --- JSON, XML -----------------------------------------------------------------

def decode_json(data: bytes) -> list[Any]:
    """A JSON document; a top-level list gives one record per element."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid JSON: {exc}") from exc
    if isinstance(obj, list):
        return obj
    return [obj]


def _local(tag: str) -> str:
    """Tag name without its namespace ('{ns}VOEvent' → 'VOEvent')."""
    return tag.rsplit("}", 1)[-1] if tag.startswith("{") else tag.split(":")[-1]


def _find(elem: ET.Element | None, *path: str) -> ET.Element | None:
    """Namespace-blind child lookup along ``path``."""
    for name in path:
        if elem is None:
            return None
        elem = next((c for c in elem if _local(c.tag) == name), None)
    return elem


def _iter_named(elem: ET.Element, name: str) -> Iterator[ET.Element]:
    for e in elem.iter():
        if _local(e.tag) == name:
            yield e


def _text(elem: ET.Element | None) -> str | None:
    if elem is None or elem.text is None:
        return None
    t = elem.text.strip()
    return t or None


def decode_voevent(data: bytes) -> list[dict]:
    """A VOEvent (any namespace prefix, or none) as a plain dict.

    Keys: ivorn, role, version, date (Who/Date), author, params (name → value,
    including those inside Groups), time, time_system, coord_system, ra, dec,
    error_radius, position_unit, description, citations (list of ivorns), xml.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DecodeError(f"invalid XML: {exc}") from exc
    if _local(root.tag) != "VOEvent":
        raise DecodeError(f"XML root is <{_local(root.tag)}>, not a VOEvent")
    rec: dict[str, Any] = {
        "ivorn": root.get("ivorn"),
        "role": root.get("role", "observation"),
        "version": root.get("version"),
        "date": _text(_find(root, "Who", "Date")),
        "author": _text(_find(root, "Who", "AuthorIVORN")),
        "description": _text(_find(root, "What", "Description")) or _text(_find(root, "How", "Description")),
    }
    params: dict[str, Any] = {}
    what = _find(root, "What")
    if what is not None:
        for p in _iter_named(what, "Param"):
            name = p.get("name")
            if not name:
                continue
            value = p.get("value")
            if value is None:
                value = _text(_find(p, "Value"))
            params.setdefault(name, value)
    rec["params"] = params
    coords = _find(root, "WhereWhen", "ObsDataLocation", "ObservationLocation", "AstroCoords")
    rec["coord_system"] = coords.get("coord_system_id") if coords is not None else None
    rec["time"] = _text(_find(coords, "Time", "TimeInstant", "ISOTime"))
    pos = _find(coords, "Position2D")
    rec["position_unit"] = pos.get("unit") if pos is not None else None
    rec["ra"] = _text(_find(pos, "Value2", "C1"))
    rec["dec"] = _text(_find(pos, "Value2", "C2"))
    rec["error_radius"] = _text(_find(pos, "Error2Radius"))
    rec["citations"] = [
        e.text.strip() for e in _iter_named(root, "EventIVORN") if e.text and e.text.strip()
    ]
    rec["xml"] = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
    return [rec]


# --- classic GCN binary, ANTARES ------------------------------------------------

def decode_gcn_binary(data: bytes) -> list[dict]:
    """A classic GCN socket packet: 40 big-endian int32 words, word 0 = type."""
    if len(data) != GCN_PACKET_SIZE:
        raise DecodeError(f"classic GCN packet must be {GCN_PACKET_SIZE} bytes, got {len(data)}")
    words = _GCN_WORDS.unpack(data)
    return [{"packet_type": words[0], "words": words}]


def decode_antares(data: bytes) -> list[dict]:
    """An ANTARES stream message: zlib-compressed BSON (antares-client does the same)."""
    try:
        raw = zlib.decompress(data)
    except zlib.error as exc:
        raise DecodeError(f"ANTARES message is not zlib-compressed: {exc}") from exc
    try:
        import bson  # from pymongo
    except ImportError as exc:  # pragma: no cover - pymongo is a dependency
        raise DecodeError("decoding ANTARES needs pymongo (bson)") from exc
    try:
        return [bson.decode(raw)]
    except Exception as exc:  # noqa: BLE001 - bson.errors.InvalidBSON and friends
        raise DecodeError(f"ANTARES message is not BSON: {exc}") from exc
