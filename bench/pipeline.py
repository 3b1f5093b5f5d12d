"""Pipeline overhead, work avoided, and scale-out, on a private embedded Kafka + Redis.

``python -m bench.pipeline [--quick] [--backend torch|onnx|onnx-int8|static] [--events N]``

Real files with their natural duplicates (Debian copyright files and licenses,
site-packages and stdlib sources) are produced to ``raw-events``; then, measured in one run:

1. In process: the product's own composition, ``agents.pipeline.build_pipeline`` (ingest
   and dedup: validate → exact → fuzzy → semantic), run over micro-batches of
   ``dedup.batch_size`` raw events consumed from Kafka (the size ``sluice dedup`` runs),
   every outcome produced to its topic (``sluice.samples`` or ``sluice.rejected``) with
   ``streams.producer.EventProducer``. The time is broken down by step from
   ``Pipeline.seconds()`` (validate, exact, fuzzy, and the semantic step's embed and
   admit), plus Kafka consume and produce.
2. The bare model on the same texts in the same process: ``Embedder.encode`` over exactly
   the texts the semantic step gave the model, right after each micro-batch (the overhead
   ratio: target ≥ 0.95), and over every event (what the model alone would cost without
   the cheap layers: the work avoided).
3. Not with ``--quick``: real ``sluice worker`` processes (agents ingest,dedup) with 1 and
   2 workers on 4 partitions, end to end: from the first event produced to the last
   outcome on ``sluice.samples`` + ``sluice.rejected``, model loading excluded. They load
   the benchmark's settings through ``sluice.settings.settings_env``. Each stage's busy
   seconds (``sluice_busy_seconds_total`` from every worker's ``/metrics``) show how much
   the ingest and dedup stages of a worker ran at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    REPO_ROOT,
    console,
    crawl_corpus,
    private_stack,
    show,
    timed,
    write_result,
)
from sluice.demo import stop_processes

#: Seconds of the in-process run by part, as the table shows them (disjoint).
PARTS = ("consume", "validate", "exact", "fuzzy", "embed", "admit", "semantic (rest)",
         "produce")


def raw_events(n: int, max_bytes: int) -> list[dict[str, Any]]:
    """``n`` real files as RawEvents (label: where the file comes from)."""
    now = int(time.time() * 1000)
    return [{"id": item_id, "source": item_id.split(":", 1)[0], "kind": kind,
             "language": "python" if kind == "CODE" else "en",
             "label": item_id.split(":", 1)[0], "content": text, "timestamp": now,
             "attributes": {}} for item_id, kind, text in crawl_corpus(n, max_bytes)]


def isolated(settings: Any, backend: str, partitions: int = 4) -> Any:
    """``settings`` with fresh topics, consumer group and Redis namespace."""
    from streams.topics import ensure_topics

    uid = uuid.uuid4().hex[:8]
    names = {role: f"{role}-{uid}" for role in settings.topics.all()}
    out = settings.model_copy(update={
        "app_id": f"bench{uid}",
        "topics": settings.topics.model_copy(update={**names, "partitions": partitions}),
        "redis": settings.redis.model_copy(update={"namespace": uid}),
        "dedup": settings.dedup.model_copy(update={"torch_threads": 1, "backend": backend}),
    })
    ensure_topics(out.kafka, out.topics)
    return out


def produce(settings: Any, events: list[dict[str, Any]]) -> None:
    """Send every event to the raw topic and wait for Kafka's acks."""
    from streams.producer import EventProducer

    with EventProducer(settings.kafka, settings.topics, settings.produce) as producer:
        for event in events:
            producer.send(event)  # type: ignore[arg-type]


