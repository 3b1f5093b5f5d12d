"""The ``sluice`` command line: one group, one small function per command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from agents.config import AGENTS
from schemas.errors import SluiceError
from sluice.settings import Settings, load_settings

# Everything sluice runs is offline: the embedding model comes from a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Commands whose modules import torch or a web server: loaded only when invoked.
LAZY_COMMANDS = {
    "train": ("sluice.train", "train"),
    "dashboard": ("sluice.dashboard", "dashboard"),
    "monitor": ("sluice.monitor", "monitor"),
}


class _Group(click.Group):
    """Loads heavy commands lazily; turns sluice's own errors into one red line and exit
    code 1, not a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            import importlib

            module, attr = LAZY_COMMANDS[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SluiceError as exc:
            click.secho(f"sluice: {exc}", fg="red", err=True)
            sys.exit(1)


def settings_of(ctx: click.Context) -> Settings:
    """The validated settings, read once per invocation (an error names the setting)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = load_settings(root.params.get("config"))
    return root.obj


@click.group(cls=_Group)
@click.option("--config", type=click.Path(dir_okay=False), envvar="SLUICE_CONFIG",
              help="TOML settings file (default: ./sluice.toml if present).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.version_option(package_name="sluice")
def cli(config: str | None, verbose: bool) -> None:
    """sluice: curate a live Kafka stream of code and text into training batches."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--redis-cluster", "masters", type=click.IntRange(1, 16), default=None,
              help="Run Redis as a Redis Cluster of this many masters (3 is usual); "
              "the same as the setting stack.redis_cluster.")
@click.pass_context
def up(ctx: click.Context, masters: int | None) -> None:
    """Start the embedded Kafka broker and Redis (idempotent) and create the topics."""
    import time

    from sluice.stack import Stack, with_redis_cluster

    settings = settings_of(ctx)
    configured = settings.stack.redis_cluster
    if masters is not None:
        settings = with_redis_cluster(settings, masters)
    began = time.monotonic()
    with _spinner("starting Kafka and Redis"):
        started = Stack(settings).up()
    for name, fresh in started.items():
        click.echo(f"{name:6} {'started' if fresh else 'already running'}")
    _print_status(settings)
    click.echo(f"topics: {', '.join(settings.topics.all().values())}")
    if settings.redis.cluster:
        click.echo(f"redis  {settings.redis.url}")
    if masters is not None and masters != configured:
        # Every other command reads the settings afresh: they must name the cluster too.
        click.echo(f"for the other commands set stack.redis_cluster = {masters} in the "
                   f"settings file, or SLUICE_STACK__REDIS_CLUSTER={masters}", err=True)
    click.echo(f"ready in {time.monotonic() - began:.1f} s")


@cli.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop the embedded stack's processes (gracefully, then forcibly)."""
    from sluice.stack import Stack

    for name, was_running in Stack(settings_of(ctx)).down().items():
        click.echo(f"{name:6} {'stopped' if was_running else 'was not running'}")


@cli.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show whether the embedded Kafka and Redis run and answer."""
    settings = settings_of(ctx)
    if not _print_status(settings):
        sys.exit(3)


def _print_status(settings: Settings) -> bool:
    from sluice.stack import Stack

    ok = True
    for comp in Stack(settings).status():
        state = "up" if comp.answering else ("starting" if comp.running else "down")
        ok = ok and comp.answering
        click.echo(f"{comp.name:6} {state:8} {comp.address:22} pid {comp.pid or '-':>7}  "
                   f"log {comp.log}")
    click.echo(f"state  {settings.state_dir}")
    return ok


def _spinner(text: str) -> Any:
    from rich.console import Console

    return Console(stderr=True).status(text)


@cli.command()
@click.pass_context
def topics(ctx: click.Context) -> None:
    """Create sluice's topics on the configured Kafka (what `up` does for the embedded one)."""
    from streams.topics import ensure_topics

    settings = settings_of(ctx)
    created = ensure_topics(settings.kafka, settings.topics)
    for name in settings.topics.all().values():
        click.echo(f"{name:22} {'created' if name in created else 'exists'}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--rate", type=float, default=None, help="At most this many events per second.")
@click.option("--limit", type=int, default=None, help="Stop after this many events.")
@click.option("--label-field", default="label", show_default=True,
              help="JSONL field that holds the class.")
@click.option("--topic", default=None, help="Topic to write (default: topics.raw).")
@click.pass_context
def produce(ctx: click.Context, paths: tuple[Path, ...], rate: float | None, limit: int | None,
            label_field: str, topic: str | None) -> None:
    """Send files, folders (recursively) or JSONL(.gz) files to raw-events."""
    from sluice.produce import produce_paths

    produce_paths(settings_of(ctx), list(paths), rate=rate, limit=limit,
                  label_field=label_field, topic=topic)


