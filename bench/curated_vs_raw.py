"""Held-out macro-F1 of the embedding classifier trained on the curated stream vs the raw one.

Method (the same text is printed with the results and stored in the JSON):

1. Corpus: real files of this machine, labelled by ``streams.sources`` (extension, name or
   shebang → language), one class per language with a long-tailed cap per class (python,
   C headers, Debian copyright texts, YAML, JavaScript, Perl, Markdown, reStructuredText,
   shell, CMake, CSS), files picked by a seeded shuffle of each class's sorted paths, each
   cut to its first 1,500 characters. Natural duplicates stay in: Debian copyright files
   and licence headers repeat verbatim or nearly, vendored copies repeat in site-packages.
2. Held-out set before any curation, stratified by class and grouped by normalized content
   digest (every exact copy of a held-out text is held out with it, so no exact copy leaks
   into training): per class, the distinct digests ordered by a hash, the first 15 % held
   out, one record per digest, written as the JSONL ``trainer.evaluate.load_eval_jsonl``
   reads. The same file evaluates both arms; near copies that remain in training are
   counted per arm (cosine ≥ the dedup threshold to a held-out vector).
3. Every record is embedded once (normalized content, ``agents.embed.Embedder``, cached
   on disk by ``bench.common.embed_cached``); both arms and the held-out set use these
   vectors, and semantic dedup reads them through a caching Embedder (same vectors).
4. Raw arm: the training records in stream order (a seeded shuffle), in batches of 32,
   natural class mix, no quality filter, no dedup (policy label ``raw``).
   Curated arm: the product's pipeline against the private stack's Redis in a fresh
   namespace: ``agents.pipeline.build_pipeline`` (ingest: validate, quality, exact and
   MinHash dedup; dedup: semantic) in micro-batches of 32, then the ``Balance`` step
   (policy ``inverse``, batch size 32, one partition) composing CuratedBatches. As in the
   live balance agent, one batch is composed per 32 new samples, so a finite stream gives
   about kept/32 batches, and the majority-class samples the inverse mix never draws stay
   in the buffers: the curated arm trains on fewer distinct samples than it kept.
   Diagnostic arm ``dedup-natural``: the same kept samples balanced with policy
   ``natural`` (dedup and quality without re-balancing).
5. Each arm's batches go to its own topic on a private embedded Kafka, cycled to exactly
   ``steps`` batches (same steps and batch size for every arm), and ``trainer.loop.train``
   runs the ``embedding-classifier`` for ``steps`` optimizer steps from the beginning of
   that topic, evaluating on the held-out JSONL at the end.
6. Replicates: the whole of 4-5 is repeated for several stream orders (seeds of the
   shuffle of the training records; the held-out set is fixed); the table gives mean ± sd
   and the paired difference to the raw arm.

Run: ``.venv/bin/python -m bench.curated_vs_raw [--quick]``; writes
``bench/results/curated_vs_raw[-quick].json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from bench.common import DOCS, SITE, STDLIB, console, embed_cached, quick_flag, show, write_result

BATCH = 32
TEXT_CHARS = 1_500
HOLDOUT = 0.15
SEED = 0
# Files per class at most (full run): a long tail, as a crawl of mixed sources has.
CAPS = {"python": 900, "c": 450, "text": 350, "yaml": 200, "javascript": 150, "perl": 110,
        "markdown": 80, "restructuredtext": 60, "shell": 45, "cmake": 35, "css": 24}
QUICK_SCALE = 0.27
# Where each class's files are looked for (a class may also come from elsewhere by name).
ROOTS = [Path("/usr"), SITE]
#: Quality + dedup with the ``natural`` policy: separates dedup's effect from balancing's.
DIAGNOSTIC = "dedup-natural"
METHOD = (__doc__.split("in the JSON):", 1)[1].split("Run:", 1)[0].strip("\n")
          if __doc__ else "")

log = logging.getLogger("bench.curated_vs_raw")


# -- the corpus ------------------------------------------------------------------------------


def _candidates() -> dict[str, list[Path]]:
    """Candidate files per class, sorted (the labels are confirmed when read)."""
    from streams.sources import LANGUAGES, SKIP_DIRS

    by_class: dict[str, list[Path]] = {c: [] for c in CAPS}
    for root in ROOTS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS
                                 and d not in {"test", "tests"})
            for name in filenames:
                path = Path(dirpath) / name
                found = LANGUAGES.get(path.suffix.lower())
                if found and found[0] in by_class and found[0] != "text":
                    by_class[found[0]].append(path)
                elif not path.suffix and dirpath in ("/usr/bin", "/usr/sbin"):
                    by_class["shell"].append(path)  # shebang scripts; confirmed on read
                    by_class["perl"].append(path)
                    by_class["python"].append(path)
    by_class["text"] = sorted(DOCS.glob("*/copyright"))
    stdlib = [p for p in STDLIB.rglob("*.py") if not {"test", "tests"} & set(p.parts)]
    by_class["python"] += stdlib
    for label, paths in by_class.items():
        unique = sorted({p for p in paths if not p.is_symlink()})
        by_class[label] = unique
    return by_class


def build_corpus(scale: float, seed: int = SEED) -> list[dict[str, Any]]:
    """Records (id, source, kind, label, content) in stream order (a seeded shuffle)."""
    from streams.sources import SourceStats, read_file_event

    rng = random.Random(seed)
    stats = SourceStats()
    records: list[dict[str, Any]] = []
    for label, paths in _candidates().items():
        cap = max(8, round(CAPS[label] * scale))
        order = list(paths)
        rng.shuffle(order)
        taken = 0
        for path in order:
            if taken >= cap:
                break
            event = read_file_event(path, 400_000, stats)
            if event is None or event["label"] != label:
                continue
            content = event["content"][:TEXT_CHARS]
            if len(content.strip()) < 40:
                continue
            records.append({"id": event["id"], "source": event["source"], "kind": event["kind"],
                            "label": label, "content": content})
            taken += 1
    rng.shuffle(records)
    return records


def split_holdout(records: list[dict[str, Any]], digests: list[str], fraction: float
                  ) -> tuple[list[int], list[int]]:
    """(train indexes, held-out indexes): stratified by label, grouped by content digest."""
    groups: dict[str, dict[str, list[int]]] = {}
    for i, (rec, digest) in enumerate(zip(records, digests, strict=True)):
        groups.setdefault(rec["label"], {}).setdefault(digest, []).append(i)
    train: list[int] = []
    heldout: list[int] = []
    for by_digest in groups.values():
        ordered = sorted(by_digest, key=lambda d: hashlib.blake2b(
            d.encode(), digest_size=8, person=b"bench-holdout").digest())
        k = max(1, round(fraction * len(ordered))) if len(ordered) > 1 else 0
        for d in ordered[:k]:
            heldout.append(by_digest[d][0])  # one record per distinct text
        for d in ordered[k:]:
            train.extend(by_digest[d])
    return sorted(train), sorted(heldout)


def write_eval_jsonl(path: Path, records: list[dict[str, Any]], vectors: np.ndarray,
                     indexes: list[int]) -> None:
    """The held-out set as ``load_eval_jsonl`` reads it."""
    with path.open("w", encoding="utf-8") as out:
        for i in indexes:
            rec = records[i]
            out.write(json.dumps({
                "id": rec["id"], "label": rec["label"], "kind": rec["kind"],
                "source": rec["source"], "content": rec["content"],
                "embedding": [round(float(x), 5) for x in vectors[i]],
            }) + "\n")


# -- the two arms ----------------------------------------------------------------------------


def raw_batches(records: list[dict[str, Any]], vectors: np.ndarray, train: list[int],
                digests: list[str]) -> list[dict[str, Any]]:
    """Stream order, 32 at a time, nothing dropped: policy ``raw``."""
    from agents.compose import assemble_batch
    from schemas.embedding import encode_embedding

    shares = _shares(Counter(records[i]["label"] for i in train))
    batches = []
    for seq, start in enumerate(range(0, len(train) - BATCH + 1, BATCH)):
        samples = []
        for i in train[start:start + BATCH]:
            blob = encode_embedding(vectors[i])
            samples.append({**records[i], "digest": digests[i], "embedding": blob,
                            "embedding_dim": len(blob) // 2})
        batches.append(dict(assemble_batch(
            partition=0, sequence=seq, samples=samples, policy="raw", class_shares=shares,
            target_shares=shares, weights={}, difficulty=None,
            created_at=int(time.time() * 1000))))
    return batches


def curate(settings: Any, records: list[dict[str, Any]], order: list[int],
           cache: dict[str, np.ndarray]) -> tuple[list[Any], dict[str, Any]]:
    """The product's ingest → dedup pipeline (``agents.pipeline.build_pipeline``) over the
    training stream, in micro-batches of 32 against Redis in a fresh namespace: the
    CuratedSamples kept, in order, and what was rejected (by reason, and by class and
    reason)."""
    from agents.pipeline import build_pipeline
    from agents.step import Coords, Item
    from schemas.records import RawEvent
    from streams.connections import redis_client
    from streams.serde import encode

    client = redis_client(settings.redis)
    pipeline = build_pipeline(settings, client, namespace=f"bench-{os.urandom(6).hex()}",
                              embedder=_cached_embedder(settings, cache))
    reasons: Counter[str] = Counter()
    by_class: Counter[str] = Counter()
    kept: list[Any] = []
    try:
        for start in range(0, len(order), BATCH):
            items = []
            for offset, i in enumerate(order[start:start + BATCH], start):
                rec = records[i]
                event = RawEvent(id=rec["id"], source=rec["source"], kind=rec["kind"],
                                 language=rec["label"], label=rec["label"],
                                 content=rec["content"], timestamp=int(time.time() * 1000),
                                 attributes={})
                items.append(Item(encode("RawEvent", event), Coords("bench-raw", 0, offset),
                                  rec["id"].encode()))
            for outcome in pipeline.run(items):
                if outcome.rejected:
                    reason = f"{outcome.record['stage']}:{outcome.reason}"
                    reasons[reason] += 1
                    by_class[f"{outcome.record['label']}/{reason}"] += 1
                else:
                    kept.append(outcome.record)
    finally:
        client.close()
    return kept, {"kept": len(kept), "rejected": dict(reasons.most_common()),
                  "rejected_by_class": dict(by_class.most_common())}


def balance(settings: Any, samples: list[Any], policy: str) -> list[dict[str, Any]]:
    """The ``Balance`` step (batch size 32, one partition, fresh namespace) over the kept
    samples in order: the CuratedBatches it composes."""
    from agents.balance import Balance
    from agents.buffers import buffers_for
    from agents.feedback import LossStore
    from agents.step import Coords, Item
    from streams.connections import redis_client

    config = settings.balance.model_copy(update={"policy": policy, "batch_size": BATCH})
    namespace = f"bench-{os.urandom(6).hex()}"
    client = redis_client(settings.redis)
    step = Balance(config, buffers_for(client, namespace, 0, config),
                   LossStore(client, namespace))
    batches: list[dict[str, Any]] = []
    try:
        for offset, sample in enumerate(samples):
            # One sample per run, as the balance agent calls it; the step keeps its
            # partition's state between runs (the agent restores it from its table).
            batches += [dict(outcome.record) for outcome in
                        step.run([Item(sample, Coords("bench-samples", 0, offset))])]
    finally:
        client.close()
    return batches


def _cached_embedder(settings: Any, cache: dict[str, np.ndarray]) -> Any:
    """An Embedder that answers from the vectors computed once (same model, same vectors)."""
    from agents.embed import Embedder

    class CachedEmbedder(Embedder):
        def encode(self, texts: list[str], max_chunks: int | None = None) -> np.ndarray:
            missing = [t for t in texts if t not in cache]
            if missing:  # not expected: every training text was embedded up front
                for text, vec in zip(missing, super().encode(missing, max_chunks), strict=True):
                    cache[text] = vec
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.vstack([cache[t] for t in texts]).astype(np.float32)

    return CachedEmbedder(settings.dedup, threads=1)


# -- Kafka and the trainer -------------------------------------------------------------------


def produce(settings: Any, batches: list[dict[str, Any]], steps: int) -> int:
    """``steps`` batches (the arm's batches cycled) to partition 0 of the batches topic."""
    from kafka import KafkaProducer

    from streams.connections import kafka_client_options
    from streams.serde import encode
    from streams.topics import ensure_topics

    ensure_topics(settings.kafka, settings.topics)
    producer = KafkaProducer(**kafka_client_options(settings.kafka), linger_ms=20,
                             max_request_size=8 * 1024 * 1024)
    try:
        for n in range(steps):
            batch = batches[n % len(batches)]
            producer.send(settings.topics.batches, key=batch["batch_id"].encode(),
                          value=encode("CuratedBatch", batch), partition=0)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)
    return steps


