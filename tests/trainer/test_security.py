"""What a checkpoint folder or the network can make the trainer do: nothing but train.

A checkpoint is data, so anyone who can write to the checkpoint folder must not be able to
run code through it: its model spec is only loaded when it is the configured one (the
SHA-256 in the manifest does not help: whoever rewrites the state rewrites the manifest
too), and ``state.pt`` is unpickled with ``weights_only``. The Prometheus endpoint is
unauthenticated, so it listens on loopback unless opened on purpose.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from sluice.settings import load_settings
from trainer.checkpoint import CheckpointStore, Lineage
from trainer.config import TrainerSettings
from trainer.errors import CheckpointError
from trainer.loop import train
from trainer.metrics import TrainerMetrics
from trainer.models import ByteLM, EmbeddingClassifier
from trainer.run_state import build_model


def _checkpoint(folder: Path, spec: str, config: dict[str, Any],
                module: dict[str, Any] | None = None) -> None:
    """A checkpoint whose state and manifest both name ``spec`` (hash and all consistent)."""
    state = {
        "step": 3, "model": {"spec": spec, "name": spec, "config": config,
                             "module": module or {}, "labels": []},
        "optimizer": {}, "scaler": {}, "source": {"topic": "t", "offsets": {0: 3}},
        "lineage": Lineage().state(),
    }
    CheckpointStore(folder).save(3, state, {"model": spec, "batches": []})


def test_a_checkpoint_naming_os_system_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _checkpoint(tmp_path / "ckpt", "os:system", {"command": f"touch {marker}"})
    loaded = CheckpointStore(tmp_path / "ckpt").load_latest()
    assert loaded is not None  # the hash checks out: the attacker wrote both files

    with pytest.raises(CheckpointError) as unset:
        build_model(loaded, TrainerSettings())
    with pytest.raises(CheckpointError) as other:
        build_model(loaded, TrainerSettings(model="byte-lm"))

    assert not marker.exists()
    assert "'os:system'" in str(unset.value) and "trainer.model" in str(unset.value)
    assert "'os:system'" in str(other.value) and "'byte-lm'" in str(other.value)


def test_the_training_loop_refuses_it_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _checkpoint(tmp_path / "ckpt", "os:system", {"command": f"touch {marker}"})
    settings = load_settings(state_dir=str(tmp_path / "state"), trainer={
        "checkpoint_dir": str(tmp_path / "ckpt"), "device": "cpu"})

    with pytest.raises(CheckpointError, match="os:system"):
        train(settings)
    assert not marker.exists()


def test_the_configured_or_a_built_in_model_still_resumes(tmp_path: Path) -> None:
    lm = ByteLM(block_size=16, dim=16, layers=1, heads=2)
    _checkpoint(tmp_path / "lm", "byte-lm", lm.config(), lm.state_dict()["module"])
    loaded = CheckpointStore(tmp_path / "lm").load_latest()
    # The same plugin, named as built in or as its module:factory, either side.
    for configured in (None, "byte-lm", "trainer.models:byte_lm"):
        plugin, spec = build_model(loaded, TrainerSettings(model=configured))
        assert isinstance(plugin, ByteLM) and spec == (configured or "byte-lm")

    clf = EmbeddingClassifier(hidden=8)
    _checkpoint(tmp_path / "clf", "trainer.models:embedding_classifier", clf.config(),
                clf.state_dict()["module"])
    plugin, _ = build_model(CheckpointStore(tmp_path / "clf").load_latest(), TrainerSettings())
    assert isinstance(plugin, EmbeddingClassifier)


class _RunsCode:
    """Pickles as a call to ``os.system``: what a full ``torch.load`` would execute."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def test_state_pt_is_unpickled_with_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    CheckpointStore(tmp_path).save(1, {"step": 1, "payload": _RunsCode(f"touch {marker}")}, {})
    with pytest.raises(CheckpointError, match=r"cannot load state\.pt"):
        CheckpointStore.load(tmp_path / "step-000000001")
    assert not marker.exists()
    # What weights_only guards against: a plain torch.load would have run it.
    torch.load(tmp_path / "step-000000001" / "state.pt", weights_only=False)
    assert marker.exists()


def test_the_metrics_endpoint_listens_on_loopback_unless_opened() -> None:
    assert TrainerSettings().metrics_host == "127.0.0.1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    metrics = TrainerMetrics()
    try:
        assert metrics.serve(port) == port
        assert metrics._server.server_address[0] == "127.0.0.1"
    finally:
        metrics.close()
