"""``sluice train``: its flags become overrides of the ``trainer`` settings (no Kafka needed).

The loop itself is replaced by a stand-in that records the settings it was handed; the
loop on a real broker is tested in ``tests/trainer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sluice.cli import cli
from trainer.config import TrainerConfig
from trainer.loop import TrainResult


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[TrainerConfig]:
    """The settings each ``sluice train`` passes to the loop (the stand-in's calls)."""
    calls: list[TrainerConfig] = []

    def stand_in(config: TrainerConfig, stop: Any = None) -> TrainResult:
        calls.append(config)
        return TrainResult(3, 0, None, None, "max_steps")

    monkeypatch.setattr("trainer.loop.train", stand_in)
    monkeypatch.setattr("sluice.train._install_stop_handlers", lambda stop: None)
    monkeypatch.chdir(tmp_path)  # no ./sluice.toml
    monkeypatch.delenv("SLUICE_CONFIG", raising=False)
    monkeypatch.setenv("SLUICE_STATE_DIR", str(tmp_path / "state"))
    return calls


def test_without_flags_the_run_is_the_settings(handed: list[TrainerConfig],
                                               tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("max_steps at step 3 (from 0)")
    cfg = handed[0].trainer
    assert cfg.model is None and cfg.model_options == {} and cfg.max_steps is None
    assert cfg.start == "earliest" and cfg.holdout_fraction == 0.05
    assert cfg.metrics_host == "127.0.0.1"
    assert cfg.idle_timeout_s is None and cfg.eval_file is None
    assert cfg.checkpoint_dir == tmp_path / "state" / "checkpoints"


def test_flags_override_their_settings(handed: list[TrainerConfig], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TRAINER__MODEL_OPTIONS", '{"dim": 64, "layers": 1}')
    monkeypatch.setenv("SLUICE_TRAINER__EVAL_EVERY", "7")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("")
    result = CliRunner().invoke(cli, [
        "train", "--model", "byte-lm", "--model-option", "dim=96", "--model-option",
        "name=tiny", "--model-option", "tied=true", "--max-steps", "5", "--start", "latest",
        "--holdout", "0", "--stop-when-idle", "2.5", "--device", "cpu",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--eval-file", str(eval_file),
    ])
    assert result.exit_code == 0, result.output
    cfg = handed[0].trainer
    assert cfg.model == "byte-lm"
    assert cfg.model_options == {"dim": 96, "layers": 1, "name": "tiny", "tied": True}
    assert (cfg.max_steps, cfg.start, cfg.holdout_fraction) == (5, "latest", 0.0)
    assert (cfg.idle_timeout_s, cfg.device, cfg.eval_file) == (2.5, "cpu", eval_file)
    assert cfg.checkpoint_dir == tmp_path / "ckpt"
    assert cfg.eval_every == 7  # what no flag names stays as set


def test_start_takes_only_earliest_or_latest(handed: list[TrainerConfig]) -> None:
    result = CliRunner().invoke(cli, ["train", "--start", "beginning"])
    assert result.exit_code == 2 and "'earliest', 'latest'" in result.output
    assert handed == []


def test_a_model_option_without_a_value_is_a_usage_error(handed: list[TrainerConfig]) -> None:
    result = CliRunner().invoke(cli, ["train", "--model-option", "dim"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    assert handed == []


def test_loss_weights_are_on_unless_switched_off(handed: list[TrainerConfig],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert CliRunner().invoke(cli, ["train"]).exit_code == 0
    assert CliRunner().invoke(cli, ["train", "--no-loss-weights"]).exit_code == 0
    monkeypatch.setenv("SLUICE_TRAINER__LOSS_WEIGHTS", "false")
    assert CliRunner().invoke(cli, ["train", "--loss-weights"]).exit_code == 0
    assert [c.trainer.loss_weights for c in handed] == [True, False, True]
