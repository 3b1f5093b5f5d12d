"""``sluice monitor``: the frame it draws from a known state, and ``--once`` against the real
metrics topic and against a broker that is not there."""

from __future__ import annotations

import time

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from sluice.metrics_feed import MetricsStore
from sluice.metrics_view import View
from sluice.monitor import monitor, render
from sluice.ports import free_port
from sluice.settings import Settings, load_settings
from tests.sluice.metrics_data import publish, scenario, with_metrics_topic
from tests.streams.kafka_io import create_topic

GROUP = click.Group(commands={"monitor": monitor})

# What the scenario adds up to, as the monitor prints it.
NUMBERS = [
    "750", "650", "100",           # ingest in / out / rejected totals
    "30.0", "26.0",                # ingest events/s in and out
    "12.8",                        # balance samples/s out
    "300",                         # dedup p99 latency
    "2/2",                         # two ingest workers, both reporting
    "exact_duplicate", "semantic_duplicate", "quality:min_chars",
    "13.3 %",                      # duplicates of entering
    "75.0 %", "25.0 %", "50.0 %",  # raw python/docs, curated
    "30", "1.2000", "50.0 %",      # trainer step, loss, accuracy
]


def frame(state: dict) -> str:
    console = Console(width=160, record=True, force_terminal=False)
    console.print(render(state))
    return console.export_text()


def test_frame_of_a_known_state() -> None:
    now = 1_700_000_000.0
    store = MetricsStore()
    for s in scenario(now):
        store.add(s)
    state = View(window_s=30, span_s=60, step_s=5, stale_s=20).build(
        store.histories(), now, lag=[(now, {"raw-events": 12})])
    state.update(status="live", error=None, now=int(now * 1000),
                 source={"bootstrap": "127.0.0.1:9092", "topic": "sluice.metrics",
                         "group": "sluice"})
    text = frame(state)
    for number in NUMBERS:
        assert number in text, number
    assert "consumer lag: raw-events 12" in text
    assert "● live" in text


def test_frame_with_nothing_yet() -> None:
    state = View().build({}, 1_700_000_000.0)
    state.update(status="waiting", error=None, now=1_700_000_000_000,
                 source={"bootstrap": "b:9092", "topic": "sluice.metrics", "group": "g"})
    text = frame(state)
    assert "waiting" in text and "sluice worker" in text
    assert "trainer: no metrics seen" in text


def test_once_when_kafka_is_down() -> None:
    settings = load_settings(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    result = CliRunner().invoke(GROUP, ["monitor", "--once", "--wait", "10"], obj=settings,
                                env={"COLUMNS": "160"})
    assert result.exit_code == 3, result.output
    assert "down" in result.output and "cannot reach Kafka" in result.output
    assert "sluice up" in result.output


@pytest.mark.integration
def test_once_prints_the_numbers(stack: Settings) -> None:
    topic = create_topic(stack, "metrics")
    settings = with_metrics_topic(stack, topic)
    publish(settings, topic, scenario(time.time()))
    began = time.monotonic()
    result = CliRunner().invoke(GROUP, ["monitor", "--once"], obj=settings,
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert time.monotonic() - began < 15
    for number in NUMBERS:
        assert number in result.output, (number, result.output)
    assert "● live" in result.output
