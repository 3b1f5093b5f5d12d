"""``sluice train``: the continuously training consumer, started from the shell.

Every flag overrides one ``trainer.*`` setting for this run (``TrainerSettings`` documents
each and its default); everything else comes from the settings file and ``SLUICE_*``
variables. Under torchrun: ``torchrun --nproc_per_node N -m sluice.cli train ...``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from schemas.errors import SluiceError


def _install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and the first Ctrl-C stop cleanly (final checkpoint); a second Ctrl-C is
    the usual KeyboardInterrupt."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.getLogger("sluice.trainer").info(
            "%s: stopping after this step", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def parse_model_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as factory keywords; a VALUE that parses as JSON is taken as
    JSON (``96``, ``0.1``, ``true``, ``[1, 2]``), any other as a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--model-option")
        try:
            options[key.strip()] = json.loads(text)
        except ValueError:
            options[key.strip()] = text
    return options


@click.command("train")
@click.option("--model", default=None,
              help="embedding-classifier, byte-lm, or module:factory; a checkpoint naming "
                   "another model is refused [default: trainer.model, else the checkpoint's "
                   "built-in model, else embedding-classifier]")
@click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE",
              help="A keyword of the model's factory for a fresh model, VALUE as JSON when "
                   "it parses (repeat for more; added to trainer.model_options).")
@click.option("--max-steps", type=click.IntRange(min=0), default=None,
              help="Stop after this many optimizer steps in total (resumed steps count) "
                   "[default: trainer.max_steps].")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where checkpoints go [default: trainer.checkpoint_dir].")
@click.option("--start", type=click.Choice(["earliest", "latest"]), default=None,
              help="Where a partition this run has no position for starts: the oldest "
                   "retained batch, or only new ones [default: trainer.start, earliest].")
@click.option("--device", default=None,
              help="auto, cpu, cuda, cuda:N, mps [default: trainer.device].")
@click.option("--eval-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="JSONL evaluation set instead of the hash-held-out slice "
                                 "[default: trainer.eval_file].")
@click.option("--holdout", type=click.FloatRange(0, 0.5), default=None,
              help="Share of sample ids held out (by hash) for evaluation "
                   "[default: trainer.holdout_fraction, 0.05].")
@click.option("--stop-when-idle", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds without a new batch "
                   "[default: trainer.idle_timeout_s, never].")
@click.option("--loss-weights/--no-loss-weights", "loss_weights", default=None,
              help="Weight each sample's loss by its importance weight, normalized per "
                   "batch [default: trainer.loss_weights, on].")
@click.pass_context
def train(
    ctx: click.Context,
    model: str | None,
    model_options: tuple[str, ...],
    max_steps: int | None,
    checkpoint_dir: Path | None,
    start: str | None,
    device: str | None,
    eval_file: Path | None,
    holdout: float | None,
    stop_when_idle: float | None,
    loss_weights: bool | None,
) -> None:
    """Train continuously on curated-batches until stopped (SIGTERM or Ctrl-C).

    Resumes from the newest checkpoint in the checkpoint folder, at the batch after the
    last one it trained; a new run starts at the oldest retained batch (--start) and
    records where, so a restart before its first checkpoint begins there. Run under
    torchrun, each rank reads its own partitions.
    """
    from sluice.cli import settings_of
    from trainer.loop import train as run_training

    settings = settings_of(ctx)
    flags: dict[str, Any] = {
        "model": model, "max_steps": max_steps, "checkpoint_dir": checkpoint_dir,
        "start": start, "device": device, "eval_file": eval_file,
        "holdout_fraction": holdout, "idle_timeout_s": stop_when_idle,
        "loss_weights": loss_weights,
    }
    overrides = {name: value for name, value in flags.items() if value is not None}
    if model_options:
        overrides["model_options"] = {**settings.trainer.model_options,
                                      **parse_model_options(model_options)}
    settings = settings.model_copy(
        update={"trainer": settings.trainer.model_copy(update=overrides)}
    )
    # A service's progress (resumed from …, steps, checkpoints) is what its operator reads.
    logging.getLogger("sluice.trainer").setLevel(logging.INFO)
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        result = run_training(settings, stop)
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from exc
    evaluation = ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items()) or "none"
    click.echo(
        f"{result.stopped} at step {result.step} (from {result.start_step}): "
        f"{result.samples} samples, {result.samples_per_s:.0f} samples/s, "
        f"data-wait {100 * result.data_wait_share:.1f}%, eval {evaluation}, "
        f"checkpoint {result.checkpoint}"
    )