@cli.command(name="tail")
@click.argument("topic")
@click.option("-n", "count", type=int, default=None, help="How many messages (default 10).")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest message.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new messages.")
@click.pass_context
def tail_cmd(ctx: click.Context, topic: str, count: int | None, from_beginning: bool,
             follow: bool) -> None:
    """Print a sluice topic as JSON lines (embeddings shown by their size)."""
    from streams.tail import tail

    settings = settings_of(ctx)
    if count is None and not from_beginning:
        count = 10
    try:
        for entry in tail(settings.kafka, settings.topics, topic, count, from_beginning, follow):
            click.echo(json.dumps(entry, ensure_ascii=False))
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option("--agents", "stages", default=",".join(AGENTS),
              show_default=True, help="Comma-separated subset of the agents to run.")
@click.option("--loglevel", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--web-port", type=int, default=None,
              help="Port of the worker's web server (/metrics); default metrics.worker_web_port.")
@click.pass_context
def worker(ctx: click.Context, stages: str, loglevel: str, web_port: int | None) -> None:
    """Run the Faust agents (several workers share the partitions)."""
    from agents.worker import build_worker

    settings = settings_of(ctx)
    if web_port is not None:
        settings = settings.model_copy(update={
            "metrics": settings.metrics.model_copy(update={"worker_web_port": web_port})})
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    from sluice.ports import port_is_free

    if not port_is_free(settings.metrics.worker_web_port):
        raise SluiceError(f"port {settings.metrics.worker_web_port} for the worker's web server "
                          "(/metrics) is taken: pass --web-port N or set "
                          "metrics.worker_web_port (SLUICE_METRICS__WORKER_WEB_PORT)")
    with _spinner("loading the agents (embedding model, indexes)"):
        app = build_worker(settings, chosen)
    click.echo(f"worker: agents {', '.join(chosen)} on {settings.bootstrap_servers}, "
               f"Redis {settings.redis_url}; metrics at "
               f"http://127.0.0.1:{settings.metrics.worker_web_port}/metrics", err=True)
    from faust import Worker

    Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()


