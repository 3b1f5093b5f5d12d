"""The hot-path codec (fastavro) and the schema authority (the avro package) agree, both ways.

For every schema and every version: the bytes fastavro writes are the bytes avro writes,
for representative records and for records hypothesis draws from the schema itself; each
codec reads the other's bytes into the same value, resolving an older writer version to
the latest reader version by the same rules. And whatever mutated bytes arrive, the
hot-path decoder raises nothing but ``DecodeError``.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from streams.serde import (
    HEADER_LEN,
    DecodeError,
    EncodeError,
    decode,
    decode_reference,
    encode,
    encode_reference,
)
from tests.streams.test_roundtrip import sample_records

VERSIONS = [(v.name, v.version) for name in schemas.NAMES for v in schemas.versions(name)]
IDS = [f"{name}.v{version}" for name, version in VERSIONS]
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1


def _schema_json(name: str, version: int) -> dict[str, Any]:
    """The plain (no logical types) schema of one version, as JSON."""
    found = next(v for v in schemas.versions(name) if v.version == version)
    return json.loads(str(found.plain))


def _strategy(node: Any, named: dict[str, st.SearchStrategy[Any]], namespace: str = ""
              ) -> st.SearchStrategy[Any]:
    """Values of the Avro type ``node`` (JSON), drawn from its whole range."""
    if isinstance(node, list):  # a union
        return st.one_of(*(_strategy(branch, named, namespace) for branch in node))
    if isinstance(node, str):
        primitives: dict[str, st.SearchStrategy[Any]] = {
            "null": st.none(), "boolean": st.booleans(),
            "int": st.integers(INT_MIN, INT_MAX), "long": st.integers(LONG_MIN, LONG_MAX),
            "float": st.floats(width=32), "double": st.floats(),
            "bytes": st.binary(max_size=64),
            "string": st.text(st.characters(codec="utf-8"), max_size=24),
        }
        if node in primitives:
            return primitives[node]
        full = node if "." in node else f"{namespace}.{node}"
        return named[full]
    kind = node["type"]
    if kind in ("record", "enum", "fixed"):
        space = node.get("namespace", namespace)
        full = node["name"] if "." in node["name"] else f"{space}.{node['name']}"
        if kind == "enum":
            named[full] = st.sampled_from(node["symbols"])
        else:
            named[full] = st.fixed_dictionaries(
                {f["name"]: _strategy(f["type"], named, space) for f in node["fields"]})
        return named[full]
    if kind == "array":
        return st.lists(_strategy(node["items"], named, namespace), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8),
                               _strategy(node["values"], named, namespace), max_size=3)
    return _strategy(kind, named, namespace)  # {"type": "long"} and the like


def _records(name: str, version: int) -> st.SearchStrategy[dict[str, Any]]:
    schema = _schema_json(name, version)
    return _strategy(schema, {}, schema.get("namespace", ""))


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (a NaN must survive both codecs as a NaN)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _check_both_ways(name: str, version: int, record: dict[str, Any]) -> dict[str, Any]:
    """Same bytes from both writers; each reader reads them into the same value."""
    fast, reference = encode(name, record, version), encode_reference(name, record, version)
    assert fast == reference
    read_fast, read_reference = decode(reference, name), decode_reference(fast, name)
    assert _same(read_fast, read_reference), (read_fast, read_reference)
    return read_fast


def _project(record: dict[str, Any], name: str, version: int) -> dict[str, Any]:
    """``record`` cut to the fields of an older version (what an old writer had)."""
    fields = [f["name"] for f in _schema_json(name, version)["fields"]]
    return {f: record[f] for f in fields}


def _representative() -> list[tuple[str, int, dict[str, Any]]]:
    cases = []
    for name, records in sample_records().items():
        for v in schemas.versions(name):
            cases += [(name, v.version, _project(r, name, v.version)) for r in records]
    return cases


@pytest.mark.parametrize(("name", "version", "record"), _representative())
def test_representative_records_are_the_same_bytes_both_ways(
        name: str, version: int, record: dict[str, Any]) -> None:
    decoded = _check_both_ways(name, version, record)
    if version == schemas.latest(name).version:
        assert _same(decoded, record)


@pytest.mark.parametrize(("name", "version"), VERSIONS, ids=IDS)
def test_generated_records_are_the_same_bytes_both_ways(name: str, version: int) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_records(name, version))
    def check(record: dict[str, Any]) -> None:
        decoded = _check_both_ways(name, version, record)
        # Every field the writer had comes back as written (resolution only adds fields).
        assert all(_same(decoded[k], v) for k, v in record.items())

    check()


@pytest.mark.parametrize(("name", "added"), [
    ("RawEvent", {"attributes": {}}),
    ("Candidate", {"earlier_digest": None}),
    ("CuratedSample", {"earlier_digest": None}),
])
def test_an_old_version_resolves_to_the_latest_with_its_defaults(
        name: str, added: dict[str, Any]) -> None:
    latest = sample_records()[name][0]
    old = _project(latest, name, 1)
    data = encode(name, old, version=1)
    assert data[2:HEADER_LEN] == schemas.versions(name)[0].fingerprint
    assert data == encode_reference(name, old, version=1)
    assert decode(data, name) == decode_reference(data, name) == {**old, **added}


@pytest.mark.parametrize("change", [
    {"timestamp": 1.5},               # a float where a long goes: fastavro alone truncates
    {"timestamp": 2**63},             # past the long range
    {"id": 7},                        # a number where a string goes
    {"kind": "IMAGE"},                # not an enum symbol
    {"language": 3},                  # in no branch of the union
    {"attributes": {"n": 1}},         # a map value of the wrong type
    {"content": "lone \ud800"},       # no UTF-8 for a lone surrogate
], ids=["float-long", "long-overflow", "int-string", "bad-enum", "bad-union", "bad-map",
        "surrogate"])
def test_a_record_that_does_not_fit_is_an_encode_error(change: dict[str, Any]) -> None:
    record = {**sample_records()["RawEvent"][0], **change}
    with pytest.raises(EncodeError):
        encode("RawEvent", record)


def test_an_int_field_past_32_bits_is_an_encode_error() -> None:
    record = {**sample_records()["Rejection"][0], "partition": 2**31}
    with pytest.raises(EncodeError):
        encode("Rejection", record)


def test_a_missing_field_without_default_is_an_encode_error() -> None:
    record = dict(sample_records()["CuratedBatch"][0])
    del record["policy"]
    with pytest.raises(EncodeError):
        encode("CuratedBatch", record)


def _mutations(data: bytes, rng: random.Random) -> list[bytes]:
    """Corruptions a broken or hostile producer makes, all behind a valid header."""
    body = bytearray(data)
    out = []
    for _ in range(40):
        flipped = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(HEADER_LEN, len(flipped))] = rng.randrange(256)
        out.append(bytes(flipped))
        cut = rng.randrange(HEADER_LEN, len(body))
        out.append(bytes(body[:cut]))
        out.append(bytes(body[:cut] + bytes(rng.randrange(256) for _ in range(5)) + body[cut:]))
        out.append(bytes(body[:HEADER_LEN]) + rng.randbytes(rng.randrange(1, 64)))
        out.append(bytes(body[:cut] + b"\xff" * rng.randrange(1, 12) + body[cut:]))
    return out


@pytest.mark.parametrize(("name", "version"), VERSIONS, ids=IDS)
def test_mutated_bytes_raise_nothing_but_decode_error(name: str, version: int) -> None:
    rng = random.Random(f"{name}.v{version}")
    reasons: set[str] = set()
    for record in sample_records()[name]:
        for data in _mutations(encode(name, _project(record, name, version), version), rng):
            try:
                decode(data, name)
            except DecodeError as exc:
                assert exc.reason in ("undecodable", "invalid_utf8"), exc
                reasons.add(exc.reason)
    assert "undecodable" in reasons


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VERSIONS), st.binary(max_size=120))
def test_any_body_behind_a_known_header_is_a_record_or_a_decode_error(
        version: tuple[str, int], body: bytes) -> None:
    name, number = version
    found = next(v for v in schemas.versions(name) if v.version == number)
    try:
        decode(b"\xc3\x01" + found.fingerprint + body, name)
    except DecodeError as exc:
        assert exc.reason in ("undecodable", "invalid_utf8")
