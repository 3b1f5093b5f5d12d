"""The schema loader: versions, fingerprints, canonical forms, and the TypedDicts in step."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal, get_type_hints

import avro.schema
import pytest

import schemas
from schemas import records

# Test vectors of the Avro project (share/test/data/schema-tests.txt): canonical form and
# CRC-64-AVRO fingerprint as a signed Java long. They pin schemas.crc64_avro to the spec.
AVRO_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"long"', -3434872931120570953),
    ('"string"', -8142146995180207161),
    ('{"name":"x.y.foo","type":"record","fields":[]}', 5916914534497305771),
    ('{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}', -4448647247586288245),
    ('{"type":"map","values":"string"}', -8732877298790414990),
    ('{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},'
     '{"name":"f2","type":"int"}]}', -4860222112080293046),
]


@pytest.mark.parametrize(("canonical", "signed"), AVRO_VECTORS)
def test_crc64_avro_matches_the_avro_test_vectors(canonical: str, signed: int) -> None:
    assert schemas.crc64_avro(canonical.encode()) == signed & 0xFFFF_FFFF_FFFF_FFFF


def test_every_record_type_has_versions_in_the_sluice_namespace() -> None:
    for name in schemas.NAMES:
        found = schemas.versions(name)
        assert [v.version for v in found] == list(range(1, len(found) + 1)), name
        assert schemas.latest(name) is found[-1]
        for v in found:
            assert v.schema.fullname == f"sluice.v1.{name}"
            assert len(v.fingerprint) == 8
    assert [v.version for v in schemas.versions("RawEvent")] == [1, 2]


def test_every_schema_file_is_a_known_version() -> None:
    on_disk = sorted(p.name for p in Path(schemas.SCHEMA_DIR).glob("*.avsc"))
    known = sorted(f"{v.name}.v{v.version}.avsc" for v in schemas.by_fingerprint().values())
    assert on_disk == known


def test_unknown_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="NoSuchRecord"):
        schemas.versions("NoSuchRecord")


def test_fingerprints_are_unique_and_indexed() -> None:
    every = [v for name in schemas.NAMES for v in schemas.versions(name)]
    assert len({v.fingerprint for v in every}) == len(every)
    for v in every:
        assert schemas.by_fingerprint()[v.fingerprint] is v


def test_canonical_form_follows_the_specification() -> None:
    """Primitives as plain names, full names, no docs/defaults/logical types, no spaces."""
    for v in schemas.by_fingerprint().values():
        form = v.canonical_form
        assert form == form.strip() and ", " not in form and ": " not in form
        for word in ('"doc"', '"default"', '"logicalType"', '"namespace"', '{"type":"long"}'):
            assert word not in form, (v.name, v.version, word)
        parsed = json.loads(form)
        assert parsed["name"] == f"sluice.v1.{v.name}"
        assert list(parsed) == ["name", "type", "fields"]  # [ORDER] of the spec
        assert v.fingerprint == schemas.crc64_avro(form.encode()).to_bytes(8, "little")


def test_timestamps_keep_their_logical_type_in_the_full_schema() -> None:
    field = next(f for f in schemas.latest("RawEvent").schema.fields if f.name == "timestamp")
    assert field.type.get_prop("logicalType") == "timestamp-millis"


# --- the TypedDicts of schemas/records.py mirror the latest schemas --------------------

_PRIMITIVES: dict[str, Any] = {
    "string": str, "long": int, "int": int, "double": float, "float": float,
    "boolean": bool, "bytes": bytes,
}


def _python_type(schema: avro.schema.Schema) -> Any:
    """The Python annotation that a field of this (plain) Avro type must have."""
    if isinstance(schema, avro.schema.UnionSchema):
        branches = [_python_type(s) for s in schema.schemas]
        return typing.Union[tuple(branches)]  # noqa: UP007 - built from a list
    if isinstance(schema, avro.schema.EnumSchema):
        return Literal[tuple(schema.symbols)]
    if isinstance(schema, avro.schema.MapSchema):
        return dict[str, _python_type(schema.values)]  # type: ignore[misc]
    if isinstance(schema, avro.schema.ArraySchema):
        return list[_python_type(schema.items)]  # type: ignore[misc]
    if isinstance(schema, avro.schema.RecordSchema):
        return getattr(records, schema.name)
    if schema.type == "null":
        return type(None)
    return _PRIMITIVES[schema.type]


def _check_record(typed: type, schema: avro.schema.RecordSchema) -> None:
    hints = get_type_hints(typed)
    assert list(hints) == [f.name for f in schema.fields], typed.__name__
    for f in schema.fields:
        expected = _python_type(f.type)
        where = f"{typed.__name__}.{f.name}"
        assert hints[f.name] == expected, f"{where}: {hints[f.name]} != {expected}"
        for nested in _nested_records(f.type):
            _check_record(getattr(records, nested.name), nested)


def _nested_records(schema: avro.schema.Schema) -> list[avro.schema.RecordSchema]:
    if isinstance(schema, avro.schema.RecordSchema):
        return [schema]
    if isinstance(schema, avro.schema.ArraySchema):
        return _nested_records(schema.items)
    if isinstance(schema, avro.schema.MapSchema):
        return _nested_records(schema.values)
    if isinstance(schema, avro.schema.UnionSchema):
        return [r for s in schema.schemas for r in _nested_records(s)]
    return []


@pytest.mark.parametrize("name", schemas.NAMES)
def test_typed_dict_has_exactly_the_fields_of_the_latest_schema(name: str) -> None:
    assert records.RECORD_TYPES[name] is getattr(records, name)
    _check_record(records.RECORD_TYPES[name], schemas.latest(name).plain)


def test_record_types_cover_every_schema() -> None:
    assert set(records.RECORD_TYPES) == set(schemas.NAMES)


def test_nested_records_are_checked_too() -> None:
    batch = schemas.latest("CuratedBatch").plain
    assert [r.name for f in batch.fields for r in _nested_records(f.type)] == ["BatchSample"]
    feedback = schemas.latest("Feedback").plain
    assert [r.name for f in feedback.fields for r in _nested_records(f.type)] == ["SampleLoss"]