@cli.command()
@click.argument("input_path", metavar="INPUT.jsonl[.gz]", type=click.Path(exists=True,
                dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write one decision per input line (JSONL).")
@click.option("--namespace", default=None, help="Index namespace (default dedup.namespace).")
@click.option("--no-semantic", is_flag=True, help="Stop after exact and fuzzy dedup.")
@click.pass_context
def dedup(ctx: click.Context, input_path: Path, out_path: Path, namespace: str | None,
          no_semantic: bool) -> None:
    """Run ingest + dedup over a JSONL file without Kafka (Redis holds the indexes)."""
    from sluice.dedup_file import dedup_file

    dedup_file(settings_of(ctx), input_path, out_path, namespace=namespace,
               semantic=not no_semantic)


@cli.command()
@click.argument("paths", metavar="[FILE.jsonl[.gz]]...", nargs=-1,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--namespace", default=None, help="Index namespace (default redis.namespace).")
@click.option("--no-semantic", is_flag=True, help="Index digests and MinHash only, no model.")
@click.pass_context
def decontaminate(ctx: click.Context, paths: tuple[Path, ...], namespace: str | None,
                  no_semantic: bool) -> None:
    """Load protected documents (JSONL: id, content, kind, language) that no event may copy;
    without FILE, the files of decontaminate.files. Idempotent."""
    from sluice.decontaminate import decontaminate_files

    settings = settings_of(ctx)
    files = paths or tuple(settings.decontaminate.files)
    if not files:
        raise click.UsageError("name a JSONL file, or set decontaminate.files")
    decontaminate_files(settings, files, namespace=namespace, semantic=not no_semantic)


@cli.command()
@click.argument("paths", metavar="CORPUS...", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--limit", type=click.IntRange(10), default=300, show_default=True,
              help="Distinct records sampled from the corpus.")
@click.option("--originals", type=click.IntRange(1), default=60, show_default=True,
              help="Records that get a planted copy of each edit kind.")
@click.option("--max-lost", type=click.FloatRange(0, 1), default=0.005, show_default=True,
              help="Share of distinct records the fuzzy layers together (and the model "
              "apart) may drop beyond near-identical ones.")
@click.option("--no-semantic", is_flag=True, help="Calibrate the fuzzy layers only.")
@click.option("--backends", default="torch,onnx-int8", show_default=True,
              help="Embedding backends compared with torch (comma-separated): onnx, "
              "onnx-int8, static.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("sluice.calibrated.toml"), show_default=True,
              help="Where the chosen settings are written.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def calibrate(ctx: click.Context, paths: tuple[Path, ...], limit: int, originals: int,
              max_lost: float, no_semantic: bool, backends: str, out_path: Path, force: bool,
              seed: int) -> None:
    """Choose each dedup layer's threshold on your own files (planted copies) and write them."""
    from rich.console import Console

    from sluice.calibrate import BACKENDS, write_toml
    from sluice.calibrate import calibrate as run_calibration

    if out_path.exists() and not force:  # before the long part, not after it
        raise SluiceError(f"{out_path} exists: pass --force to overwrite it, or --out another "
                          "file")
    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = set(chosen) - set(BACKENDS)
    if unknown:
        raise SluiceError(f"--backends: unknown {', '.join(sorted(unknown))}; choose from "
                          f"{', '.join(BACKENDS)}")
    result = run_calibration(settings_of(ctx), list(paths), limit=limit, originals=originals,
                             max_lost=max_lost, semantic=False if no_semantic else None,
                             backends=chosen, seed=seed, console=Console(stderr=True))
    written = write_toml(result, out_path, force=force, sources=paths)
    click.echo(f"chosen settings written to {written} (use it with --config, or merge its "
               "sections into your settings file)")


@cli.group()
def shards() -> None:
    """Shard the semantic index by nearest coarse centroid (dedup.shards > 1)."""


@shards.command(name="fit")
@click.argument("paths", metavar="[CORPUS_OR_SAMPLE]...", nargs=-1,
                type=click.Path(exists=True, path_type=Path))
@click.option("--shards", "count", type=click.IntRange(2, 256), default=None,
              help="Shards (centroids) to fit; default dedup.shards.")
@click.option("--from-index", is_flag=True,
              help="Sample the FP32 vectors already admitted instead of embedding files.")
@click.option("--limit", type=click.IntRange(10), default=5000, show_default=True,
              help="Vectors sampled at most.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--namespace", default=None, help="Index namespace (default redis.namespace).")
@click.option("--migrate", "then_migrate", is_flag=True,
              help="Then move the admitted items into the new version at once.")
@click.pass_context
def shards_fit(ctx: click.Context, paths: tuple[Path, ...], count: int | None,
               from_index: bool, limit: int, seed: int, namespace: str | None,
               then_migrate: bool) -> None:
    """Fit coarse centroids (k-means) on an embedded sample and store them as a new version."""
    from rich.console import Console

    from sluice.shards import fit, migrate

    settings = settings_of(ctx)
    count = count or settings.dedup.shards
    if count < 2:
        raise click.UsageError("pass --shards N (N ≥ 2), or set dedup.shards")
    console = Console(stderr=True)
    done = fit(settings, list(paths), shards=count, from_index=from_index, limit=limit,
               seed=seed, namespace=namespace, console=console)
    c = done.centroids
    click.echo(f"centroid version {c.version}: {c.shards} shards of dimension {c.dim} from "
               f"{c.samples:,} vectors ({c.source}); sample per shard "
               f"{min(done.sample_per_shard):,}–{max(done.sample_per_shard):,}")
    if done.active:
        click.echo(f"in use now (the namespace held nothing to move); set dedup.shards = "
                   f"{c.shards}")
    elif then_migrate:
        _print_migration(migrate(settings, namespace=namespace, console=console))
    else:
        click.echo("not in use yet: the namespace holds admitted items; move them with "
                   "`sluice shards migrate`")


@shards.command(name="migrate")
@click.option("--namespace", default=None, help="Index namespace (default redis.namespace).")
@click.option("--keep-old", is_flag=True, help="Leave the old version's keys in place.")
@click.pass_context
def shards_migrate(ctx: click.Context, namespace: str | None, keep_old: bool) -> None:
    """Move the admitted items into the newest centroid version and switch to it."""
    from rich.console import Console

    from sluice.shards import migrate

    _print_migration(migrate(settings_of(ctx), namespace=namespace, keep_old=keep_old,
                             console=Console(stderr=True)))


def _print_migration(done: Any) -> None:
    old = "one set" if done.source is None else f"version {done.source}"
    counts = ", ".join(f"{n:,} {k}" for k, n in sorted(done.counts.items()))
    click.echo(f"moved {old} → version {done.target}: {counts or 'nothing to move'}; "
               f"{'old keys dropped' if done.dropped_old else 'old keys kept'}. Set "
               "dedup.shards to the new version's shard count before restarting workers")


@shards.command(name="status")
@click.option("--namespace", default=None, help="Index namespace (default redis.namespace).")
@click.pass_context
def shards_status(ctx: click.Context, namespace: str | None) -> None:
    """Show the centroid version in use, the newest fitted, and each shard's size and node."""
    from sluice.shards import status as show_status

    show_status(settings_of(ctx), namespace=namespace)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--limit", type=int, default=2000, show_default=True,
              help="Events to produce (0: all).")
@click.option("--idle", "idle_s", type=float, default=300.0, show_default=True,
              help="Stop following when no outcome arrives for this long.")
@click.option("--no-train", is_flag=True, help="Do not start the trainer.")
@click.pass_context
def demo(ctx: click.Context, paths: tuple[Path, ...], limit: int, idle_s: float,
         no_train: bool) -> None:
    """Run the whole pipeline on a real corpus from this machine (or PATHS) and summarize."""
    from rich.console import Console

    from sluice.demo import run_demo

    run_demo(settings_of(ctx), list(paths), limit or None, idle_s, Console(stderr=True),
             train=not no_train)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="sluice")


if __name__ == "__main__":
    main()
