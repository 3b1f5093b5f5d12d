"""Avro single-object encoding for every sluice record, and JSON for raw events.

Wire format (Avro specification, "Single-object encoding"): ``C3 01``, the 8-byte
little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form, then
the Avro binary body. Readers find the writer schema among every version kept in
``schemas/`` and resolve it to the latest version of the expected record type.

Two codecs write and read the body. ``encode``/``decode`` use fastavro (C): they are the
hot paths of the producer, the worker's Faust codec and the trainer. ``encode_reference``/
``decode_reference`` use the avro package, the schema authority (it also computes the
fingerprints and canonical forms in ``schemas``); ``tests/schemas/test_codec_equivalence.py``
proves the two write the same bytes and read each other's, for every schema and version.
"""

from __future__ import annotations

import io
import json
import reprlib
import time
from functools import cache
from struct import error as struct_error
from typing import Any, cast

import avro.errors
import avro.io
import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.validation import ValidationError, validate

import schemas
from schemas.errors import SluiceError
from schemas.records import RawEvent

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
KINDS = ("CODE", "TEXT")
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1

# What fastavro's writer raises for a record that does not fit (a missing field, a wrong
# type, an unknown enum symbol, an int past 64 bits, a lone surrogate in a string).
_ENCODE_ERRORS = (ValidationError, ValueError, TypeError, OverflowError, KeyError,
                  AttributeError)
# What fastavro's reader raises on corrupt or truncated bytes: EOFError (the body ends
# early), ValueError (a negative length, a bad union or enum index), StopIteration and
# IndexError (an index past a list), TypeError, OverflowError and MemoryError (a length or
# count from random bytes), KeyError, struct.error, and SchemaResolutionError. Each becomes
# ``undecodable``; UnicodeDecodeError (a ValueError) is caught first as ``invalid_utf8``.
_DECODE_ERRORS = (EOFError, ValueError, StopIteration, IndexError, TypeError, OverflowError,
                  MemoryError, KeyError, struct_error, SchemaResolutionError)


