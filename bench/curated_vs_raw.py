"""The benchmark that decides: the embedding classifier trained at equal optimizer steps and
batch size on the raw stream and on the curated one, in a compute-limited and a
data-limited regime, evaluated on texts held out before any curation.

Method (the same text is printed with the results and stored in the JSON):

1. Corpus: real files of this machine, labelled by ``streams.sources`` (extension, name or
   shebang → language), one class per language with a long-tailed cap per class (python,
   C headers, Debian copyright texts, YAML, JavaScript, Perl, Markdown, reStructuredText,
   shell, CMake, CSS), files picked by a seeded shuffle of each class's sorted paths, each
   cut to its first 1,500 characters. Natural duplicates stay in: Debian copyright files
   and licence headers repeat verbatim or nearly, vendored copies repeat in site-packages.
2. Held-out set before any curation, stratified by class and grouped by normalized content
   digest (every exact copy of a held-out text is held out with it): per class, the
   distinct digests ordered by a hash, the first 15 % held out, one record per digest,
   written as the JSONL ``trainer.evaluate.load_eval_jsonl`` reads. The same file
   evaluates every arm; near copies of held-out texts among the distinct samples an arm
   trains on are counted (cosine ≥ the dedup threshold to a held-out vector).
3. Every record is embedded once (normalized content, ``agents.embed.Embedder``, cached
   on disk by ``bench.common.embed_cached``); every arm and the held-out set use these
   vectors, and semantic dedup reads them through a caching Embedder (same vectors).
4. The offered stream is every training record in a seeded order (one order per
   replicate). Regimes, at batch size 8 for every arm: compute-limited, the trainer takes
   ``steps = offered / (3 × 8)`` steps (the stream offers 3× what it consumes);
   data-limited, ``steps = 2 × offered / 8`` (it consumes 2× what the stream offers).
5. Arms, each exactly ``steps`` batches:
   - ``raw``: the stream in order, 8 at a time, nothing dropped (compute-limited: its
     first third; data-limited: the stream cycled twice).
   - curated: the product's pipeline (``agents.pipeline.build_pipeline``: validate,
     quality, exact and MinHash dedup, semantic dedup) over the whole offered stream in
     micro-batches of 32 against the private Redis in a fresh namespace; then the
     product's ``Balance`` step with ``pace = "trainer"`` (one partition, batch size 8,
     default ``reuse_cap`` and ``buffer_cap``): every kept sample is buffered, then the
     step is asked (``Balance.paced``, ``ahead_batches`` at a time, each batch confirmed)
     for exactly ``steps`` batches, each composed from the whole buffered pool, as the
     balance agent does when the trainer sets the pace. No feedback flows back (no loss
     EMA, no hard-example replays): the class policy alone decides. ``dedup+quality``
     uses policy ``natural``; ``+inverse`` policy ``inverse``; ``+inverse +weights`` the
     same batches trained with ``trainer.loss_weights`` on (each sample's batch weight,
     target share / natural share, normalized per batch, weights its loss). The other
     arms train with ``loss_weights`` off; their batch weights are all 1 (checked and
     shown), so with it on they would compute the same loss. Each regime also shows, for
     one stream order, every class's samples per quarter of the run (a class used up
     early shows as zeros at the end), and how many batches the step composed while the
     pool could not meet the policy's targets (its ``batches.short``).
   - closed loop (``bench.curation.closed_loop``): ``+inverse +hard_k`` and
     ``+inverse +reducible`` run the ``Balance`` step beside the trainer with the
     ``Feedback`` step folding its losses, so each batch is composed after the losses of
     all but the last ``ahead_batches``: the replay policy (``hard_k``: loss above mean +
     k·std; ``reducible``: the trainer's loss minus the reference model's) re-queues
     samples; ``+inverse +reducible +weights`` the same with ``trainer.loss_weights`` on.
6. Each arm's batches go to its own topic on the private embedded Kafka, and
   ``trainer.loop.train`` runs the ``embedding-classifier`` for ``steps`` optimizer steps
   from the topic's beginning (trainer defaults, but warm-up = steps / 10 and the seed of
   the stream order, the same for every arm), checkpointing every ``steps / 10``. Each
   checkpoint is rebuilt (``trainer.run_state.build_model``) and evaluated on the held-out
   JSONL with ``trainer.evaluate.evaluate`` (macro-F1, accuracy; the last one equals the
   trainer's own final evaluation, checked); the model's predictions give each held-out
   class's F1 (their mean with predicted-only classes is the same macro-F1, checked) and
   the worst class's. "Steps to raw's final" is the first evaluated step whose macro-F1
   reaches the raw arm's final macro-F1 in the same stream order.
7. Replicates: 4–6 repeated for several stream orders (the held-out set is fixed); tables
   give mean ± sd over the orders and the paired difference to raw (in points of F1).
8. The byte-LM: in the compute-limited regime the arms ``raw``, ``dedup+quality``,
   ``+inverse`` and ``+inverse +weights`` also train ``byte-lm``
   (``trainer.models.bytelm``: a small causal transformer over UTF-8 bytes) on the very
   same batches, evaluated in bits per byte on the held-out code; the last checkpoint
   also on the held-out code the product's quality rules pass and on the code they fail
   (``agents.quality.QualityFilter``, ingest settings), to show where the difference to
   raw comes from.

Run: ``.venv/bin/python -m bench.curated_vs_raw [--quick]``; writes
``bench/results/curated_vs_raw[-quick].json``.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from bench.common import console, embed_cached, quick_flag, write_result
from bench.curation.arms import curate, paced_batches, raw_batches
from bench.curation.closed_loop import fed_back_batches
from bench.curation.corpus import (
    HOLDOUT,
    QUICK_SCALE,
    TEXT_CHARS,
    build_corpus,
    split_holdout,
    write_eval_jsonl,
)
from bench.curation.report import (
    arm_stats,
    shares,
    show_lm,
    show_quarters,
    show_regime,
    summarize,
    summarize_lm,
)
from bench.curation.training import (
    arm_settings,
    eval_every,
    evaluate_checkpoints,
    produce,
    run_figures,
    train_arm,
)

BATCH = 8
#: regime → (samples offered per sample consumed): 3 offered per consumed, or 1 per 2.
REGIMES = {"compute-limited": 3.0, "data-limited": 0.5}
#: arm → (balance policy, or None for the raw stream; trainer.loss_weights; replay policy,
#: or None for batches composed without feedback).
ARMS: dict[str, tuple[str | None, bool, str | None]] = {
    "raw": (None, False, None),
    "dedup+quality": ("natural", False, None),
    "+inverse": ("inverse", False, None),
    "+inverse +weights": ("inverse", True, None),
    "+inverse +hard_k": ("inverse", False, "hard_k"),
    "+inverse +reducible": ("inverse", False, "reducible"),
    "+inverse +reducible +weights": ("inverse", True, "reducible"),
}
#: The arms the byte-LM trains on (compute-limited regime; the same batches as the
#: classifier's arms of that name), evaluated on the held-out code.
LM_ARMS = ("raw", "dedup+quality", "+inverse", "+inverse +weights")
LM_REGIME = "compute-limited"
METHOD = (__doc__.split("in the JSON):", 1)[1].split("Run:", 1)[0].strip("\n")
          if __doc__ else "")

log = logging.getLogger("bench.curated_vs_raw")


def quality_subsets(settings: Any, records: list[dict[str, Any]], vectors: np.ndarray,
                    code: list[int], folder: Path) -> dict[str, list[Any]]:
    """The held-out code split by the product's quality rules (``agents.quality``, the
    ingest settings): what a curated stream would have kept and what it would have
    dropped, as evaluation samples. Why an arm's bits per byte moves shows there."""
    from agents.quality import QualityFilter
    from trainer.evaluate import load_eval_jsonl

    judge = QualityFilter(settings.ingest)
    passed = {i for i in code if judge.check(records[i]["content"], "CODE").passed}
    out: dict[str, list[Any]] = {}
    for name, part in (("passes quality", [i for i in code if i in passed]),
                       ("fails quality", [i for i in code if i not in passed])):
        path = folder / f"heldout-code-{name.replace(' ', '-')}.jsonl"
        write_eval_jsonl(path, records, vectors, part)
        out[name] = load_eval_jsonl(path) if part else []
    return out


