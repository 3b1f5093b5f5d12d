"""Follow ``sluice.metrics`` and keep what the dashboard and ``sluice monitor`` show.

``MetricsFeed`` reads the metrics topic with kafka-python in a background thread, without a
consumer group (watching must not disturb anyone): it starts from the last ``lookback_s``
seconds (by timestamp), then follows. It keeps the latest snapshots of every
(component, instance) in a ``MetricsStore``, probes the workers' consumer lag now and then,
and says plainly when the broker is down or nothing has been published yet. ``state()`` is
the JSON-ready picture built by ``sluice.metrics_view.View``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from bisect import insort
from collections import deque
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from schemas.records import MetricSnapshot
from sluice.metrics_view import Key, Sample, View, sample_of
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.lag import group_lag
from streams.serde import DecodeError, decode

log = logging.getLogger(__name__)

# What the feed knows about its source, in increasing order of good news.
DOWN, CONNECTING, NO_TOPIC, WAITING, STALE, LIVE = (
    "down", "connecting", "no_topic", "waiting", "stale", "live")


class MetricsStore:
    """Recent samples per (component, instance), oldest first. Not thread-safe."""

    def __init__(self, keep_s: float = 900.0, max_samples: int = 4096) -> None:
        self.keep_s = keep_s
        self.max_samples = max_samples
        self._samples: dict[Key, list[Sample]] = {}
        self.added = 0

    def add(self, snapshot: MetricSnapshot) -> None:
        """Keep one snapshot (in time order; a repeated timestamp replaces nothing)."""
        sample = sample_of(snapshot)
        samples = self._samples.setdefault((snapshot["component"], snapshot["instance"]), [])
        if samples and samples[-1].t >= sample.t:
            if any(s.t == sample.t for s in samples):
                return  # the same snapshot read twice (a replay of the topic)
            insort(samples, sample, key=lambda s: s.t)
        else:
            samples.append(sample)
        if len(samples) > self.max_samples:
            del samples[: len(samples) - self.max_samples]
        self.added += 1

    def prune(self, now: float) -> None:
        """Forget samples older than ``keep_s``, keeping each instance's latest one: its
        counters are totals that still count toward its component."""
        horizon = now - self.keep_s
        for samples in self._samples.values():
            old = sum(1 for s in samples[:-1] if s.t < horizon)
            if old:
                del samples[:old]

    def histories(self) -> dict[Key, list[Sample]]:
        """A copy the view can read while the store goes on growing."""
        return {key: list(samples) for key, samples in self._samples.items()}


def reachable(bootstrap: str, timeout_s: float = 1.0) -> str | None:
    """None when some bootstrap server accepts a TCP connection, else why none does.

    Checked before building a kafka-python client: one that cannot bootstrap waits its full
    timeout and leaves its I/O thread behind, which a feed retrying for hours cannot afford.
    """
    errors = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                          timeout=timeout_s):
                return None
        except (OSError, ValueError) as exc:
            errors.append(f"{server.strip()}: {exc}")
    return "cannot reach Kafka (" + "; ".join(errors) + ")"


class MetricsFeed:
    """Follows the metrics topic in a daemon thread; ``state()`` is safe from any thread.

    ``lookback_s``: how much history to read at start; ``view``: how it is summarized
    (default: fitted to ``metrics.interval_s``); ``lag_every_s``: how often the workers'
    consumer lag (group ``settings.app_id``) and the broker's health are probed.
    """

    def __init__(self, settings: Settings, *, lookback_s: float = 600.0,
                 view: View | None = None, lag_every_s: float = 5.0,
                 retry_s: float = 2.0) -> None:
        self.settings = settings
        self.topic = settings.topics.metrics
        self.lookback_s = lookback_s
        self.view = view or View.for_interval(settings.metrics.interval_s, span_s=lookback_s)
        self.lag_every_s = lag_every_s
        self.retry_s = retry_s
        self.store = MetricsStore(keep_s=max(lookback_s, self.view.span_s) + self.view.window_s)
        self.undecodable = 0
        self._lag: deque[tuple[float, dict[str, int]]] = deque(
            maxlen=int(self.view.span_s / lag_every_s) + 2)
        self._status = CONNECTING
        self._error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._probed = threading.Event()  # the lag was asked for once (or cannot be)
        self._thread = threading.Thread(target=self._run, name="sluice-metrics-feed",
                                        daemon=True)
        self._cache: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._ends: dict[TopicPartition, int] = {}  # backlog still to read at start

    # --- the public side ----------------------------------------------------------------

    def start(self) -> MetricsFeed:
        """Start following (returns self)."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop following and close the clients."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __enter__(self) -> MetricsFeed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Wait until the history present at start has been read and the lag probed once
        (or the source turned out to be down or empty); False on timeout."""
        deadline = time.monotonic() + timeout_s
        return (self._caught_up.wait(timeout_s)
                and self._probed.wait(max(0.0, deadline - time.monotonic())))

    def state(self, now: float | None = None) -> dict[str, Any]:
        """Status, tables and series as JSON-ready data.

        The view is rebuilt only when a snapshot or a lag probe came in, the status changed,
        or the series grid moved on (every ``view.step_s``); otherwise the last one is
        returned with a fresh clock, so many watchers cost little.
        """
        clock = time.time() if now is None else now
        with self._lock:
            status, error = self._status, self._error
            key = (self.store.added, len(self._lag), self._lag[-1][0] if self._lag else 0.0,
                   status, error, self.view.grid(clock)[-1])
            cached = self._cache
            if cached is None or cached[0] != key:
                cached = None
                histories, lag = self.store.histories(), list(self._lag)
        if cached is None:
            built = self.view.build(histories, clock, lag)
            built.update(error=error,
                         source={"bootstrap": self.settings.bootstrap_servers,
                                 "topic": self.topic, "group": self.settings.app_id},
                         interval_s=self.settings.metrics.interval_s,
                         lookback_s=self.lookback_s)
            with self._lock:
                self._cache = cached = (key, built)
        state = dict(cached[1])
        last = state["last_snapshot"]
        if status == LIVE and (last is None or clock - last / 1000 > self.view.stale_s):
            status = STALE
        state.update(status=status, now=int(clock * 1000), undecodable=self.undecodable)
        return state

    # --- the thread ---------------------------------------------------------------------

    def _set(self, status: str, error: str | None = None) -> None:
        with self._lock:
            self._status, self._error = status, error

    def _run(self) -> None:
        consumer: KafkaConsumer | None = None
        admin: KafkaAdminClient | None = None
        next_probe = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if consumer is None:
                        consumer = self._connect()
                        if consumer is None:
                            self._caught_up.set()  # nothing to read: say so, don't hang
                            self._probed.set()
                            self._stop.wait(self.retry_s)
                            continue
                    self._poll(consumer)
                    if time.monotonic() >= next_probe:
                        next_probe = time.monotonic() + self.lag_every_s
                        admin = self._probe(consumer, admin)
                except Exception as exc:
                    # Watching must outlive any one failure (a broker going away, a client
                    # bug): report it on the page and try again, never die silently.
                    what = str(exc) if isinstance(exc, KafkaError) else repr(exc)
                    if not isinstance(exc, KafkaError):
                        log.exception("metrics feed failed; retrying")
                    self._set(DOWN, f"Kafka at {self.settings.bootstrap_servers} is not "
                                    f"answering: {what}")
                    self._caught_up.set()
                    self._probed.set()
                    self._stop.wait(self.retry_s)
        finally:
            for client in (consumer, admin):
                if client is not None:
                    client.close()

    def _connect(self) -> KafkaConsumer | None:
        """A consumer assigned to the metrics topic, positioned ``lookback_s`` back; None
        (with the status set) when the broker or the topic is not there yet."""
        problem = reachable(self.settings.bootstrap_servers)
        if problem:
            self._set(DOWN, problem)
            return None
        consumer = KafkaConsumer(**kafka_client_options(self.settings.kafka), group_id=None,
                                 enable_auto_commit=False)
        try:
            return self._assign(consumer)
        except BaseException:
            consumer.close()
            raise

    def _assign(self, consumer: KafkaConsumer) -> KafkaConsumer | None:
        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            consumer.close()
            self._set(NO_TOPIC, f"topic {self.topic} does not exist yet")
            return None
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        since = int((time.time() - self.lookback_s) * 1000)
        found = consumer.offsets_for_times({tp: since for tp in tps}, timeout_ms=5000)
        ends = consumer.end_offsets(tps, timeout_ms=5000)
        for tp in tps:
            hit = found.get(tp)
            consumer.seek(tp, hit.offset if hit is not None else ends[tp])
        self._ends = {tp: end for tp, end in ends.items()
                      if end > consumer.position(tp, timeout_ms=5000)}
        if not self._ends:
            self._caught_up.set()
        with self._lock:
            self._status = LIVE if self.store.added else WAITING
            self._error = None
        return consumer

    def _poll(self, consumer: KafkaConsumer) -> None:
        batches = consumer.poll(timeout_ms=500)
        snapshots = []
        for records in batches.values():
            for record in records:
                try:
                    snapshots.append(decode(record.value, "MetricSnapshot"))
                except DecodeError as exc:
                    self.undecodable += 1
                    log.warning("metrics feed: undecodable snapshot at %s[%d]@%d: %s",
                                record.topic, record.partition, record.offset, exc)
        now = time.time()
        with self._lock:
            for snap in snapshots:
                self.store.add(snap)  # type: ignore[arg-type]
            if snapshots:
                self._status, self._error = LIVE, None
            self.store.prune(now)
        if not self._caught_up.is_set():
            self._ends = {tp: end for tp, end in self._ends.items()
                          if consumer.position(tp, timeout_ms=5000) < end}
            if not self._ends:
                self._caught_up.set()

    def _probe(self, consumer: KafkaConsumer, admin: KafkaAdminClient | None
               ) -> KafkaAdminClient:
        """Check the broker still answers (a kafka-python consumer retries silently) and
        record the workers' consumer lag."""
        tps = list(consumer.assignment())
        consumer.end_offsets(tps, timeout_ms=3000)  # raises KafkaTimeoutError when down
        if admin is None:
            admin = KafkaAdminClient(**kafka_client_options(self.settings.kafka))
        topics = set(self.settings.topics.all().values()) - {self.topic}
        try:
            lag: dict[str, int] | None = group_lag(admin, self.settings.app_id, topics)
        except KafkaError as exc:  # coordinator not there yet or moving: lag unknown
            log.debug("metrics feed: lag of group %s: %s", self.settings.app_id, exc)
            lag = None
        with self._lock:
            if self._status == DOWN:
                self._status, self._error = (LIVE if self.store.added else WAITING), None
            if lag is not None:
                self._lag.append((time.time(), lag))
        self._probed.set()
        return admin

