"""Producer throughput: small events/s of ``EventProducer`` into a real broker, per Avro codec.

``python -m bench.produce [--quick]``

Small real events (one line of real source code each, ~40-120 bytes of content, a few
attributes) go through sluice's own ``EventProducer`` (the path of ``sluice produce``:
encode, key by id, idempotent acks=all send, flush) into a private embedded Kafka. Two
codecs, in alternating rounds so that a busy machine hurts both alike:

- ``avro``: the avro package's encoder (``streams.serde.encode_reference``), the codec the
  producer used before issue 11 — the baseline;
- ``fastavro``: ``streams.serde.encode``, the producer's codec now.

It reports events/s end to end (first send to the last ack) and of the encoder alone on
the same events, and each ratio to the baseline measured in this run. Goal: >= 10,000
small events/s end to end.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import private_stack, quick_flag, show, source_lines, write_result
from schemas.records import RawEvent

GOAL = 10_000


def small_events(n: int) -> list[RawEvent]:
    """``n`` RawEvents of one real source line each."""
    lines = source_lines(n, seed=7)
    return [{"id": f"line-{i}", "source": "bench:stdlib", "kind": "CODE",
             "language": "python", "label": "python", "content": line,
             "timestamp": 1767225600000 + i, "attributes": {"repo": "cpython", "n": str(i)}}
            for i, line in enumerate(lines)]


def encoders() -> dict[str, Callable[..., bytes]]:
    """The codecs compared, baseline first."""
    from streams.serde import encode, encode_reference

    return {"avro": encode_reference, "fastavro": encode}


def encode_rate(encoder: Callable[..., bytes], events: list[RawEvent]) -> float:
    """Events/s of the encoder alone."""
    started = time.perf_counter()
    for event in events:
        encoder("RawEvent", event)
    return len(events) / (time.perf_counter() - started)


def produce_rate(settings: Any, encoder: Callable[..., bytes],
                 events: list[RawEvent]) -> dict[str, float]:
    """Events/s of ``EventProducer`` with ``encoder``, first send to last ack, on a fresh
    topic (so that no run appends to another's log)."""
    from streams.producer import EventProducer
    from streams.topics import ensure_topics

    topics = settings.topics.model_copy(update={"raw": f"bench-produce-{uuid.uuid4().hex[:8]}"})
    ensure_topics(settings.kafka, topics)
    # The producer's own code path with the codec swapped in: the baseline is the same
    # send path with the encoder sluice used before.
    with mock.patch("streams.producer.encode", encoder), \
            EventProducer(settings.kafka, topics, settings.produce) as producer:
        producer.send(events[0])  # connect and learn the partitions before the clock starts
        producer.flush()
        started = time.perf_counter()
        for event in events[1:]:
            producer.send(event)
        sent = time.perf_counter() - started
        producer.flush()
        acked = time.perf_counter() - started
    n = len(events) - 1
    return {"events_per_s": n / acked, "send_events_per_s": n / sent,
            "bytes_per_event": producer.stats.bytes / producer.stats.events}


def run(quick: bool) -> dict[str, Any]:
    """Both codecs, alternating rounds; writes bench/results/produce[-quick].json."""
    events = small_events(10_000 if quick else 40_000)
    rounds = 2 if quick else 3
    codecs = encoders()
    encode_only: dict[str, list[float]] = {c: [] for c in codecs}
    produced: dict[str, list[dict[str, float]]] = {c: [] for c in codecs}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp, \
            private_stack(Path(tmp) / "stack") as settings:
        for _ in range(rounds):
            for name, encoder in codecs.items():
                encode_only[name].append(encode_rate(encoder, events))
                produced[name].append(produce_rate(settings, encoder, events))
    result: dict[str, Any] = {"events": len(events), "rounds": rounds,
                              "compression": settings.produce.compression,
                              "linger_ms": settings.produce.linger_ms}
    for name in codecs:
        result[name] = {
            "encode_events_per_s": statistics.median(encode_only[name]),
            "events_per_s": statistics.median(r["events_per_s"] for r in produced[name]),
            "send_events_per_s": statistics.median(r["send_events_per_s"]
                                                   for r in produced[name]),
            "bytes_per_event": produced[name][0]["bytes_per_event"],
            "runs": produced[name],
        }
    base = result["avro"]
    for name in codecs:
        result[name]["encode_ratio"] = result[name]["encode_events_per_s"] / base[
            "encode_events_per_s"]
        result[name]["ratio"] = result[name]["events_per_s"] / base["events_per_s"]
    _report(result)
    write_result("produce", quick, result)
    return result


def _report(r: dict[str, Any]) -> None:
    rows = [[name, r[name]["encode_events_per_s"], r[name]["encode_ratio"],
             r[name]["events_per_s"], r[name]["ratio"], r[name]["bytes_per_event"]]
            for name in encoders()]
    show(f"EventProducer, {r['events']:,} small events into the embedded Kafka "
         f"({r['compression']}, linger {r['linger_ms']} ms), median of {r['rounds']} rounds; "
         f"goal >= {GOAL:,} events/s",
         ["codec", "encode events/s", "encode ratio", "produce events/s", "produce ratio",
          "Avro bytes/event"], rows)


def main(argv: list[str] | None = None) -> None:
    run(quick_flag(argv))


if __name__ == "__main__":
    main()
