"""The worker: a Faust app with the chosen agents, its metrics timer and ``/metrics``.

The agents are a few lines each (CONVENTIONS §3): the filter agents (ingest, dedup) in
``agents.filter_agents``, the sink agents (balance, feedback) in ``agents.sink_agents``.
The steps hold all the logic; blocking steps run in single-thread executors
(``agents.runner.Runner``) so the event loop keeps heartbeating.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import faust
import redis

from agents.config import AGENTS, Curation
from agents.filter_agents import declare_dedup, declare_ingest
from agents.sink_agents import declare_balance, declare_feedback
from schemas.errors import SluiceError
from streams.app import Topics, create_app
from streams.connections import redis_client
from streams.metrics import SnapshotCollector, StageMetrics


def build_worker(config: Curation, agents: Sequence[str] = AGENTS) -> faust.App:
    """A Faust app with the chosen agents declared on it."""
    unknown = set(agents) - set(AGENTS)
    if unknown:
        raise SluiceError(f"unknown agent(s) {', '.join(sorted(unknown))}; "
                          f"choose from {', '.join(AGENTS)}")
    app, topics = create_app(config.kafka, config.topics, app_id=config.app_id,
                             datadir=config.state_dir / "faust",
                             web_port=config.metrics.worker_web_port,
                             buffer_maxsize=max(config.ingest.batch_size,
                                                config.dedup.batch_size))
    client = redis_client(config.redis)
    metrics: dict[str, StageMetrics] = {}
    for agent in agents:
        metrics[agent] = StageMetrics(agent, max_sources=config.metrics.max_sources,
                                      overflow_source=config.metrics.overflow_source)
        _DECLARE[agent](app, topics, config, client, metrics[agent])

    @app.timer(interval=config.metrics.interval_s)
    async def publish_metrics() -> None:
        for stage_metrics in metrics.values():
            snapshot = stage_metrics.snapshot()
            await topics.metrics.send(key=snapshot["component"].encode(), value=snapshot)

    _expose_prometheus(app, metrics)
    return app


def _expose_prometheus(app: faust.App, metrics: dict[str, StageMetrics]) -> None:
    """``GET /metrics`` on the worker's web server, in Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: [m.snapshot() for m in metrics.values()]))

    @app.page("/metrics")
    async def prometheus_metrics(web: Any, request: Any) -> Any:
        # The content type goes in as a header, whole: prometheus_client's carries a
        # charset, and aiohttp (3.14 on) refuses a charset inside ``content_type=``.
        return web.bytes(generate_latest(registry),
                         headers={"Content-Type": CONTENT_TYPE_LATEST})


_DECLARE: dict[str, Callable[[faust.App, Topics, Curation, redis.Redis, StageMetrics], None]] = {
    "ingest": declare_ingest,
    "dedup": declare_dedup,
    "balance": declare_balance,
    "feedback": declare_feedback,
}
