"""Killing the trainer for real: SIGKILL mid-run resumes exactly; SIGTERM stops cleanly.

The trainer runs as ``python -m sluice.cli train`` (``sluice train``) in a subprocess.
The batches trained are read back two independent ways: the checkpoints' manifests (what
the run committed) and the Feedback records (what each run actually trained, one feedback
topic per run so the two runs cannot be confused).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sluice.settings import Settings
from streams.serde import decode
from tests.streams.kafka_io import consume_all, create_topic
from tests.trainer.trainer_data import batch_samples, make_batches, produce, stdlib_functions
from trainer.checkpoint import GENESIS, CheckpointStore, chain_hash

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _trainer(settings: Settings, feedback: str, ckpt: Path, *args: str,
             checkpoint_every: int = 10) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SLUICE_STATE_DIR": str(ckpt.parent / "state"),
        "SLUICE_KAFKA__BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "SLUICE_TOPICS__BATCHES": settings.topics.batches,
        "SLUICE_TOPICS__FEEDBACK": feedback,
        "SLUICE_TOPICS__METRICS": create_topic(settings, "crash-metrics", 1),
        "SLUICE_TRAINER__CHECKPOINT_EVERY": str(checkpoint_every),
        "SLUICE_TRAINER__KEEP_CHECKPOINTS": "1000",
        "SLUICE_TRAINER__EVAL_EVERY": "100",
        "SLUICE_METRICS__TRAINER_PORT": "0",
        "SLUICE_METRICS__INTERVAL_S": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "train", "--checkpoint-dir", str(ckpt),
         "--holdout", "0", *args],
        cwd=ckpt.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_checkpoint(ckpt: Path, step: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        names = [p.name for p in ckpt.glob("step-*")]
        if any(int(n.split("-")[1]) >= step for n in names):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step {step} in time")


def _feedback_ids(
    settings: Settings, topic: str, expected: int, timeout_s: float = 20
) -> list[tuple[int, str]]:
    records = consume_all(settings, topic, expected, timeout_s=timeout_s)
    return sorted((f["step"], f["batch_id"]) for f in (decode(r.value, "Feedback")
                                                         for r in records))


def _manifests(ckpt: Path) -> list[dict[str, Any]]:
    paths = CheckpointStore(ckpt).checkpoints()
    return [json.loads((p / "manifest.json").read_text()) for p in paths]


@pytest.fixture
def batches(stack: Settings) -> tuple[Settings, list[dict[str, Any]]]:
    settings = stack.model_copy(update={"topics": stack.topics.model_copy(
        update={"batches": create_topic(stack, "crash-batches", 4)})})
    samples = batch_samples(list(stdlib_functions(scale=0.3)), content_chars=120)
    made = make_batches(samples, 320, 8, 4, seed=3)
    produce(settings, settings.topics.batches, made)
    return settings, [dict(b) for b in made]


def test_sigkill_mid_run_resumes_without_gap_or_repeat(
    batches: tuple[Settings, list[dict[str, Any]]], tmp_path: Path
) -> None:
    settings, made = batches
    total = len(made)
    ckpt = tmp_path / "checkpoints"
    fb1 = create_topic(settings, "crash-feedback-1", 1)
    fb2 = create_topic(settings, "crash-feedback-2", 1)

    first = _trainer(settings, fb1, ckpt, "--max-steps", str(total))
    _wait_for_checkpoint(ckpt, 80, first)
    time.sleep(random.uniform(0, 0.05))  # anywhere in a step, or in a checkpoint write
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert first.returncode == -9
    resume_step = int(CheckpointStore(ckpt).checkpoints()[-1].name.split("-")[1])
    assert resume_step < total, "the first run finished before it was killed"

    second = _trainer(settings, fb2, ckpt, "--max-steps", str(total))
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]
    assert f"resumed from {ckpt / f'step-{resume_step:09d}'}, step {resume_step}" in err
    assert "skipping checkpoint" not in err  # no checkpoint was ever half-written
    assert f"max_steps at step {total} (from {resume_step})" in out

    # What run 1 committed up to the resume point, then what run 2 trained after it.
    manifests = _manifests(ckpt)
    committed = [b for m in manifests if m["step"] <= resume_step for b in m["batches"]]
    resumed = _feedback_ids(settings, fb2, total - resume_step)
    assert [s for s, _ in resumed] == list(range(resume_step + 1, total + 1))
    trained = committed + [b for _, b in resumed]

    assert len(trained) == total and len(set(trained)) == total  # no repeat...
    assert set(trained) == {b["batch_id"] for b in made}  # ...and no gap
    for partition in range(4):  # each partition in its offset order
        mine = [b for b in trained if b.startswith(f"{partition}-")]
        assert mine == [b["batch_id"] for b in made if b["partition"] == partition]

    # Run 1's own feedback agrees with its checkpoints up to the resume point.
    # (its last records may have died unsent with it: read what is there)
    before = _feedback_ids(settings, fb1, resume_step, timeout_s=3)
    assert all(committed[s - 1] == b for s, b in before if s <= resume_step)

    # The final manifest's hash chain is the chain over exactly this sequence.
    digest = {b["batch_id"]: b["content_digest"] for b in made}
    chain = GENESIS
    for b in trained:
        chain = chain_hash(chain, b, digest[b])
    assert manifests[-1]["chain"] == chain and manifests[-1]["batch_count"] == total
    assert manifests[-1]["offsets"] == {str(p): total // 4 for p in range(4)}


def test_sigkill_before_the_first_checkpoint_restarts_from_the_start(
    batches: tuple[Settings, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A new trainer starts at the oldest batch waiting (no --start given) and records
    it; killed before any checkpoint, its restart trains every batch once from there."""
    settings, made = batches
    total = len(made)
    ckpt = tmp_path / "checkpoints"
    fb1 = create_topic(settings, "early-feedback-1", 1)
    fb2 = create_topic(settings, "early-feedback-2", 1)

    first = _trainer(settings, fb1, ckpt, checkpoint_every=10_000)
    try:
        assert len(consume_all(settings, fb1, 5, timeout_s=60)) >= 5, "run 1 trained nothing"
    finally:
        first.send_signal(signal.SIGKILL)
        _, err = first.communicate(timeout=30)
    assert first.returncode == -9
    assert CheckpointStore(ckpt).checkpoints() == []
    assert "0@0 (earliest retained)" in err  # it says where it starts
    starts = json.loads((ckpt / "start-rank0.json").read_text())
    assert starts == {"topic": settings.topics.batches,
                      "offsets": {str(p): 0 for p in range(4)}}

    second = _trainer(settings, fb2, ckpt, "--max-steps", str(total))
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-3000:]
    assert "0@0 (recorded start)" in err and f"max_steps at step {total} (from 0)" in out
    trained = _feedback_ids(settings, fb2, total)
    assert [s for s, _ in trained] == list(range(1, total + 1))
    ids = [b for _, b in trained]
    assert sorted(ids) == sorted(b["batch_id"] for b in made)  # every batch, once
    for partition in range(4):  # each partition in its offset order
        mine = [b for b in ids if b.startswith(f"{partition}-")]
        assert mine == [b["batch_id"] for b in made if b["partition"] == partition]


def test_sigterm_stops_after_the_step_with_a_final_checkpoint(
    batches: tuple[Settings, list[dict[str, Any]]], tmp_path: Path
) -> None:
    settings, _ = batches
    ckpt = tmp_path / "checkpoints"
    fb = create_topic(settings, "term-feedback", 1)
    proc = _trainer(settings, fb, ckpt)  # no --max-steps: runs until stopped
    _wait_for_checkpoint(ckpt, 30, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: stopping after this step" in err
    final = CheckpointStore(ckpt).load_latest()
    assert final is not None
    assert out.startswith(f"stopped at step {final.step} ")
    trained = _feedback_ids(settings, fb, final.step)
    assert [s for s, _ in trained] == list(range(1, final.step + 1))
    offsets = final.state["source"]["offsets"]
    assert sum(offsets.values()) == final.step  # every batch up to the offsets was trained
