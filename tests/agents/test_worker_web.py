"""``GET /metrics`` through a real worker's Faust web server (aiohttp underneath).

A worker runs as ``sluice worker`` does, on the session's Kafka and Redis; the answer must
be a 200 in the Prometheus text format that prometheus_client's own parser (and
``promtool check metrics``, where installed) accepts, and it must count the events the
worker processed. The collector's unit tests do not cover this: the response is built by
Faust's ``web.bytes`` over aiohttp, whose rules changed under it (aiohttp 3.14 refuses a
``charset`` inside ``content_type``, and prometheus_client's content type carries one).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sluice.ports import free_port
from sluice.settings import Settings
from tests.agents.pipeline_util import (
    REPO_ROOT,
    _sluice_command,
    corpus,
    isolated,
    produce,
    raw_event,
    unique_id,
    worker_env,
)

pytestmark = pytest.mark.integration

PROMTOOL = shutil.which("promtool")


def _get(url: str) -> tuple[int, str, str]:
    """Status, Content-Type and body of a GET (an HTTP error is an answer too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return (response.status, response.headers.get("Content-Type", ""),
                    response.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode(errors="replace")


def _counter(body: str, name: str, component: str) -> float:
    """The value of counter sample ``name`` of ``component`` (0 when absent)."""
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("component") == component:
                return float(sample.value)
    return 0.0


def _decided(body: str) -> float:
    """Events the ingest stage has passed on or rejected."""
    return (_counter(body, "sluice_events_out_total", "ingest")
            + _counter(body, "sluice_events_rejected_total", "ingest"))


def test_worker_serves_prometheus_metrics(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(stack, dedup={"enabled": False}).model_copy(
        update={"state_dir": tmp_path / "worker"})
    settings.state_dir.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log_path = tmp_path / "worker.log"
    events = [raw_event(f"web-{unique_id()}", snippet.text)
              for snippet in corpus(3)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*_sluice_command(), "worker", "--agents", "ingest", "--loglevel", "info",
             "--web-port", str(port)],
            env=worker_env(settings), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        produce(settings, events)
        answer = (0, "", "")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = _get(url)
            except OSError:  # the web server is not listening yet
                time.sleep(0.5)
                continue
            if answer[0] != 200 or _decided(answer[2]) >= len(events):
                break
            time.sleep(0.5)
        status, content_type, body = answer
        logs = log_path.read_text(errors="replace")[-3000:]
        assert status == 200, f"GET /metrics answered {status}: {body[:500]}\n{logs}"
        assert content_type.startswith("text/plain") and "version=" in content_type
        assert _counter(body, "sluice_events_in_total", "ingest") == len(events), logs
        assert _decided(body) == len(events), logs
        if PROMTOOL:  # Debian's `prometheus` package; its linter is stricter than the parser
            checked = subprocess.run([PROMTOOL, "check", "metrics"], input=body, text=True,
                                     capture_output=True, timeout=30, check=False)
            assert checked.returncode == 0, checked.stdout + checked.stderr + "\n" + body
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
