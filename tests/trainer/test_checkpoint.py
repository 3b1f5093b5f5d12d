"""Checkpoints: atomic under SIGKILL, verified on load, pruned, loadable with weights_only."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.checkpoint import GENESIS, CheckpointStore, Lineage, chain_hash
from trainer.config import TrainerSettings
from trainer.errors import CheckpointError
from trainer.loop import configure_optimizer
from trainer.models import EmbeddingClassifier, load_plugin

REPO = Path(__file__).resolve().parents[2]


def _state(step: int) -> dict[str, object]:
    return {"step": step, "weights": torch.full((256, 256), float(step))}


def test_a_trainer_state_loads_back_with_weights_only(tmp_path: Path) -> None:
    plugin = EmbeddingClassifier(hidden=16)
    plugin.add_labels(["code", "text"], None)
    optimizer = configure_optimizer(plugin.module, TrainerSettings(), torch.device("cpu"))
    out = plugin.forward(
        plugin.collate("b", [{"id": "i", "label": "code", "kind": "CODE", "source": "s",
                              "content": "x", "embedding": bytes(768), "embedding_dim": 384,
                              "weight": 1.0, "replay": False}]),
        torch.device("cpu"),
    )
    F.cross_entropy(out.logits, out.targets).backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {
        "step": 7,
        "model": {"spec": "embedding-classifier", "name": plugin.name,
                  "config": plugin.config(), **plugin.state_dict()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "schedule": {"kind": "cosine", "lr": 1e-3}, "source": {"topic": "t", "offsets": {0: 5}},
        "lineage": Lineage().state(), "rng": torch.get_rng_state(),
    }
    store = CheckpointStore(tmp_path, keep=2)
    store.save(7, state, {"batches": []})

    loaded = store.load_latest()  # torch.load(..., weights_only=True) inside

    assert loaded is not None and loaded.step == 7
    assert loaded.state["source"]["offsets"] == {0: 5}
    clone = load_plugin(loaded.state["model"]["spec"], loaded.state["model"]["config"])
    clone.load_state_dict(loaded.state["model"])
    assert clone.labels == ["code", "text"]
    fresh = configure_optimizer(clone.module, TrainerSettings(), torch.device("cpu"))
    fresh.load_state_dict(loaded.state["optimizer"])
    assert loaded.manifest["step"] == 7 and len(loaded.manifest["sha256"]) == 64


def test_only_the_newest_k_are_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.save(step, _state(step), {})
    assert [p.name for p in store.checkpoints()] == ["step-000000020", "step-000000030"]


@pytest.mark.parametrize("where", ["inside the state file", "before the rename"])
def test_a_writer_killed_mid_checkpoint_never_leaves_a_corrupt_one(
    tmp_path: Path, where: str
) -> None:
    """SIGKILL the writing process at the worst moments: the newest loadable checkpoint is
    the previous one, intact, and the leftovers are never mistaken for a checkpoint."""
    script = textwrap.dedent(f"""
        import io, os, signal, sys
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(REPO)!r})
        from trainer.checkpoint import CheckpointStore

        store = CheckpointStore(Path({str(tmp_path)!r}), keep=3)
        state = lambda step: {{"step": step, "weights": torch.full((256, 256), float(step))}}
        store.save(1, state(1), {{"batches": ["a"]}})
        if {where!r} == "inside the state file":
            real_save = torch.save
            def dying_save(obj, fh):
                buf = io.BytesIO()
                real_save(obj, buf)
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save = dying_save
        else:
            def dying_rename(self, target):
                os.kill(os.getpid(), signal.SIGKILL)
            Path.rename = dying_rename
        store.save(2, state(2), {{"batches": ["b"]}})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr.decode()

    store = CheckpointStore(tmp_path, keep=3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    loaded = store.load_latest()
    assert loaded is not None and loaded.step == 1
    assert torch.equal(loaded.state["weights"], torch.full((256, 256), 1.0))
    store.save(2, _state(2), {"batches": ["b"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001", "step-000000002"]


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    store.save(1, _state(1), {})
    newest = store.save(2, _state(2), {})
    data = bytearray((newest / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "state.pt").write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="sluice.trainer.checkpoint"):
        loaded = store.load_latest()

    assert loaded is not None and loaded.step == 1
    assert "SHA-256" in caplog.text
    (tmp_path / "step-000000001" / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        store.load_latest()


def test_an_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "absent").load_latest() is None


def test_the_lineage_chain_commits_to_every_batch_in_order() -> None:
    a, b = Lineage(), Lineage()
    a.extend([("p0-0", "d0"), ("p1-0", "d1")])
    b.extend([("p1-0", "d1"), ("p0-0", "d0")])
    assert a.chain != b.chain
    assert a.chain == chain_hash(chain_hash(GENESIS, "p0-0", "d0"), "p1-0", "d1")
    assert a.state() == {"chain": a.chain, "count": 2, "batches": ["p0-0", "p1-0"]}
    a.saved()
    a.add("p2-0", "d2")
    assert a.state()["batches"] == ["p2-0"] and a.count == 3
