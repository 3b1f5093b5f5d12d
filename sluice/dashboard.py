"""``sluice dashboard``: a live web page over the metrics topic.

An aiohttp server (loopback by default) with one static page (``sluice/static/``: HTML, JS,
CSS and a vendored uPlot; no build step), the state as JSON at ``/api/state``, and the same
state pushed every second as server-sent events at ``/events``, so the page updates without
reloading. The numbers come from ``sluice.metrics_feed.MetricsFeed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import click
from aiohttp import web

from schemas.errors import SluiceError
from sluice.metrics_feed import MetricsFeed

STATIC = Path(__file__).with_name("static")
FEED: web.AppKey[MetricsFeed] = web.AppKey("feed", MetricsFeed)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)
PUSH_EVERY_S: web.AppKey[float] = web.AppKey("push_every_s", float)


class DashboardError(SluiceError):
    """The dashboard cannot serve (port taken, address not available)."""


def create_app(feed: MetricsFeed, push_every_s: float = 1.0) -> web.Application:
    """The dashboard's aiohttp application over a (started) feed."""
    app = web.Application()
    app[FEED] = feed
    app[CLOSING] = asyncio.Event()
    app[PUSH_EVERY_S] = push_every_s
    app.router.add_get("/", _index)
    app.router.add_get("/api/state", _state)
    app.router.add_get("/events", _events)
    app.router.add_static("/static/", STATIC)
    app.on_shutdown.append(_close_streams)
    return app


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _current(request: web.Request) -> str:
    # Building the state takes a few tens of ms: keep it off the event loop.
    feed = request.app[FEED]
    state = await asyncio.get_running_loop().run_in_executor(None, feed.state)
    return json.dumps(state, separators=(",", ":"), allow_nan=False)


async def _state(request: web.Request) -> web.Response:
    return web.Response(text=await _current(request), content_type="application/json",
                        headers={"Cache-Control": "no-cache"})


async def _events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the whole state every ``push_every_s`` until either side closes."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    closing, every = request.app[CLOSING], request.app[PUSH_EVERY_S]
    # A browser reconnects by itself after a drop; tell it to retry soon.
    await response.write(b"retry: 2000\n\n")
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        while not closing.is_set():
            body = await _current(request)
            await response.write(f"data: {body}\n\n".encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), every)
    return response


async def _close_streams(app: web.Application) -> None:
    app[CLOSING].set()  # ends the event streams, so shutting down does not wait on them


def run_dashboard(feed: MetricsFeed, host: str, port: int,
                  on_ready: Callable[[str], None] | None = None,
                  stop: threading.Event | None = None, push_every_s: float = 1.0) -> None:
    """Serve until ``stop`` is set (or Ctrl-C); ``on_ready`` gets the URL once listening.

    ``port`` 0 picks a free port (the URL says which).
    """
    asyncio.run(_serve(feed, host, port, on_ready, stop, push_every_s))


async def _serve(feed: MetricsFeed, host: str, port: int,
                 on_ready: Callable[[str], None] | None, stop: threading.Event | None,
                 push_every_s: float) -> None:
    runner = web.AppRunner(create_app(feed, push_every_s), access_log=None,
                           shutdown_timeout=2.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                                 f"(choose another with --port)") from exc
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        if on_ready is not None:
            on_ready(f"http://{shown}:{bound[1]}")
        while stop is None or not stop.is_set():
            await asyncio.sleep(0.2)
    finally:
        await runner.cleanup()


class BackgroundDashboard:
    """The dashboard served from a thread (for embedding it and for tests)."""

    def __init__(self, feed: MetricsFeed, host: str = "127.0.0.1", port: int = 0,
                 push_every_s: float = 1.0) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.url = ""

        def serve() -> None:
            try:
                run_dashboard(feed, host, port, self._listening, self._stop, push_every_s)
            except BaseException as exc:
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=serve, name="sluice-dashboard", daemon=True)

    def _listening(self, url: str) -> None:
        self.url = url
        self._ready.set()

    def start(self, timeout_s: float = 10.0) -> BackgroundDashboard:
        """Start serving; returns once listening (raises what stopped it otherwise)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise DashboardError(f"dashboard not listening after {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def close(self) -> None:
        """Stop serving and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout=10)


@click.command()
@click.option("--port", type=int, default=None,
              help="Port to listen on (default: metrics.dashboard_port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the page has no login: keep it on loopback).")
@click.pass_context
def dashboard(ctx: click.Context, port: int | None, host: str) -> None:
    """Serve a live web page of the metrics (throughput, rejections, class shares, lag,
    training)."""
    from sluice.cli import settings_of

    settings = settings_of(ctx)
    # The feed shows broker trouble itself; kafka-python's reconnect warnings would only
    # scroll over it.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.secho(f"warning: serving on {host}, reachable from other machines; the page "
                    f"has no authentication", fg="yellow", err=True)

    def ready(url: str) -> None:
        click.echo(url)
        click.echo(f"metrics from {settings.topics.metrics} on {settings.bootstrap_servers}; "
                   f"Ctrl-C stops", err=True)

    with MetricsFeed(settings) as feed, contextlib.suppress(KeyboardInterrupt):
        run_dashboard(feed, host, settings.metrics.dashboard_port if port is None else port,
                      on_ready=ready)