def train_arm(settings: Any, steps: int, eval_file: Path, folder: Path, seed: int
              ) -> dict[str, Any]:
    """One training run on the arm's topic; the held-out evaluation and run figures."""
    from trainer.loop import train

    run = settings.trainer.model_copy(update={
        "model": "embedding-classifier", "max_steps": steps, "checkpoint_dir": folder,
        "start": "earliest", "device": "cpu", "eval_file": eval_file, "idle_timeout_s": 30.0,
        "seed": seed})
    result = train(settings.model_copy(update={"trainer": run}))
    return {"seed": seed, "steps": result.step, "stopped": result.stopped,
            "samples": result.samples, "loss": result.loss, "wall_s": round(result.wall_s, 2),
            **{f"eval_{k}": v for k, v in result.eval.items()}}


def arm_settings(base: Any, topic: str, steps: int) -> Any:
    """The base settings with the arm's own batches topic and a quiet trainer."""
    return base.model_copy(update={
        "topics": base.topics.model_copy(update={"batches": topic}),
        "trainer": base.trainer.model_copy(update={"eval_every": steps,
                                                   "checkpoint_every": steps}),
        "metrics": base.metrics.model_copy(update={"trainer_port": 0, "interval_s": 60.0}),
    })


# -- reporting -------------------------------------------------------------------------------