class Recording:
    """The loaded model, handed to ``build_pipeline``; remembers the texts of each call so
    the bare model can be timed on exactly those texts outside the pipeline's time."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.embedder.encode(texts)


def in_process(settings: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    """The product's ingest → dedup pipeline over micro-batches consumed from Kafka, each
    outcome produced to its topic, paired with the bare model on the same texts."""
    from kafka import KafkaConsumer

    from agents.embed import Embedder
    from agents.normalize import normalize
    from agents.pipeline import build_pipeline
    from agents.step import Coords, Item
    from streams.connections import kafka_client_options, redis_client
    from streams.producer import EventProducer
    from streams.serde import encode
    from streams.topics import record_type

    client = redis_client(settings.redis)
    embedder = Embedder(settings.dedup, threads=1)
    model = Recording(embedder)
    pipeline = build_pipeline(settings, client, embedder=model)
    t = settings.topics
    size = settings.dedup.batch_size
    consumer = KafkaConsumer(t.raw, **kafka_client_options(settings.kafka), group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             max_poll_records=size)
    producers = {topic: EventProducer(settings.kafka, t, settings.produce, topic=topic)
                 for topic in (t.samples, t.rejected)}
    seconds: defaultdict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    embedded = windows_embedded = 0
    bare = 0.0
    seen = 0
    started = time.perf_counter()
    try:
        while seen < len(events):
            tick = time.perf_counter()
            polled = consumer.poll(timeout_ms=1000, max_records=size)
            seconds["consume"] += time.perf_counter() - tick
            items = [Item(m.value, Coords(m.topic, m.partition, m.offset), m.key)
                     for records in polled.values() for m in records]
            seen += len(items)
            outcomes = pipeline.run(items)
            # The bare model on the same texts right after, paired: a machine shared with
            # other work slows both alike, so the ratio holds where absolute rates do not.
            # Not counted in the pipeline's time.
            pause = time.perf_counter()
            for texts in model.calls:
                _, dt = timed(partial(embedder.encode, texts))
                bare += dt
                embedded += len(texts)
                windows_embedded += sum(len(c) for c in embedder.chunks(texts))
            model.calls.clear()
            started += time.perf_counter() - pause
            counts.update(o.reason or "kept" for o in outcomes)
            tick = time.perf_counter()
            for outcome in outcomes:
                topic = t.rejected if outcome.rejected else t.samples
                producers[topic].send_bytes(outcome.record["id"].encode(),
                                            encode(record_type(t, topic), outcome.record))
            seconds["produce"] += time.perf_counter() - tick
        tick = time.perf_counter()
        for producer in producers.values():
            producer.flush()
        seconds["produce"] += time.perf_counter() - tick
        total = time.perf_counter() - started
    finally:
        consumer.close()
        for producer in producers.values():
            producer.close()
        client.close()
    steps = pipeline.seconds()
    for part in ("validate", "exact", "fuzzy", "embed", "admit"):
        seconds[part] = steps.get(part, 0.0)
    seconds["semantic (rest)"] = max(
        steps.get("semantic", 0.0) - seconds["embed"] - seconds["admit"], 0.0)
    # Without the cheap layers every event would reach the model; its cost scales with
    # the windows embedded, so it is estimated from the paired bare rate.
    windows_all = sum(len(c) for c in embedder.chunks([normalize(e["content"])
                                                        for e in events]))
    return {"events": seen, "embedded": embedded, "seconds_total": total,
            "seconds": {part: seconds[part] for part in PARTS},
            "step_seconds": steps, "outcomes": dict(counts),
            "bare_encode_embedded_s": bare, "windows_all": windows_all,
            "windows_embedded": windows_embedded,
            "bare_encode_all_s_est": bare * windows_all / max(windows_embedded, 1)}


def worker_env(settings: Any) -> dict[str, str]:
    """The environment that makes a ``sluice worker`` load ``settings``: this process's
    without its own SLUICE_* variables, plus ``settings_env``."""
    from sluice.settings import settings_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return env | settings_env(settings)


def outcomes_written(settings: Any) -> int:
    """Messages on the samples and rejected topics (sum of their end offsets)."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.connections import kafka_client_options

    consumer = KafkaConsumer(**kafka_client_options(settings.kafka))
    try:
        parts = [TopicPartition(topic, p) for topic in (settings.topics.samples,
                                                        settings.topics.rejected)
                 for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()


def with_workers(settings: Any, events: list[dict[str, Any]], count: int, folder: Path,
                 timeout_s: float = 900.0) -> dict[str, Any]:
    """End-to-end events/s through ``count`` real ``sluice worker`` processes."""
    from sluice.ports import free_port

    procs = []
    ports = [free_port() for _ in range(count)]
    warmup = [{**events[0], "id": f"warmup-{n}", "content": events[0]["content"] + f"\n# {n}"}
              for n in range(4)]
    try:
        for n in range(count):
            own = settings.model_copy(update={"state_dir": folder / f"w{count}-{n}"})
            own.state_dir.mkdir(parents=True, exist_ok=True)
            log = (folder / f"w{count}-{n}.log").open("wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sluice.cli", "worker", "--agents", "ingest,dedup",
                 "--web-port", str(ports[n])], env=worker_env(own), cwd=REPO_ROOT,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        # Warm-up events go through once every worker has loaded its model and joined.
        produce(settings, warmup)
        deadline = time.monotonic() + timeout_s
        while outcomes_written(settings) < len(warmup):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not start; see {folder}")
            time.sleep(0.5)
        time.sleep(5.0)  # let a second worker's rebalance settle
        busy_before = busy_seconds(ports)
        started = time.perf_counter()
        produce(settings, events)
        target = len(warmup) + len(events)
        done = 0
        while done < target:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done}/{target} outcomes after {timeout_s} s")
            time.sleep(0.25)
            done = outcomes_written(settings)
        elapsed = time.perf_counter() - started
        busy = {stage: s - busy_before.get(stage, 0.0)
                for stage, s in busy_seconds(ports).items()}
    finally:
        stop_processes(procs)
    return {"workers": count, "events": len(events), "seconds": elapsed,
            "events_per_s": len(events) / elapsed, "busy_s": busy,
            # Stage executors busy per worker, on average (0…2 with ingest and dedup):
            # above 1 the stages surely overlapped (ingest lexing while dedup embedded).
            "stages_at_once": sum(busy.values()) / (elapsed * count)}


