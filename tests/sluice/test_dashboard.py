"""The web dashboard: its HTTP API and event stream, and the page in a headless Chromium
(charts drawn with data, live updates, no console errors, a clear state when Kafka is down).

The browser is Debian's ``chromium`` driven over the DevTools protocol (``headless.py``);
the page tests are skipped where it is not installed. A screenshot of the live page is
written to the test's ``tmp_path`` and copied to ``/tmp/sluice-dashboard.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sluice.dashboard import BackgroundDashboard, DashboardError
from sluice.metrics_feed import MetricsFeed
from sluice.ports import free_port
from sluice.settings import Settings, load_settings
from tests.sluice.headless import chromium_binary, open_page
from tests.sluice.metrics_data import EXPECTED, history, publish, scenario, snap, with_metrics_topic
from tests.streams.kafka_io import create_topic

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = Path("/tmp/sluice-dashboard.png")
needs_chromium = pytest.mark.skipif(chromium_binary() is None,
                                    reason="chromium not installed (apt-get install chromium)")
CHARTS = ("classes", "throughput", "rejections", "duplicates", "latency", "lag", "training")


@contextmanager
def served(settings: Settings, **feed_options: Any) -> Iterator[str]:
    """The dashboard in this process on a free port, over a started feed; yields its URL."""
    with MetricsFeed(settings, **feed_options) as feed:
        feed.wait_caught_up(20)
        server = BackgroundDashboard(feed, port=free_port()).start()
        try:
            yield server.url
        finally:
            server.close()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return json.load(resp)


def first_event(url: str) -> dict[str, Any]:
    """The first server-sent event's data from ``url``."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        for line in resp:
            if line.startswith(b"data: "):
                return dict(json.loads(line[6:]))
    raise AssertionError("no event")


def down_settings() -> Settings:
    return load_settings(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})


# --- without Kafka --------------------------------------------------------------------

def test_serves_the_page_its_assets_and_a_down_state() -> None:
    with served(down_settings(), retry_s=0.2) as url:
        with urllib.request.urlopen(url + "/", timeout=10) as resp:
            page = resp.read().decode()
        assert "/static/uPlot.iife.min.js" in page and "/static/app.js" in page
        with urllib.request.urlopen(url + "/static/uPlot.iife.min.js", timeout=10) as resp:
            assert b"uPlot 1.6.32" in resp.read(300)
        state = get_json(url + "/api/state")
        assert state["status"] == "down" and "cannot reach Kafka" in state["error"]
        assert first_event(url + "/events")["status"] == "down"


def test_a_taken_port_is_a_clear_error() -> None:
    with MetricsFeed(down_settings(), retry_s=0.2) as feed:
        first = BackgroundDashboard(feed, port=free_port()).start()
        try:
            port = int(first.url.rsplit(":", 1)[1])
            with pytest.raises(DashboardError, match="--port"):
                BackgroundDashboard(feed, port=port).start()
        finally:
            first.close()


def test_command_prints_its_url_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    # Ctrl-C as in a foreground terminal: a suite started in the background by a
    # non-interactive shell inherits SIGINT ignored, and so would the command.
    script = ("import signal, sys, click\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "from sluice.dashboard import dashboard\n"
              "from sluice.settings import load_settings\n"
              "cli = click.Group(commands={'dashboard': dashboard})\n"
              "cli(['dashboard', '--port', sys.argv[2]], obj=load_settings(\n"
              "    kafka={'bootstrap_servers': sys.argv[1]}))\n")
    # stderr to a file (a pipe nobody reads could fill and block the process); with the
    # fault handler on, SIGABRT makes a process that does not stop print every thread.
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, f"127.0.0.1:{free_port()}",
                                 str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the command printed nothing in 30 s"
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}"
        assert get_json(url + "/api/state")["status"] in ("down", "connecting")
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=10)
            pytest.fail("sluice dashboard did not stop within 15 s of Ctrl-C; its stderr "
                        f"and threads:\n{errors.read_text()[-6000:]}")
        assert code == 0, errors.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Ctrl-C stops" in errors.read_text()


@needs_chromium
def test_page_says_when_kafka_is_down(tmp_path: Path) -> None:
    async def look(url: str) -> tuple[str, str, list[str]]:
        async with open_page(tmp_path / "profile") as page:
            await page.call("Page.navigate", url=url)
            await page.wait_for("window.sluice && sluice.updates > 0", 15)
            banner = await page.evaluate("document.getElementById('banner').innerText")
            pill = await page.evaluate("document.getElementById('status').innerText")
            return banner, pill, page.errors

    with served(down_settings(), retry_s=0.2) as url:
        banner, pill, errors = asyncio.run(look(url))
    assert pill.strip() == "Kafka down"
    assert "Kafka is unreachable" in banner and "sluice up" in banner
    assert errors == []


# --- with the stack -------------------------------------------------------------------