def _shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def arm_stats(batches: list[dict[str, Any]], steps: int, eval_vecs: np.ndarray,
              vec_of: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """What the trainer sees in ``steps`` cycled batches: samples, unique ids/texts, mix."""
    seen = [s for n in range(steps) for s in batches[n % len(batches)]["samples"]]
    ids = {s["id"] for s in seen}
    texts = {s["content"] for s in seen}
    unique_vecs = np.vstack([vec_of[i] for i in sorted(ids)])
    near = int(((unique_vecs @ eval_vecs.T).max(axis=1) >= threshold).sum())
    return {"batches_distinct": len(batches), "samples_seen": len(seen),
            "unique_ids": len(ids), "unique_texts": len(texts),
            "near_copies_of_heldout": near,
            "class_mix": _shares(Counter(s["label"] for s in seen))}


def _mix_text(mix: dict[str, float], top: int = 3) -> str:
    items = list(mix.items())
    text = " ".join(f"{k[:6]} {v:.0%}" for k, v in items[:top])
    return text + (f" +{len(items) - top}" if len(items) > top else "")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def replicate(base: Any, folder: Path, seed: int, records: list[dict[str, Any]],
              vectors: np.ndarray, digests: list[str], train: list[int], heldout: list[int],
              steps: int, eval_file: Path) -> dict[str, Any]:
    """One stream order (``seed``): build every arm's batches, train, evaluate."""
    order = list(train)
    random.Random(seed).shuffle(order)
    cache = {r["content"]: vectors[i] for i, r in enumerate(records)}
    vec_of = {r["id"]: vectors[i] for i, r in enumerate(records)}
    tick = time.perf_counter()
    kept, curation = curate(base, records, order, cache)
    arms = {"raw": raw_batches(records, vectors, order, digests),
            "curated": balance(base, kept, "inverse"),
            DIAGNOSTIC: balance(base, kept, "natural")}
    curation["seconds"] = round(time.perf_counter() - tick, 1)
    out: dict[str, Any] = {"seed": seed, "curation": curation, "arms": {}}
    for arm, batches in arms.items():
        settings = arm_settings(base, f"bench-{arm}-{seed}-batches", steps)
        produce(settings, batches, steps)
        run = train_arm(settings, steps, eval_file, folder / f"ckpt-{arm}-{seed}", seed)
        out["arms"][arm] = {**arm_stats(batches, steps, vectors[heldout], vec_of,
                                        base.dedup.threshold), "run": run}
        console.print(f"seed {seed} {arm}: macro-F1 {run.get('eval_macro_f1', float('nan')):.3f}"
                      f" accuracy {run.get('eval_accuracy', float('nan')):.3f} "
                      f"({out['arms'][arm]['unique_ids']} unique samples)")
    return out


def summarize_arms(reps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm over the replicates: mean ± sd of the figures, and the mean class mix."""
    summary: dict[str, dict[str, Any]] = {}
    for arm in reps[0]["arms"]:
        per = [r["arms"][arm] for r in reps]
        entry: dict[str, Any] = {}
        for key in ("samples_seen", "unique_ids", "unique_texts", "batches_distinct",
                    "near_copies_of_heldout"):
            entry[key] = statistics.fmean(p[key] for p in per)
        for key in ("macro_f1", "accuracy", "loss"):
            values = [p["run"].get(f"eval_{key}", float("nan")) for p in per]
            entry[f"{key}_mean"], entry[f"{key}_sd"] = _mean_sd(values)
        mix: Counter[str] = Counter()
        for p in per:
            mix.update({k: v / len(per) for k, v in p["class_mix"].items()})
        entry["class_mix"] = {k: round(v, 4) for k, v in mix.most_common()}
        summary[arm] = entry
    for arm in summary:
        if arm != "raw":
            diffs = [r["arms"][arm]["run"].get("eval_macro_f1", float("nan"))
                     - r["arms"]["raw"]["run"].get("eval_macro_f1", float("nan")) for r in reps]
            summary[arm]["macro_f1_minus_raw_mean"], summary[arm]["macro_f1_minus_raw_sd"] = (
                _mean_sd(diffs))
            summary[arm]["wins_over_raw"] = sum(d > 0 for d in diffs)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the corpus, run every replicate on a private stack, print and store the table."""
    quick = quick_flag(argv)
    logging.basicConfig(level=logging.WARNING)
    scale = QUICK_SCALE if quick else 1.0
    steps = 100 if quick else 300
    seeds = [0, 1, 2] if quick else [0, 1, 2, 3, 4]
    from agents.normalize import content_digest, normalize
    from sluice.ports import free_port
    from sluice.settings import load_settings
    from sluice.stack import Stack

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
        base = load_settings(state_dir=str(folder / "state"), stack={
            "kafka_port": free_port(), "controller_port": free_port(),
            "redis_port": free_port()}, dedup={"device": "cpu"})
        stack = Stack(base)
        stack.up()
        try:
            reps = [replicate(base, folder, seed, records, vectors, digests, train, heldout,
                              steps, eval_file) for seed in seeds]
        finally:
            stack.down()

    summary = summarize_arms(reps)
    rows = []
    for arm, res in summary.items():
        delta = (f"{res['macro_f1_minus_raw_mean']:+.3f} ± {res['macro_f1_minus_raw_sd']:.3f}"
                 f" ({res['wins_over_raw']}/{len(seeds)})" if arm != "raw" else "")
        rows.append([arm, round(res["samples_seen"]), round(res["unique_ids"]),
                     round(res["near_copies_of_heldout"]), _mix_text(res["class_mix"]),
                     f"{res['macro_f1_mean']:.3f} ± {res['macro_f1_sd']:.3f}", delta,
                     f"{res['accuracy_mean']:.3f} ± {res['accuracy_sd']:.3f}"])
    eval_mix = _shares(Counter(records[i]["label"] for i in heldout))
    console.print(f"[bold]Method[/bold]\n{METHOD}\n")
    console.print(f"curation (stream order {seeds[0]}): {reps[0]['curation']['rejected']}, "
                  f"kept {reps[0]['curation']['kept']} of {len(train)}")
    console.print(f"held-out set: {len(heldout)} texts, mix {_mix_text(eval_mix, 11)}")
    show(f"Held-out macro-F1, {steps} steps × {BATCH}, embedding-classifier, "
         f"{len(seeds)} stream orders (mean ± sd; {DIAGNOSTIC} is a diagnostic arm)",
         ["arm", "seen", "unique", "near eval", "class mix (seen)", "macro-F1",
          "Δ vs raw (wins)", "accuracy"], rows)
    payload = {
        "method": METHOD, "steps": steps, "batch_size": BATCH, "seeds": seeds,
        "text_chars": TEXT_CHARS, "holdout_fraction": HOLDOUT,
        "corpus": {"records": len(records), "distinct_texts": len(set(digests)),
                   "train": len(train), "heldout": len(heldout),
                   "class_counts": dict(Counter(r["label"] for r in records).most_common()),
                   "train_mix": _shares(Counter(records[i]["label"] for i in train)),
                   "heldout_mix": eval_mix},
        "embed_s": round(embed_s, 1), "summary": summary, "replicates": reps,
        "total_s": round(time.perf_counter() - started, 1),
    }
    write_result("curated_vs_raw", quick, payload)
    return payload


if __name__ == "__main__":
    main()
