"""Data parallel under torchrun: 2 CPU processes (gloo), each on its own partitions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sluice.settings import Settings
from streams.serde import decode
from tests.streams.kafka_io import consume_all, create_topic
from tests.trainer.trainer_data import batch_samples, make_batches, produce, stdlib_functions
from trainer.checkpoint import CheckpointStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"),
                    reason="torchrun is not installed")
def test_two_ranks_train_disjoint_partitions_into_one_checkpoint(
    stack: Settings, tmp_path: Path
) -> None:
    steps, partitions = 40, 4
    topic = create_topic(stack, "ddp-batches", partitions)
    feedback = create_topic(stack, "ddp-feedback", 1)
    settings = stack.model_copy(update={"topics": stack.topics.model_copy(
        update={"batches": topic, "feedback": feedback})})
    samples = batch_samples(list(stdlib_functions(scale=0.3)), content_chars=120)
    made = make_batches(samples, 120, 8, partitions, seed=4)
    produce(settings, topic, made)
    ckpt = tmp_path / "checkpoints"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_KAFKA__BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SLUICE_TOPICS__BATCHES": topic,
        "SLUICE_TOPICS__FEEDBACK": feedback,
        "SLUICE_TOPICS__METRICS": create_topic(stack, "ddp-metrics", 1),
        "SLUICE_TRAINER__CHECKPOINT_EVERY": "10",
        "SLUICE_TRAINER__KEEP_CHECKPOINTS": "100",
        "SLUICE_METRICS__TRAINER_PORT": "0",
    }
    done = subprocess.run(
        [str(TORCHRUN if TORCHRUN.exists() else shutil.which("torchrun")), "--standalone",
         "--nproc_per_node", "2", "-m", "sluice.cli", "train", "--max-steps", str(steps),
         "--checkpoint-dir", str(ckpt), "--holdout", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "partitions [0, 2]" in done.stderr and "partitions [1, 3]" in done.stderr

    # One checkpoint for both ranks: every batch behind it once, each partition's prefix.
    manifests = [json.loads((p / "manifest.json").read_text())
                 for p in CheckpointStore(ckpt).checkpoints()]
    final = manifests[-1]
    assert final["step"] == steps and final["world_size"] == 2
    trained = [b for m in manifests for b in m["batches"]]
    assert len(trained) == final["batch_count"] == 2 * steps == len(set(trained))
    offsets = {int(p): o for p, o in final["offsets"].items()}
    assert sum(offsets.values()) == 2 * steps
    for p in range(partitions):
        mine = [b for b in trained if b.startswith(f"{p}-")]
        assert mine == [b["batch_id"] for b in made if b["partition"] == p][: offsets[p]]

    # Each rank sent feedback for its own batches: one per rank per step.
    records = [decode(r.value, "Feedback")
               for r in consume_all(settings, feedback, 2 * steps, timeout_s=20)]
    assert Counter(f["step"] for f in records) == {s: 2 for s in range(1, steps + 1)}
    assert sorted(f["batch_id"] for f in records) == sorted(trained)