@pytest.mark.integration
def test_api_state_reflects_published_snapshots(stack: Settings) -> None:
    topic = create_topic(stack, "metrics")
    settings = with_metrics_topic(stack, topic)
    publish(settings, topic, scenario(time.time()))
    with served(settings) as url:
        state = get_json(url + "/api/state")
        event = first_event(url + "/events")
    assert state["status"] == "live" and state["source"]["topic"] == topic
    stages = {row["component"]: row for row in state["stages"]}
    for comp in ("ingest", "dedup", "balance"):
        for key, value in EXPECTED[comp].items():
            assert stages[comp][key] == pytest.approx(value, rel=0.02), (comp, key)
    assert state["duplicates"]["rate"] == pytest.approx(EXPECTED["duplicate_rate"], rel=1e-3)
    classes = {c["label"]: (c["raw"], c["curated"]) for c in state["classes"]}
    assert classes == {"docs": (0.25, 0.5), "python": (0.75, 0.5)}
    assert state["trainer"]["step"] == 30 and state["trainer"]["loss"] == 1.2
    def counts(s: dict) -> list:
        return [(r["component"], r["in"], r["out"], r["rejected"]) for r in s["stages"]]

    assert counts(event) == counts(state)   # the stream carries the same state


@pytest.mark.integration
@needs_chromium
def test_page_charts_live_data(stack: Settings, tmp_path: Path) -> None:
    topic = create_topic(stack, "metrics")
    settings = with_metrics_topic(stack, topic)
    publish(settings, topic, history(time.time(), minutes=5))

    async def drive(url: str) -> dict[str, Any]:
        async with open_page(tmp_path / "profile", width=1440, height=900) as page:
            await page.call("Page.navigate", url=url)
            ready = await page.wait_for(
                "window.sluice && Object.keys(sluice.charts).length === 7 && "
                "Object.values(sluice.charts).every(c => c.points > 0)", 20)
            points = await page.evaluate(
                "Object.fromEntries(Object.entries(sluice.charts).map(([k, c]) => [k, c.points]))")
            canvases = await page.evaluate("document.querySelectorAll('.uplot canvas').length")
            empty = await page.evaluate(
                "[...document.querySelectorAll('.empty')].filter(e => !e.hidden).length")
            before = await page.evaluate("sluice.updates")
            # New snapshots arrive: the page shows them without a reload.
            now = time.time()
            await asyncio.to_thread(publish, settings, topic, [
                snap("trainer", "gpu:201", now, {"samples": 999_999},
                     {"step": 4242.0, "loss": 0.4321, "accuracy": 0.875})])
            began = time.monotonic()
            step = await page.wait_for(
                "document.getElementById('kpi-step').textContent === 'step 4,242' && "
                "document.getElementById('kpi-step').textContent", 10)
            waited = time.monotonic() - began
            await asyncio.sleep(1.0)  # let the charts settle for the picture
            shot = tmp_path / "sluice-dashboard.png"
            await page.screenshot(shot)
            shutil.copy(shot, SCREENSHOT)
            return {"ready": ready, "points": points, "canvases": canvases, "empty": empty,
                    "before": before, "after": await page.evaluate("sluice.updates"),
                    "step": step, "waited": waited,
                    "status": await page.evaluate("sluice.state.status"),
                    "stage_rows": await page.evaluate(
                        "document.querySelectorAll('#stages tbody tr').length"),
                    "errors": page.errors}

    with served(settings) as url:
        seen = asyncio.run(drive(url))
    assert seen["ready"], seen["points"]
    assert set(seen["points"]) == set(CHARTS)
    assert all(n > 0 for n in seen["points"].values()), seen["points"]
    assert seen["canvases"] >= len(CHARTS) and seen["empty"] == 0
    assert seen["status"] == "live" and seen["stage_rows"] == 4
    assert seen["step"] == "step 4,242", f"no update within 10 s ({seen['step']})"
    assert seen["after"] > seen["before"]
    assert seen["errors"] == []
    assert SCREENSHOT.stat().st_size > 50_000


# --- the Grafana dashboard ------------------------------------------------------------

def test_grafana_dashboard_queries_metrics_that_exist() -> None:
    """Every metric a panel queries is one the workers' or the trainer's /metrics renders."""
    from prometheus_client import CollectorRegistry, generate_latest

    from streams.metrics import SnapshotCollector
    from trainer.metrics import prometheus_name

    snapshots = history(time.time(), minutes=0.5)
    for s in snapshots:  # the few names the history leaves out
        if s["component"] == "balance":
            s["counters"]["evicted.python"] = 3
            s["counters"]["unused_evicted.python"] = 2
            s["gauges"].update({"weight.python": 1.5, "difficulty.python": 1.1,
                                "share.ema.python": 0.5})
        if s["component"] in ("ingest", "dedup"):
            s["gauges"]["seconds.embed"] = 0.5
            s["gauges"]["busy_s"] = 0.7
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshots))
    exposed = {line.split("{")[0].split(" ")[0]
               for line in generate_latest(registry).decode().splitlines()
               if line and not line.startswith("#")}
    trainer = next(s for s in snapshots if s["component"] == "trainer")
    exposed |= {prometheus_name(n) for n in trainer["gauges"]}
    exposed |= {prometheus_name(n) + "_total" for n in trainer["counters"]}
    exposed.add("up")  # Prometheus's own

    board = json.loads((REPO / "infra/grafana/dashboards/sluice.json").read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert board["uid"] == "sluice" and len(panels) >= 15
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    queried = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus"   # provisioning's datasource
        for t in panel["targets"]:
            queried |= set(re.findall(r"\b(sluice_[a-z0-9_]+|up)\b(?=[{\[)\s])", t["expr"]))
    assert "sluice_events_in_total" in queried and "sluice_trainer_loss" in queried
    assert queried <= exposed, queried - exposed