class DecodeError(SluiceError):
    """A record that cannot become a sluice record; ``reason`` is its rejection reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EncodeError(SluiceError):
    """A record that does not fit its schema (a bug in the writer, never user input)."""


def _version(name: str, version: int | None) -> schemas.SchemaVersion:
    if version is None:
        return schemas.latest(name)
    return next(v for v in schemas.versions(name) if v.version == version)


def encode(name: str, record: Any, version: int | None = None) -> bytes:
    """Encode ``record`` (a dict) as single-object Avro with the latest ``name`` schema.

    ``version`` picks an older schema version (used to test evolution). A record that
    does not fit the schema raises ``EncodeError``.
    """
    chosen = _version(name, version)
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(chosen.fingerprint)
    try:
        # fastavro's writer alone would truncate a float written to a long and write an
        # int past 32 bits into an int field; its (C) validation refuses both, as the avro
        # package does. Asked for a bool it costs a sixth of raise_errors=True, which builds
        # (and formats) an exception for every union branch that does not match: it is
        # asked again for the message only when the record does not fit.
        if not validate(record, chosen.parsed, raise_errors=False):
            validate(record, chosen.parsed, raise_errors=True)
        fastavro.schemaless_writer(buf, chosen.parsed, record)
    except _ENCODE_ERRORS as exc:
        raise EncodeError(f"{name}: {exc}") from exc
    return buf.getvalue()


def decode(data: bytes | None, name: str) -> dict[str, Any]:
    """Decode single-object Avro bytes into the latest version of record type ``name``.

    Raises ``DecodeError`` with reason ``tombstone`` (a null value), ``undecodable`` (not
    single-object Avro, truncated, corrupt), ``unknown_schema`` (fingerprint not among known
    versions, or another record type) or ``invalid_utf8``.
    """
    writer = _writer_of(data, name)
    reader = schemas.latest(name)
    body = io.BytesIO(cast(bytes, data))
    body.seek(HEADER_LEN)
    try:
        record = fastavro.schemaless_reader(
            body, writer.parsed, None if writer is reader else reader.parsed)
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid_utf8", f"a string field is not UTF-8: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise DecodeError("undecodable", f"corrupt or truncated {name} body: {exc!r}") from exc
    if body.tell() != len(cast(bytes, data)):
        raise DecodeError("undecodable", "trailing bytes after the Avro body")
    return cast(dict[str, Any], record)


def _writer_of(data: bytes | None, name: str) -> schemas.SchemaVersion:
    """The writer schema named by the header of ``data``, a version of ``name``."""
    if data is None:
        raise DecodeError("tombstone", "a null value (tombstone)")
    if len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise DecodeError("undecodable", "not Avro single-object encoding (no C3 01 marker)")
    fingerprint = bytes(data[2:HEADER_LEN])
    known = schemas.by_fingerprint().get(fingerprint)
    if known is None:
        raise DecodeError("unknown_schema", f"writer fingerprint {fingerprint.hex()} is unknown")
    if known.name != name:
        raise DecodeError("unknown_schema", f"expected {name}, got {known.name} v{known.version}")
    return known


# -- the reference codec: the avro package --------------------------------------------------


@cache
def _reference_reader(writer_fp: bytes, reader_name: str) -> avro.io.DatumReader:
    writer = schemas.by_fingerprint()[writer_fp]
    return avro.io.DatumReader(writer.plain, schemas.latest(reader_name).plain)


def encode_reference(name: str, record: Any, version: int | None = None) -> bytes:
    """``encode`` with the avro package's writer: the same bytes, about ten times slower.

    The schema authority's reading of the specification, kept to check ``encode``
    against (tests, ``bench.produce``'s baseline).
    """
    chosen = _version(name, version)
    buf = io.BytesIO()
    buf.write(MAGIC)
    buf.write(chosen.fingerprint)
    try:
        avro.io.DatumWriter(chosen.plain).write(record, avro.io.BinaryEncoder(buf))
    except avro.errors.AvroException as exc:
        raise EncodeError(f"{name}: {exc}") from exc
    return buf.getvalue()


def decode_reference(data: bytes | None, name: str) -> dict[str, Any]:
    """``decode`` with the avro package's reader and its schema resolution rules."""
    writer = _writer_of(data, name)
    body = io.BytesIO(cast(bytes, data)[HEADER_LEN:])
    try:
        record = _reference_reader(writer.fingerprint, name).read(avro.io.BinaryDecoder(body))
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid_utf8", f"a string field is not UTF-8: {exc}") from exc
    except (avro.errors.AvroException, EOFError, ValueError, IndexError, TypeError,
            struct_error) as exc:
        raise DecodeError("undecodable", f"corrupt or truncated {name} body: {exc!r}") from exc
    if body.tell() != len(cast(bytes, data)) - HEADER_LEN:
        raise DecodeError("undecodable", "trailing bytes after the Avro body")
    return cast(dict[str, Any], record)


# Longest decimal integer a JSON raw event may carry: a long has at most 19 digits and a
# sign. Anything longer is refused before Python converts it (past 4,300 digits ``int()``
# raises ValueError, and below that the conversion is quadratic).
MAX_INT_DIGITS = 20

# Values quoted in a DecodeError: a few items, a few levels, so that an event nested 900
# deep or a 1 MiB field never makes a long (or recursive) message.
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = (
    2, 4, 4, 40, 40)


def decode_raw_event(data: bytes | None, max_bytes: int) -> RawEvent:
    """Decode and validate a raw event: single-object Avro, or a UTF-8 JSON object.

    This is the deserialization handler of ``raw-events``: whatever arrives, the result is
    a ``RawEvent`` or a ``DecodeError`` whose reason becomes ``invalid:<reason>``:
    ``tombstone`` (a null value), ``too_large``, ``undecodable``, ``unknown_schema``,
    ``invalid_utf8``, ``invalid_json`` (also an array, or nesting past the parser's limit),
    ``invalid_field`` (also an integer outside the Avro long range, however many digits),
    ``empty_content``.
    """
    if data is None:
        raise DecodeError("tombstone", "the message value is null (a Kafka tombstone)")
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes > {max_bytes}")
    if data[:1] in (b"{", b"["):
        event = _raw_event_from_json(data)
    else:
        event = cast(RawEvent, decode(data, "RawEvent"))
    if not event["content"].strip():
        raise DecodeError("empty_content", "content is empty or only whitespace")
    return event


def _raw_event_from_json(data: bytes) -> RawEvent:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid_utf8", f"JSON is not UTF-8 at byte {exc.start}") from exc
    try:
        obj = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise DecodeError("invalid_json", str(exc)) from exc
    except RecursionError as exc:
        # The C scanner recurses once per [ or {: ~1,000 levels exhaust the stack guard.
        raise DecodeError("invalid_json", "nested too deeply for the JSON parser (a "
                          "RawEvent is one flat object)") from exc
    if isinstance(obj, list):
        raise DecodeError("invalid_json", "a JSON array; raw-events takes one JSON object "
                          "per message")
    if not isinstance(obj, dict):
        raise DecodeError("invalid_json", "expected a JSON object")
    return raw_event_from_mapping(obj)


class _HugeInt:
    """A JSON integer too long for any RawEvent field, kept only as its length."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _bounded_int(text: str) -> int | _HugeInt:
    if len(text) > MAX_INT_DIGITS:
        return _HugeInt(len(text.lstrip("-")))
    return int(text)


def _field(obj: dict[str, Any], key: str, typ: type, default: Any) -> Any:
    value = obj.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, _HugeInt):
        raise DecodeError("invalid_field", f"{key}: {value!r} is outside the Avro long range")
    # bool is an int subclass in Python, but true is no timestamp.
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise DecodeError("invalid_field",
                          f"{key}: expected {typ.__name__}, got {_BRIEF.repr(value)}")
    if isinstance(value, int) and not LONG_MIN <= value <= LONG_MAX:
        raise DecodeError("invalid_field", f"{key}: {value} is outside the Avro long range")
    if isinstance(value, str):
        _check_utf8(value, key)
    return value


def _check_utf8(value: str, key: str) -> None:
    # JSON can carry lone surrogates (\ud800) that no UTF-8 encoder accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DecodeError("invalid_utf8", f"{key}: not encodable as UTF-8 ({exc.reason})") from exc


def raw_event_from_mapping(obj: dict[str, Any]) -> RawEvent:
    """Validate a RawEvent-shaped mapping (parsed JSON); ``kind`` may be in any case.

    Missing ``id`` is empty (derived later from the digest); missing ``timestamp`` is now.
    """
    unknown = set(obj) - set(RawEvent.__annotations__)
    if unknown:
        raise DecodeError("invalid_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    if "content" not in obj:
        raise DecodeError("invalid_field", "content: missing")
    kind = _field(obj, "kind", str, "TEXT").upper()
    if kind not in KINDS:
        raise DecodeError("invalid_field", f"kind: {obj.get('kind')!r} is not CODE or TEXT")
    attributes = _field(obj, "attributes", dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
        raise DecodeError("invalid_field", "attributes: values must be strings")
    for name, value in attributes.items():
        _check_utf8(name, "attributes")
        _check_utf8(value, f"attributes.{name}")
    return RawEvent(
        id=_field(obj, "id", str, ""),
        source=_field(obj, "source", str, ""),
        kind=kind,
        language=_field(obj, "language", str, None),
        label=_field(obj, "label", str, None),
        content=_field(obj, "content", str, ""),
        timestamp=_field(obj, "timestamp", int, int(time.time() * 1000)),
        attributes=attributes,
    )