def busy_seconds(ports: list[int]) -> dict[str, float]:
    """Seconds each stage spent running its steps, summed over the workers' ``/metrics``
    (``sluice_busy_seconds_total``)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    total: dict[str, float] = defaultdict(float)
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "sluice_busy_seconds_total":
                    total[sample.labels["component"]] += sample.value
    return dict(total)


def run(quick: bool, backend: str = "torch", files: int | None = None) -> dict[str, Any]:
    """All parts over ``files`` real files (default 400, 120 quick); writes
    bench/results/pipeline[-<backend>][-<files>][-quick].json (no backend suffix for
    torch, no files suffix for the default)."""
    events = raw_events(files or 120, 2_500) if quick else raw_events(files or 400, 6_000)
    if files and len(events) < files:
        raise SystemExit(f"only {len(events)} files of the crawl corpus here, not {files}")
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp, \
            private_stack(Path(tmp) / "stack") as base:
        settings = isolated(base, backend)
        produce(settings, events)
        result = in_process(settings, events)
        workers = []
        if not quick:
            for count in (1, 2):
                workers.append(with_workers(isolated(base, backend), events, count,
                                            Path(tmp) / "workers"))
    _report(result, workers, backend)
    payload = {"backend": backend, "in_process": result, "workers": workers}
    name = "pipeline" if backend == "torch" else f"pipeline-{backend}"
    write_result(name + (f"-{files}" if files else ""), quick, payload)
    return payload


def _report(r: dict[str, Any], workers: list[dict[str, Any]], backend: str) -> None:
    total = r["seconds_total"]
    rows = [[stage, s, f"{100 * s / total:.1f} %"] for stage, s in
            sorted(r["seconds"].items(), key=lambda kv: -kv[1])]
    other = total - sum(r["seconds"].values())
    rows.append(["other (Python glue)", other, f"{100 * other / total:.1f} %"])
    rows.append(["total", total, "100 %"])
    show(f"where the time goes: {r['events']} real files through build_pipeline "
         f"(ingest,dedup) over Kafka ({backend}, 1 thread)", ["part", "seconds", "share"], rows)
    events, embedded = r["events"], r["embedded"]
    rate = events / total
    all_est = r["bare_encode_all_s_est"]
    show("pipeline vs the bare model, same texts, paired in the same run",
         ["measure", "value"],
         [["events/s through the pipeline (incl. Kafka)", rate],
          ["events reaching the model", f"{embedded} of {events} "
                                        f"({100 * embedded / events:.1f} %)"],
          ["bare encode of those: s (pipeline: s)",
           f"{r['bare_encode_embedded_s']:.1f} ({total:.1f})"],
          ["overhead ratio: bare encode s / pipeline s (target ≥ 0.95)",
           r["bare_encode_embedded_s"] / total],
          ["pipeline time outside the model: s (share)",
           f"{total - r['seconds']['embed']:.2f} "
           f"({100 * (total - r['seconds']['embed']) / total:.1f} %)"],
          ["windows embedded / windows of every event",
           f"{r['windows_embedded']} / {r['windows_all']}"],
          ["model on every event (no cheap layers), est. events/s", events / all_est],
          ["gain from the cheap layers (× events/s)", all_est / total]])
    reasons = Counter(r["outcomes"])
    show("work avoided: where events went",
         ["outcome", "events", "share"],
         [[k, v, f"{100 * v / events:.1f} %"] for k, v in reasons.most_common()])
    if workers:
        base = workers[0]["events_per_s"]
        show("real `sluice worker` processes, end to end (ingest,dedup; 4 partitions)",
             ["workers", "events", "seconds", "events/s", "× 1 worker", "ingest busy",
              "dedup busy", "both stages"],
             [[w["workers"], w["events"], w["seconds"], w["events_per_s"],
               w["events_per_s"] / base, _share(w, "ingest"), _share(w, "dedup"),
               f"{w['stages_at_once']:.2f}"] for w in workers])
        console.print("busy: the share of the wall time (per worker) the stage's executor "
                      "ran its steps; both stages: their sum (above 1 they ran at once)")


def _share(w: dict[str, Any], stage: str) -> str:
    return f"{100 * w['busy_s'].get(stage, 0.0) / (w['seconds'] * w['workers']):.0f} %"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default="torch",
                        choices=["torch", "onnx", "onnx-int8", "static"])
    parser.add_argument("--events", type=int, default=None,
                        help="real files to send (default 400, 120 with --quick): more "
                             "amortize the workers' last partial micro-batches")
    args = parser.parse_args()
    run(args.quick, args.backend, args.events)
