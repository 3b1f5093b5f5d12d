"""The trainer's data path: how long the trainer waits for its next batch, before and now.

``python -m bench.trainer [--quick]``

Real curated batches (the labelled files of ``bench.curated_vs_raw``'s corpus with their
real MiniLM embeddings, 32 samples each, built by ``agents.compose.assemble_batch``) wait
on a private embedded Kafka; ``trainer.loop.train`` reads, decodes and collates them in its
prefetch thread while it trains on the CPU, with one checkpoint at the end and no
evaluation. The figure is the trainer's own ``data_wait_share``: the share of loop time the
step waited for its next batch once the first one came (the first wait, the consumer
joining and seeking, is start-up and reported apart). Two data paths in alternating rounds,
so that a busy machine hurts both alike:

- ``before``: the trainer's data path before issue 11 — the baseline: the avro package's
  reader (``streams.serde.decode_reference``) and kafka-python's pure-Python CRC-32C check
  of every fetched record batch (``kafka.record._crc32c``);
- ``now``: ``streams.serde.decode`` (fastavro) and the ``crc32c`` package's C check.

Both models: the embedding classifier (a light step: where the data path shows) and the
byte-level LM (a heavy step). Goal: data wait < 5 % on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import embed_cached, private_stack, quick_flag, show, write_result

GOAL = 0.05
BATCH = 32
#: Steps per run (full, quick): the classifier's step is ~100× cheaper than the LM's.
STEPS = {"embedding-classifier": (1_000, 300), "byte-lm": (120, 40)}


def data_paths() -> dict[str, Callable[[], contextlib.AbstractContextManager[Any]]]:
    """The data paths compared, baseline first: each a context that sets it up."""
    import kafka.record.default_records as records
    from kafka.record._crc32c import crc as crc32c_in_python

    from streams.serde import decode_reference

    def before() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(mock.patch("trainer.source.decode", decode_reference))
        stack.enter_context(mock.patch.object(records, "calc_crc32c", crc32c_in_python))
        return stack

    return {"before": before, "now": contextlib.nullcontext}


def real_batches(quick: bool, steps: int) -> list[dict[str, Any]]:
    """``steps`` CuratedBatch records of real labelled files, in a seeded stream order."""
    from agents.normalize import content_digest, normalize
    from bench.curation.arms import raw_batches
    from bench.curation.corpus import QUICK_SCALE, build_corpus

    records = build_corpus(QUICK_SCALE if quick else 1.0)
    for record in records:
        record["content"] = normalize(record["content"])
    digests = [content_digest(r["content"]) for r in records]
    vectors = embed_cached([r["content"] for r in records], threads=1)
    return raw_batches(records, vectors, list(range(len(records))), digests, steps, BATCH)


def train_once(base: Any, folder: Path, model: str, steps: int, batches: list[dict[str, Any]],
               path: Callable[[], contextlib.AbstractContextManager[Any]], tag: str
               ) -> dict[str, float]:
    """One trainer run of ``model`` over ``steps`` batches on a topic of its own, reading
    them through the data ``path``: its samples/s, start-up and data-wait share."""
    from bench.curation.training import produce
    from trainer.loop import train

    settings = base.model_copy(update={
        "topics": base.topics.model_copy(update={"batches": f"bench-trainer-{tag}",
                                                 "feedback": f"bench-trainer-{tag}-feedback"}),
        "trainer": base.trainer.model_copy(update={
            "model": model, "device": "cpu", "max_steps": steps, "start": "earliest",
            "checkpoint_dir": folder / tag, "checkpoint_every": steps, "eval_every": steps,
            "eval_file": None, "holdout_fraction": 0.0, "idle_timeout_s": 30.0,
            "warmup_steps": max(1, steps // 10)}),
        "metrics": base.metrics.model_copy(update={"trainer_port": 0, "interval_s": 60.0}),
    })
    produce(settings, batches, steps)
    # The trainer's own source; the baseline swaps in the decoder and the CRC check the
    # trainer used before.
    with path():
        result = train(settings)
    if result.step != steps:
        raise RuntimeError(f"{model} stopped at step {result.step} of {steps} "
                           f"({result.stopped})")
    return {"samples_per_s": result.samples_per_s, "startup_s": result.startup_s,
            "wait_s": result.wait_s - result.startup_s, "wall_s": result.wall_s,
            "data_wait_share": result.data_wait_share}


def run(quick: bool) -> dict[str, Any]:
    """Both models, both data paths, alternating rounds; writes
    bench/results/trainer[-quick].json."""
    logging.basicConfig(level=logging.WARNING)
    # kafka-python warns of every slow poll, which the baseline's Python CRC makes many of.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    rounds = 2 if quick else 3
    pick = 1 if quick else 0
    most = max(s[pick] for s in STEPS.values())
    batches = real_batches(quick, most)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        model: {name: [] for name in data_paths()} for model in STEPS}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp, \
            private_stack(Path(tmp) / "stack") as base:
        for n in range(rounds):
            for model, sizes in STEPS.items():
                for name, path in data_paths().items():
                    runs[model][name].append(train_once(
                        base, Path(tmp), model, sizes[pick], batches, path,
                        f"{model}-{name}-{n}-{time.monotonic_ns()}"))
    result: dict[str, Any] = {"batch": BATCH, "rounds": rounds, "models": {}}
    for model, by_path in runs.items():
        entry: dict[str, Any] = {"steps": STEPS[model][pick]}
        for name, figures in by_path.items():
            entry[name] = {key: statistics.median(f[key] for f in figures)
                           for key in figures[0]} | {"runs": figures}
        entry["samples_per_s_ratio"] = (entry["now"]["samples_per_s"]
                                        / entry["before"]["samples_per_s"])
        result["models"][model] = entry
    _report(result)
    write_result("trainer", quick, result)
    return result


def _report(r: dict[str, Any]) -> None:
    rows = []
    for model, entry in r["models"].items():
        for name in data_paths():
            f = entry[name]
            rows.append([model, name, entry["steps"], f["samples_per_s"],
                         f"{100 * f['data_wait_share']:.1f} %", f["startup_s"],
                         entry["samples_per_s_ratio"] if name == "now" else 1.0])
    show(f"trainer on the CPU over real curated batches of {r['batch']} from the embedded "
         f"Kafka, median of {r['rounds']} alternating rounds; goal: data wait < "
         f"{100 * GOAL:.0f} %",
         ["model", "data path", "steps", "samples/s", "data wait", "start-up s",
          "samples/s ratio"], rows)


def main(argv: list[str] | None = None) -> None:
    run(quick_flag(argv))


if __name__ == "__main__":
    main()
