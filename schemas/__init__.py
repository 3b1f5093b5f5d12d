"""The Avro schemas of sluice (namespace ``sluice.v1``) and their loader.

Each record type keeps every version it ever had as ``<Name>.v<N>.avsc`` in this folder:
the highest version is the one sluice writes and reads into; older ones stay so that
events written with them still decode (Avro schema resolution).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, cast

import avro.schema
import fastavro

SCHEMA_DIR = Path(__file__).parent
NAMES = (
    "RawEvent",
    "Candidate",
    "CuratedSample",
    "CuratedBatch",
    "Feedback",
    "Rejection",
    "MetricSnapshot",
)

_EMPTY = 0xC15D213AA4D7A795  # CRC-64-AVRO's initial value, from the Avro specification


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin CRC-64 fingerprint the Avro spec defines for single-object encoding."""
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one record type."""

    name: str
    version: int
    schema: avro.schema.RecordSchema
    fingerprint: bytes  # 8 bytes, little-endian, as written after C3 01
    # The same schema without logical-type annotations: sluice handles timestamps as int
    # milliseconds, and the annotations change neither the bytes nor the fingerprint.
    plain: avro.schema.RecordSchema
    # ``plain`` parsed once by fastavro: the codec of the hot paths (``streams.serde``).
    # The avro package above stays the authority for the fingerprint and canonical form.
    parsed: dict[str, Any] = field(repr=False, compare=False)

    @property
    def canonical_form(self) -> str:
        """The Parsing Canonical Form the fingerprint is computed over."""
        return str(self.plain.canonical_form)


def _strip_logical(node: object) -> object:
    if isinstance(node, dict):
        return {k: _strip_logical(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical(item) for item in node]
    return node


def _parse(path: Path) -> SchemaVersion:
    stem = path.name.removesuffix(".avsc")
    name, _, version = stem.rpartition(".v")
    text = path.read_text(encoding="utf-8")
    schema = avro.schema.parse(text)
    plain_json = _strip_logical(json.loads(text))
    plain = avro.schema.parse(json.dumps(plain_json))
    assert isinstance(schema, avro.schema.RecordSchema), path
    assert isinstance(plain, avro.schema.RecordSchema), path
    # The fingerprint is taken over the plain schema's canonical form: the avro package
    # writes an annotated primitive as {"type":"long"}, where the specification (and the
    # Java, Go and Rust libraries) write "long"; only the latter interoperates.
    fingerprint = struct.pack("<Q", crc64_avro(plain.canonical_form.encode("utf-8")))
    # Without logical types fastavro yields timestamps as int milliseconds, as avro does.
    parsed = fastavro.parse_schema(cast(dict[str, Any], plain_json))
    assert isinstance(parsed, dict), path
    return SchemaVersion(name, int(version), schema, fingerprint, plain, parsed)


@cache
def versions(name: str) -> tuple[SchemaVersion, ...]:
    """Every version of ``name``, oldest first."""
    found = sorted((_parse(p) for p in SCHEMA_DIR.glob(f"{name}.v*.avsc")), key=lambda v: v.version)
    if not found:
        raise KeyError(f"no schema named {name} in {SCHEMA_DIR}")
    return tuple(found)


def latest(name: str) -> SchemaVersion:
    """The version sluice writes and resolves into."""
    return versions(name)[-1]


@cache
def by_fingerprint() -> dict[bytes, SchemaVersion]:
    """Every known version of every record type, by its single-object fingerprint."""
    return {v.fingerprint: v for name in NAMES for v in versions(name)}
