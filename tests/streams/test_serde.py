"""The wire format, without Kafka: single-object Avro, evolution, JSON raw events, bad input.

The hand-assembled bytes below follow the Avro specification only (no avro package): they
are what a Java, Go or Rust producer writes, so decoding them proves interoperability.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from streams.serde import DecodeError, EncodeError, decode, decode_raw_event, encode

MAX = 1024 * 1024

# The Parsing Canonical Form of RawEvent v2, written out by hand from the specification:
# full names, primitives as plain names (timestamp is "long": logicalType is not kept),
# only name/type/fields/symbols/items/values in that order, no docs or defaults, no spaces.
RAW_EVENT_V2_CANONICAL = (
    '{"name":"sluice.v1.RawEvent","type":"record","fields":['
    '{"name":"id","type":"string"},'
    '{"name":"source","type":"string"},'
    '{"name":"kind","type":{"name":"sluice.v1.Kind","type":"enum","symbols":["CODE","TEXT"]}},'
    '{"name":"language","type":["null","string"]},'
    '{"name":"label","type":["null","string"]},'
    '{"name":"content","type":"string"},'
    '{"name":"timestamp","type":"long"},'
    '{"name":"attributes","type":{"type":"map","values":"string"}}]}'
)

CRC64_EMPTY = 0xC15D213AA4D7A795


def crc64_bitwise(data: bytes) -> int:
    """CRC-64-AVRO one bit at a time (the spec's table version, unrolled): independent of
    ``schemas.crc64_avro``, which uses a lookup table."""
    fp = CRC64_EMPTY
    for byte in data:
        fp ^= byte
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY if fp & 1 else 0)
    return fp


def zigzag_varint(n: int) -> bytes:
    """An Avro int/long: zig-zag, then little-endian base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def avro_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return zigzag_varint(len(data)) + data


def single_object(canonical: str, body: bytes) -> bytes:
    return b"\xc3\x01" + struct.pack("<Q", crc64_bitwise(canonical.encode())) + body


def test_bitwise_crc_agrees_with_an_avro_test_vector() -> None:
    # schema-tests.txt of the Avro project: "long" -> -3434872931120570953
    assert crc64_bitwise(b'"long"') == -3434872931120570953 & 0xFFFF_FFFF_FFFF_FFFF


def test_zigzag_matches_the_spec_table() -> None:
    assert [zigzag_varint(n) for n in (0, -1, 1, -2, 2147483647, -2147483648)] == [
        b"\x00", b"\x01", b"\x02", b"\x03", b"\xfe\xff\xff\xff\x0f", b"\xff\xff\xff\xff\x0f"]


def test_hand_written_canonical_form_is_sluices() -> None:
    latest = schemas.latest("RawEvent")
    assert latest.version == 2
    assert latest.canonical_form == RAW_EVENT_V2_CANONICAL
    assert latest.fingerprint == struct.pack("<Q", crc64_bitwise(RAW_EVENT_V2_CANONICAL.encode()))


def test_bytes_assembled_by_hand_from_the_spec_decode() -> None:
    content = 'fn main() {\n    println!("héllo, wörld ✓");\n}\n'
    body = b"".join([
        avro_string("evt-000042"),                           # id
        avro_string("github.com/acme/widgets/src/main.rs"),  # source
        zigzag_varint(0),                                    # kind: CODE (symbol 0)
        zigzag_varint(1) + avro_string("rust"),              # language: union branch 1
        zigzag_varint(0),                                    # label: union branch 0 (null)
        avro_string(content),                                # content
        zigzag_varint(1767225600123),                        # timestamp (ms)
        # attributes in two blocks, as a streaming writer may send them, then the end block
        zigzag_varint(1) + avro_string("repo") + avro_string("acme/widgets"),
        zigzag_varint(1) + avro_string("license") + avro_string("MIT"),
        zigzag_varint(0),
    ])
    event = decode_raw_event(single_object(RAW_EVENT_V2_CANONICAL, body), MAX)
    assert event == {
        "id": "evt-000042", "source": "github.com/acme/widgets/src/main.rs", "kind": "CODE",
        "language": "rust", "label": None, "content": content, "timestamp": 1767225600123,
        "attributes": {"repo": "acme/widgets", "license": "MIT"},
    }


def test_map_block_with_a_negative_count_and_byte_size_decodes() -> None:
    """The spec lets a writer prefix a map block with -count and its size in bytes."""
    pairs = avro_string("k1") + avro_string("v1") + avro_string("k2") + avro_string("v2")
    body = b"".join([avro_string("n"), avro_string("s"), zigzag_varint(1), zigzag_varint(0),
                     zigzag_varint(0), avro_string("Some text."), zigzag_varint(0),
                     zigzag_varint(-2) + zigzag_varint(len(pairs)) + pairs, zigzag_varint(0)])
    event = decode_raw_event(single_object(RAW_EVENT_V2_CANONICAL, body), MAX)
    assert event["attributes"] == {"k1": "v1", "k2": "v2"}


def test_hand_assembled_bytes_equal_what_sluice_writes() -> None:
    event: dict[str, Any] = {"id": "a", "source": "s", "kind": "TEXT", "language": None,
                             "label": "news", "content": "Hello.", "timestamp": -5,
                             "attributes": {}}
    body = b"".join([avro_string("a"), avro_string("s"), zigzag_varint(1), zigzag_varint(0),
                     zigzag_varint(1) + avro_string("news"), avro_string("Hello."),
                     zigzag_varint(-5), zigzag_varint(0)])
    assert encode("RawEvent", event) == single_object(RAW_EVENT_V2_CANONICAL, body)


# --- evolution --------------------------------------------------------------------------

def test_raw_event_v1_decodes_with_the_latest_reader() -> None:
    v1 = {"id": "old-1", "source": "legacy-producer", "kind": "TEXT", "language": "en",
          "label": "docs", "content": "Written before attributes existed.",
          "timestamp": 1700000000000}
    data = encode("RawEvent", v1, version=1)
    assert data[2:10] == schemas.versions("RawEvent")[0].fingerprint
    assert data[2:10] != schemas.latest("RawEvent").fingerprint
    event = decode_raw_event(data, MAX)
    assert event == {**v1, "attributes": {}}


# --- JSON raw events ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["code", "Code", "CODE", "cOdE"])
def test_json_kind_in_any_letter_case(kind: str) -> None:
    data = json.dumps({"id": "j1", "kind": kind, "content": "x = 1\n"}).encode()
    assert decode_raw_event(data, MAX)["kind"] == "CODE"


def test_json_missing_fields_get_their_defaults() -> None:
    before = int(time.time() * 1000)
    event = decode_raw_event(b'{"content": "Some text about rivers."}', MAX)
    after = int(time.time() * 1000)
    assert event["id"] == ""  # derived later from the content digest
    assert before <= event["timestamp"] <= after
    assert event["kind"] == "TEXT"
    assert (event["source"], event["language"], event["label"], event["attributes"]) == (
        "", None, None, {})


def test_json_full_event_with_attributes() -> None:
    obj = {"id": "j2", "source": "feed://news", "kind": "text", "language": "fr",
           "label": "news", "content": "Bonjour à tous, voici les nouvelles.",
           "timestamp": 1767225600000, "attributes": {"lang_score": "0.98", "feed": "ap"}}
    event = decode_raw_event(json.dumps(obj, ensure_ascii=False).encode(), MAX)
    assert event == {**obj, "kind": "TEXT"}


def test_json_null_optionals_are_none() -> None:
    data = b'{"id": "j3", "content": "body text", "language": null, "label": null}'
    event = decode_raw_event(data, MAX)
    assert event["language"] is None and event["label"] is None


# --- every bad-input class has its own reason -------------------------------------------

def _good_raw_event() -> bytes:
    return encode("RawEvent", {
        "id": "good", "source": "src/app.py", "kind": "CODE", "language": "python",
        "label": "python", "content": "def f(x):\n    return x * 2\n",
        "timestamp": 1767225600000, "attributes": {"repo": "acme/app"}})


def _bad_inputs() -> list[tuple[str, bytes, int, str]]:
    good = _good_raw_event()
    other_type = encode("MetricSnapshot", {
        "component": "ingest", "instance": "host:1", "timestamp": 1, "counters": {},
        "gauges": {}, "labels": {}})
    empty = encode("RawEvent", {
        "id": "e", "source": "s", "kind": "TEXT", "language": None, "label": None,
        "content": " \n\t ", "timestamp": 1, "attributes": {}})
    return [
        ("random bytes", os.urandom(64).replace(b"{", b"(").replace(b"\xc3", b"\x00"),
         MAX, "undecodable"),
        ("too short for a header", b"\xc3\x01\x00", MAX, "undecodable"),
        ("truncated avro", good[:-7], MAX, "undecodable"),
        ("trailing bytes", good + b"\x00\x00", MAX, "undecodable"),
        ("unknown fingerprint", b"\xc3\x01" + b"\x13\x37" * 4 + good[10:], MAX,
         "unknown_schema"),
        ("another record type", other_type, MAX, "unknown_schema"),
        ("avro string not utf-8", good.replace(b"src/app.py", b"src/app\xff\xfe"), MAX,
         "invalid_utf8"),
        ("wrong type in json", b'{"id": 7, "content": "text here"}', MAX, "invalid_field"),
        ("boolean timestamp", b'{"content": "text here", "timestamp": true}', MAX,
         "invalid_field"),
        ("bad kind", b'{"kind": "image", "content": "text here"}', MAX, "invalid_field"),
        ("unknown json field", b'{"content": "text here", "colour": "red"}', MAX,
         "invalid_field"),
        ("missing content", b'{"id": "x"}', MAX, "invalid_field"),
        ("non-string attribute", b'{"content": "text", "attributes": {"n": 3}}', MAX,
         "invalid_field"),
        ("invalid utf-8 in json", b'{"content": "caf\xe9 au lait"}', MAX, "invalid_utf8"),
        ("malformed json", b'{"content": "unterminated', MAX, "invalid_json"),
        ("json that is not an object", b"{}[]", MAX, "invalid_json"),
        ("empty json content", b'{"content": "   "}', MAX, "empty_content"),
        ("empty avro content", empty, MAX, "empty_content"),
        ("empty message", b"", MAX, "undecodable"),
        ("oversized", good, len(good) - 1, "too_large"),
    ]


@pytest.mark.parametrize(("what", "data", "max_bytes", "reason"), _bad_inputs(),
                         ids=[case[0] for case in _bad_inputs()])
def test_bad_input_gets_its_reason(what: str, data: bytes, max_bytes: int, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(data, max_bytes)
    assert caught.value.reason == reason, f"{what}: {caught.value}"
    assert caught.value.detail  # always says more than the reason


def test_every_truncation_is_undecodable() -> None:
    good = _good_raw_event()
    for end in range(len(good)):
        with pytest.raises(DecodeError) as caught:
            decode_raw_event(good[:end], MAX)
        assert caught.value.reason == "undecodable", end


@pytest.mark.parametrize("body", [
    zigzag_varint(-1) + b"abc",            # negative string length
    zigzag_varint(2**62) + b"abc",         # string length far past the end
    b"\xff" * 12,                          # varint that never ends
    avro_string("a") + avro_string("b") + zigzag_varint(7),  # enum index out of range
], ids=["negative-length", "huge-length", "endless-varint", "bad-enum-index"])
def test_corrupt_bodies_are_undecodable(body: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(single_object(RAW_EVENT_V2_CANONICAL, body), MAX)
    assert caught.value.reason == "undecodable"


def test_size_limit_is_inclusive() -> None:
    good = _good_raw_event()
    assert decode_raw_event(good, len(good))["id"] == "good"


def test_decode_of_a_non_raw_type_checks_the_record_type() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(_good_raw_event(), "Candidate")
    assert caught.value.reason == "unknown_schema"
    assert "expected Candidate" in caught.value.detail


def test_encoding_a_record_that_does_not_fit_is_an_encode_error() -> None:
    record: dict[str, Any] = {"id": "x", "kind": "CODE"}  # most fields missing
    with pytest.raises(EncodeError):
        encode("RawEvent", record)


# --- JSON that parses but cannot become Avro --------------------------------------------

@pytest.mark.parametrize("timestamp", [2**63, -(2**63) - 1, 10**20])
def test_json_timestamp_outside_the_long_range_is_invalid(timestamp: int) -> None:
    data = json.dumps({"content": "Some text.", "timestamp": timestamp}).encode()
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(data, MAX)
    assert caught.value.reason == "invalid_field"


@pytest.mark.parametrize("field", ["content", "id", "label"])
def test_json_lone_surrogate_is_invalid(field: str) -> None:
    obj = {"content": "Some text.", field: "bad \\ud800 string"}
    data = json.dumps(obj).replace("\\\\ud800", "\\ud800").encode()
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(data, MAX)
    assert caught.value.reason in ("invalid_utf8", "invalid_field")


# --- poison a foreign producer can send (issue 10, finding 1) ---------------------------
# Each of these escaped decode_raw_event as a TypeError, RecursionError or ValueError, which
# crashed the ingest agent and let Faust ack the whole micro-batch without an outcome.

def _nested(depth: int, where: str = "content") -> bytes:
    return (f'{{"{where}": ' + "[" * depth + "]" * depth + "}").encode()


def test_a_tombstone_is_a_decode_error_of_its_own() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(None, MAX)
    assert caught.value.reason == "tombstone"
    assert "null" in caught.value.detail


@pytest.mark.parametrize("where", ["content", "attributes", "colour"])
@pytest.mark.parametrize("depth", [3000, 100_000])
def test_json_nested_past_the_parser_limit_is_invalid_json(depth: int, where: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(_nested(depth, where), 10 * MAX)
    assert caught.value.reason == "invalid_json"
    assert "nested" in caught.value.detail


def test_json_nested_just_under_the_parser_limit_is_an_invalid_field() -> None:
    """Deep but parseable: the message must still come out short (no deep repr)."""
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(_nested(900), MAX)
    assert caught.value.reason == "invalid_field"
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(("field", "reason"), [
    ("timestamp", "invalid_field"), ("content", "invalid_field"), ("id", "invalid_field"),
    ("colour", "invalid_field")])
@pytest.mark.parametrize("digits", [4301, 5000, 100_000])
def test_json_integer_past_pythons_digit_limit_is_an_invalid_field(
        field: str, reason: str, digits: int) -> None:
    data = b'{"content": "Some text.", "' + field.encode() + b'": ' + b"9" * digits + b"}"
    if field == "content":
        data = b'{"content": ' + b"9" * digits + b"}"
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(data, 10 * MAX)
    assert caught.value.reason == reason
    assert field in caught.value.detail
    assert len(caught.value.detail) < 300


def test_a_json_array_is_invalid_json_that_says_so() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(b'[{"content": "one"}, {"content": "two"}]', MAX)
    assert caught.value.reason == "invalid_json"
    assert "array" in caught.value.detail


@pytest.mark.parametrize("data", [
    b'{"content": "x", "timestamp": 1e999}', b'{"content": NaN}', b'{"content": -Infinity}',
    b'{"content": "x", "attributes": {"k": 1e400}}'])
def test_non_finite_json_numbers_are_invalid_fields(data: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_raw_event(data, MAX)
    assert caught.value.reason == "invalid_field"


_JSON_ATOMS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
_JSON = st.recursive(_JSON_ATOMS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_FIELDS = st.sampled_from(["id", "source", "kind", "language", "label", "content",
                           "timestamp", "attributes", "extra"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.dictionaries(_FIELDS, _JSON, max_size=8).map(
                     lambda d: json.dumps(d).encode()),
                 # a valid event cut anywhere, one random byte appended
                 st.builds(lambda good, cut, flip: bytearray(good[:cut]) + bytes([flip]),
                           st.just(_good_raw_event()), st.integers(0, 120),
                           st.integers(0, 255)).map(bytes)))
def test_decode_raw_event_raises_nothing_but_decode_error(data: bytes) -> None:
    """Whatever the bytes, a RawEvent or a DecodeError with a reason and a detail."""
    try:
        event = decode_raw_event(data, MAX)
    except DecodeError as exc:
        assert exc.reason and exc.detail
    else:
        assert isinstance(event["content"], str) and event["content"].strip()
        encode("RawEvent", event)
