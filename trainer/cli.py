"""``sluice train``: the click command (the lead's ``sluice/cli.py`` adds it to the group)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from schemas.errors import SluiceError
from sluice.settings import Settings, load_settings
from trainer.loop import RunOptions
from trainer.loop import train as run_training


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


@click.command("train")
@click.option("--model", default=None,
              help="embedding-classifier, byte-lm, or module:factory "
                   "[default: the checkpoint's model, else trainer.model]")
@click.option("--max-steps", type=click.IntRange(min=0), default=None,
              help="Stop after this many optimizer steps in total (resumed steps count).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where checkpoints go [default: trainer.checkpoint_dir].")
@click.option("--from-beginning", is_flag=True,
              help="Partitions without a checkpointed offset start at their first batch.")
@click.option("--device", default=None,
              help="auto, cpu, cuda, cuda:N, mps [default: trainer.device].")
@click.option("--eval-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="JSONL evaluation set instead of the hash-held-out slice.")
@click.option("--holdout", type=click.FloatRange(0, 0.5), default=0.05, show_default=True,
              help="Share of sample ids held out (by hash) for evaluation.")
@click.option("--stop-when-idle", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds without a new batch.")
@click.pass_context
def train(
    ctx: click.Context,
    model: str | None,
    max_steps: int | None,
    checkpoint_dir: Path | None,
    from_beginning: bool,
    device: str | None,
    eval_file: Path | None,
    holdout: float,
    stop_when_idle: float | None,
) -> None:
    """Train continuously on curated-batches until stopped (SIGTERM or Ctrl-C).

    Resumes from the newest checkpoint in the checkpoint folder, at the batch after the
    last one it trained. Run under torchrun, each rank reads its own partitions.
    """
    # The settings: ctx.obj under `sluice train`; read here when run alone (python -m).
    settings = ctx.find_object(Settings)
    if settings is None:  # run on its own (python -m trainer): read them here, once
        try:
            settings = load_settings(ctx.find_root().params.get("config"))
        except SluiceError as exc:
            raise click.ClickException(str(exc)) from exc
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    # A service's progress (resumed from …, steps, checkpoints) is what its operator reads.
    logging.getLogger("sluice.trainer").setLevel(logging.INFO)
    options = RunOptions(
        model=model, max_steps=max_steps, checkpoint_dir=checkpoint_dir,
        from_beginning=from_beginning, device=device, holdout_fraction=holdout,
        eval_file=eval_file, idle_timeout_s=stop_when_idle,
    )
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        result = run_training(settings, options, stop)
    except SluiceError as exc:
        raise click.ClickException(str(exc)) from exc
    evaluation = ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items()) or "none"
    click.echo(
        f"{result.stopped} at step {result.step} (from {result.start_step}): "
        f"{result.samples} samples, {result.samples_per_s:.0f} samples/s, "
        f"data-wait {100 * result.data_wait_share:.1f}%, eval {evaluation}, "
        f"checkpoint {result.checkpoint}"
    )
