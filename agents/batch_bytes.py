"""A batch's byte budget: keep a ``CuratedBatch`` within the broker's message limit.

``fit_samples`` does it: Avro sizes are computed exactly (``sample_bytes``,
``batch_overhead``), and when the samples do not fit, the longest contents are cut (at a
UTF-8 boundary) to one common level, the smallest cut that fits (water filling: short
samples are never touched). Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from agents.compose import batch_id

#: The single-object encoding's header: the 2-byte marker and the 8-byte fingerprint.
AVRO_HEADER_BYTES = 10


def _long_bytes(n: int) -> int:
    """Bytes of an Avro int/long: a zig-zag varint."""
    z = (n << 1) ^ (n >> 63)
    return max(1, (z.bit_length() + 6) // 7)


def _text_bytes(text: str) -> int:
    return _bytes_bytes(len(text.encode("utf-8")))


def _bytes_bytes(n: int) -> int:
    """Bytes of an Avro string or bytes value of ``n`` bytes: length, then the bytes."""
    return _long_bytes(n) + n


def sample_bytes(sample: Mapping[str, Any]) -> int:
    """Exact Avro size of one ``BatchSample`` made from ``sample``.

    id, label, kind (an enum index: 1 byte), source, content, embedding, embedding_dim,
    weight (a double: 8 bytes), replay (1 byte).
    """
    return (_text_bytes(str(sample["id"])) + _text_bytes(str(sample["label"])) + 1
            + _text_bytes(str(sample["source"])) + _text_bytes(str(sample["content"]))
            + _bytes_bytes(len(bytes(sample["embedding"])))
            + _long_bytes(int(sample["embedding_dim"])) + 8 + 1)


def _map_bytes(values: Mapping[str, float]) -> int:
    if not values:
        return 1
    return _long_bytes(len(values)) + sum(_text_bytes(k) + 8 for k in values) + 1


def batch_overhead(*, partition: int, sequence: int, created_at: int, policy: str,
                   class_shares: Mapping[str, float], target_shares: Mapping[str, float],
                   difficulty: Mapping[str, float] | None, samples: int) -> int:
    """Exact Avro size (single-object encoding) of a ``CuratedBatch`` less its samples.

    ``samples`` is how many there will be (the array's count takes a varint).
    """
    digest = "0" * 64
    return (AVRO_HEADER_BYTES + _text_bytes(batch_id(partition, sequence, digest))
            + _long_bytes(partition) + _long_bytes(sequence) + _long_bytes(created_at)
            + _text_bytes(policy)
            + (_long_bytes(samples) + 1 if samples else 1)
            + _map_bytes(class_shares) + _map_bytes(target_shares) + _map_bytes(difficulty or {})
            + _text_bytes(digest))


def kafka_reserve(limit: int, key_bytes: int) -> int:
    """What a Kafka message of at most ``limit`` bytes needs besides its value: the key, the
    record and record-batch framing (under 100 bytes), and gzip's framing of data that does
    not compress (5 bytes per 32 KiB block, at most): a generous bound."""
    return 512 + key_bytes + limit // 1024


def utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding has at most ``max_bytes`` bytes."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max(max_bytes, 0)].decode("utf-8", errors="ignore")


class Fitted(NamedTuple):
    """Samples that fit a byte budget, and which of them were cut or left out."""

    samples: list[dict[str, Any]]
    """The samples, in the order given, contents cut where needed."""
    truncated: list[Mapping[str, Any]]
    """The samples whose content was cut (as given)."""
    dropped: list[Mapping[str, Any]]
    """The samples left out: even with no content at all they would not fit (as given)."""


def _level(sizes: Sequence[int], budget: int) -> int:
    """The largest ``c`` with ``sum(min(s, c)) <= budget`` (0 when even 0 is too much)."""
    low, high = 0, max(sizes, default=0)
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(s, mid) for s in sizes) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def fit_samples(samples: Sequence[Mapping[str, Any]], budget: int) -> Fitted:
    """The samples, their ``BatchSample`` sizes summing to at most ``budget`` bytes.

    Nothing changes when they fit. Otherwise every sample above a common level ``c`` (the
    largest that fits) has its content cut to reach it; a sample that is above ``c`` even
    with an empty content (a huge id or source) is left out, the one with the largest such
    floor first, and the level is found again. Deterministic.
    """
    sizes = [sample_bytes(s) for s in samples]
    floors = [size - _text_bytes(str(s["content"])) + 1 for s, size in zip(samples, sizes,
                                                                          strict=True)]
    kept = list(range(len(samples)))
    dropped: list[int] = []
    level = max(sizes, default=0)
    while kept and sum(sizes[i] for i in kept) > budget:
        level = _level([sizes[i] for i in kept], budget)
        worst = max((i for i in kept if sizes[i] > level), key=lambda i: (floors[i], -i))
        if floors[worst] <= level:
            break
        kept.remove(worst)
        dropped.append(worst)
    out: list[dict[str, Any]] = []
    truncated: list[Mapping[str, Any]] = []
    for i in kept:
        sample = dict(samples[i])
        if sizes[i] > level:
            content = str(sample["content"])
            keep = len(content.encode("utf-8")) - (sizes[i] - level)
            sample["content"] = utf8_prefix(content, keep)
            truncated.append(samples[i])
        out.append(sample)
    return Fitted(out, truncated, [samples[i] for i in sorted(dropped)])