def regime_steps(offered: int, ratio: float) -> int:
    """Optimizer steps of a regime: ``offered / ratio`` samples in batches of ``BATCH``."""
    return max(1, int(offered / ratio) // BATCH)


def replicate(base: Any, folder: Path, seed: int, records: list[dict[str, Any]],
              vectors: np.ndarray, digests: list[str], train: list[int], heldout: list[int],
              eval_file: Path, eval_samples: list[Any], lm_eval_file: Path,
              lm_eval_samples: list[Any], lm_subsets: dict[str, list[Any]]
              ) -> dict[str, Any]:
    """One stream order (``seed``): curate it once, then for each regime build every arm's
    batches, train, evaluate (and the byte-LM on ``LM_ARMS`` of ``LM_REGIME``, its last
    checkpoint also on each of ``lm_subsets`` of the held-out code)."""
    stream = list(train)
    random.Random(seed).shuffle(stream)
    cache = {r["content"]: vectors[i] for i, r in enumerate(records)}
    vec_of = {r["id"]: vectors[i] for i, r in enumerate(records)}
    kept, curation = curate(base, records, stream, cache)
    out: dict[str, Any] = {"seed": seed, "curation": curation, "regimes": {}}
    for regime, ratio in REGIMES.items():
        steps = regime_steps(len(stream), ratio)
        batches: dict[str | None, list[dict[str, Any]]] = {
            None: raw_batches(records, vectors, stream, digests, steps, BATCH)}
        composition: dict[str, Any] = {}
        for name in dict.fromkeys(p for p, _, r in ARMS.values() if p and r is None):
            batches[name], composition[name] = paced_batches(base, kept, name, steps, BATCH)
        arms: dict[str, Any] = {}
        for arm, (policy, weighted, replay) in ARMS.items():
            tag = f"{regime}-{arm.replace('+', 'p').replace(' ', '')}-{seed}"
            settings = arm_settings(base, tag, steps, folder / f"ckpt-{tag}", seed,
                                    eval_file, weighted)
            if replay is None:
                arm_batches = batches[policy]
                produce(settings, arm_batches, steps)
                run = train_arm(settings, eval_samples)
            else:
                arm_batches, composition[arm], result = fed_back_batches(
                    settings, kept, str(policy), replay, steps, BATCH)
                run = run_figures(settings, result, eval_samples)
            arms[arm] = {**arm_stats(arm_batches, steps, vectors[heldout], vec_of,
                                     base.dedup.threshold), "run": run}
            final = run["curve"][-1]
            console.print(f"seed {seed} {regime} {arm}: macro-F1 {final['macro_f1']:.3f} "
                          f"worst {final['worst_class_f1']:.3f} accuracy "
                          f"{final['accuracy']:.3f} ({arms[arm]['unique_ids']} distinct, "
                          f"{run['wall_s']}s)")
        if regime == LM_REGIME:
            out["byte_lm"] = {}
            for arm in LM_ARMS:
                policy, weighted, _ = ARMS[arm]
                tag = f"lm-{arm.replace('+', 'p').replace(' ', '')}-{seed}"
                settings = arm_settings(base, tag, steps, folder / f"ckpt-{tag}", seed,
                                        lm_eval_file, weighted, model="byte-lm")
                produce(settings, batches[policy], steps)
                out["byte_lm"][arm] = run = train_arm(settings, lm_eval_samples)
                run["subsets"] = {
                    name: evaluate_checkpoints(settings.trainer, subset,
                                               last_only=True)[-1]["bits_per_byte"]
                    for name, subset in lm_subsets.items() if subset}
                parts = ", ".join(f"{k} {v:.3f}" for k, v in run["subsets"].items())
                console.print(f"seed {seed} {regime} byte-lm {arm}: held-out code "
                              f"{run['curve'][-1]['bits_per_byte']:.3f} bits/byte ({parts}; "
                              f"{run['wall_s']}s)")
        out["regimes"][regime] = {"steps": steps, "consumed": steps * BATCH,
                                  "offered": len(stream), "composition": composition,
                                  "arms": arms}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the corpus, run every replicate on a private stack, print and store the tables."""
    quick = quick_flag(argv)
    logging.basicConfig(level=logging.WARNING)
    scale = QUICK_SCALE if quick else 1.0
    seeds = [0, 1, 2] if quick else [0, 1, 2, 3, 4]
    from agents.normalize import content_digest, normalize
    from sluice.ports import free_port
    from sluice.settings import load_settings
    from sluice.stack import Stack
    from trainer.evaluate import load_eval_jsonl

    started = time.perf_counter()
    records = build_corpus(scale)
    for rec in records:
        rec["content"] = normalize(rec["content"])
    digests = [content_digest(r["content"]) for r in records]
    train, heldout = split_holdout(records, digests, HOLDOUT)
    console.print(f"corpus: {len(records)} records, {len(set(digests))} distinct texts, "
                  f"{len(train)} training, {len(heldout)} held out "
                  f"({time.perf_counter() - started:.1f}s)")
    tick = time.perf_counter()
    vectors = embed_cached([r["content"] for r in records], threads=1)
    embed_s = time.perf_counter() - tick
    console.print(f"embedded {len(records)} texts in {embed_s:.1f}s (cached on disk)")

    with tempfile.TemporaryDirectory(prefix="bench-cvr-") as tmp:
        folder = Path(tmp)
        eval_file = folder / "heldout.jsonl"
        write_eval_jsonl(eval_file, records, vectors, heldout)
        eval_samples = load_eval_jsonl(eval_file)
        lm_eval_file = folder / "heldout-code.jsonl"
        heldout_code = [i for i in heldout if records[i]["kind"] == "CODE"]
        write_eval_jsonl(lm_eval_file, records, vectors, heldout_code)
        lm_eval_samples = load_eval_jsonl(lm_eval_file)
        if not lm_eval_samples:
            raise RuntimeError("no code among the held-out texts: the byte-LM has nothing "
                               "to be evaluated on")
        base = load_settings(state_dir=str(folder / "state"), stack={
            "kafka_port": free_port(), "controller_port": free_port(),
            "redis_port": free_port()}, dedup={"device": "cpu"})
        lm_subsets = quality_subsets(base, records, vectors, heldout_code, folder)
        stack = Stack(base)
        stack.up()
        try:
            reps = [replicate(base, folder, seed, records, vectors, digests, train, heldout,
                              eval_file, eval_samples, lm_eval_file, lm_eval_samples,
                              lm_subsets)
                    for seed in seeds]
        finally:
            stack.down()

    train_counts = dict(Counter(records[i]["label"] for i in train).most_common())
    heldout_counts = dict(Counter(records[i]["label"] for i in heldout).most_common())
    eval_mix = shares(Counter(heldout_counts))
    console.print(f"[bold]Method[/bold]\n{METHOD}\n")
    console.print(f"curation (stream order {seeds[0]}): kept {reps[0]['curation']['kept']} "
                  f"of {len(train)}; rejected {reps[0]['curation']['rejected']}")
    console.print(f"held-out set: {len(heldout)} texts, {heldout_counts}")
    summaries: dict[str, Any] = {}
    for regime, ratio in REGIMES.items():
        steps = reps[0]["regimes"][regime]["steps"]
        summaries[regime] = summarize([r["regimes"][regime]["arms"] for r in reps], steps)
        starved = [(r["seed"], p, c["starved_at"]) for r in reps
                   for p, c in r["regimes"][regime]["composition"].items() if c["starved_at"]]
        if starved:
            console.print(f"[yellow]{regime}: the balance step starved (seed, policy, batches "
                          f"composed): {starved}; those batches were cycled to {steps}[/yellow]")
        short = [(r["seed"], p, c.get("short_batches", 0), c.get("short_from")) for r in reps
                 for p, c in r["regimes"][regime]["composition"].items()
                 if c.get("short_batches")]
        if short:
            console.print(f"{regime}: batches composed while the pool could not meet the "
                          f"targets (seed, policy, batches, from about batch): {short}")
        show_regime(f"{regime}: {steps} steps × {BATCH} = {steps * BATCH} samples consumed, "
                    f"{len(train)} offered (ratio {ratio:g}), embedding-classifier, eval every "
                    f"{eval_every(steps)} steps, {len(seeds)} stream orders (mean ± sd)",
                    summaries[regime], steps, len(seeds), train_counts, heldout_counts)
        show_quarters(f"{regime}: samples of each class per quarter of the {steps} steps "
                      f"(stream order {seeds[0]})", reps[0]["regimes"][regime]["arms"],
                      train_counts)
    lm_summary = summarize_lm([r["byte_lm"] for r in reps])
    show_lm(f"byte-lm, {LM_REGIME}: held-out code ({len(lm_eval_samples)} texts), bits per "
            f"byte after {reps[0]['regimes'][LM_REGIME]['steps']} steps × {BATCH} "
            f"(mean ± sd over {len(seeds)} orders); the held-out code the product's quality "
            f"rules pass and fail", lm_summary, len(seeds),
            {name: len(subset) for name, subset in lm_subsets.items()})
    payload = {
        "method": METHOD, "batch_size": BATCH, "regimes": {
            regime: {"offered_per_consumed": ratio,
                     "steps": reps[0]["regimes"][regime]["steps"],
                     "eval_every": eval_every(reps[0]["regimes"][regime]["steps"])}
            for regime, ratio in REGIMES.items()},
        "arms": {arm: {"policy": p, "loss_weights": w, "replay_policy": r}
                 for arm, (p, w, r) in ARMS.items()},
        "byte_lm": {"regime": LM_REGIME, "arms": list(LM_ARMS),
                    "heldout_code": len(lm_eval_samples),
                    "subsets": {name: len(subset) for name, subset in lm_subsets.items()},
                    "summary": lm_summary},
        "seeds": seeds, "text_chars": TEXT_CHARS, "holdout_fraction": HOLDOUT,
        "corpus": {"records": len(records), "distinct_texts": len(set(digests)),
                   "train": len(train), "heldout": len(heldout),
                   "class_counts": dict(Counter(r["label"] for r in records).most_common()),
                   "train_counts": train_counts,
                   "train_mix": shares(Counter(records[i]["label"] for i in train)),
                   "heldout_counts": heldout_counts, "heldout_mix": eval_mix},
        "embed_s": round(embed_s, 1), "summary": summaries, "replicates": reps,
        "total_s": round(time.perf_counter() - started, 1),
    }
    write_result("curated_vs_raw", quick, payload)
    return payload


if __name__ == "__main__":
    main()
