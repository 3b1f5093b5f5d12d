"""Real-text batches for the trainer tests: functions of the Python standard library.

Each sample is the source of one function, labelled with its top-level package (asyncio,
email, ...). Embeddings are a deterministic feature-hashing of the words and word pairs of
the source (384 dims, L2-normalized, float16 — the wire shape of all-MiniLM-L6-v2's),
because the real model embeds about 8 texts/s on this 2-core machine: a few hundred steps
of batches would take minutes to embed. The classifier learns the same kind of task either
way: which package a piece of code comes from.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
import textwrap
import time
import zlib
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaProducer

from schemas.records import BatchSample, CuratedBatch
from sluice.settings import Settings
from streams.connections import kafka_client_options
from streams.serde import encode

DIM = 384
#: Package → functions taken: unequal, so the majority class is a real baseline.
PACKAGES = {"asyncio": 400, "xml": 300, "multiprocessing": 240, "email": 180, "importlib": 140,
            "unittest": 100}
_WORD = re.compile(r"[A-Za-z][a-z]+|[A-Z]+(?![a-z])|\d+")


@cache
def stdlib_functions(scale: float = 1.0, max_chars: int = 1500) -> tuple[dict[str, str], ...]:
    """Distinct function sources (id, label, content) from ``PACKAGES`` (``scale`` times as
    many of each), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    for package, wanted in PACKAGES.items():
        per_package, found = round(wanted * scale), 0
        for path in sorted((root / package).rglob("*.py")):
            if "test" in path.relative_to(root).parts[1:] or found >= per_package:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            lines = text.splitlines(keepends=True)
            for node in ast.walk(tree):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                # Whole lines of the definition (ast.get_source_segment re-splits the
                # file on every call: minutes over the standard library).
                source = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
                if len(source) < 120 or source in seen or found >= per_package:
                    continue
                seen.add(source)
                found += 1
                digest = hashlib.sha256(source.encode()).hexdigest()
                out.append({"id": f"{package}-{digest[:16]}", "label": package,
                            "content": source[:max_chars]})
    return tuple(out)


def featurize(text: str, dim: int = DIM) -> np.ndarray:
    """Signed feature hashing of lower-cased words and word pairs, sublinear counts, L2."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = words + [f"{a} {b}" for a, b in pairwise(words)]
    vec = np.zeros(dim, dtype=np.float64)
    for gram in grams:
        h = zlib.crc32(gram.encode())
        vec[h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    vec = np.sign(vec) * np.log1p(np.abs(vec))
    norm = np.linalg.norm(vec)
    return (vec / norm if norm else vec).astype("<f2")


def batch_samples(records: list[dict[str, str]], content_chars: int) -> list[BatchSample]:
    """BatchSamples with hashed embeddings (content cut to ``content_chars`` on the wire)."""
    return [
        BatchSample(
            id=r["id"], label=r["label"], kind="CODE", source=f"stdlib:{r['label']}",
            content=r["content"][:content_chars], embedding=featurize(r["content"]).tobytes(),
            embedding_dim=DIM, weight=1.0, replay=False,
        )
        for r in records
    ]


def make_batches(
    samples: list[BatchSample], n_batches: int, batch_size: int, partitions: int, seed: int = 0
) -> list[CuratedBatch]:
    """Class-balanced batches (label drawn uniformly, then a sample of it), round-robin
    over ``partitions``; ids ``<partition>-<sequence>-<digest>`` as the balance stage makes."""
    rng = random.Random(seed)
    by_label: dict[str, list[BatchSample]] = {}
    for s in samples:
        by_label.setdefault(s["label"], []).append(s)
    labels = sorted(by_label)
    batches: list[CuratedBatch] = []
    sequence = [0] * partitions
    for i in range(n_batches):
        part = i % partitions
        chosen = [rng.choice(by_label[rng.choice(labels)]) for _ in range(batch_size)]
        digest = hashlib.sha256("".join(s["id"] for s in chosen).encode()).hexdigest()
        batches.append(CuratedBatch(
            batch_id=f"{part}-{sequence[part]}-{digest[:12]}", partition=part,
            sequence=sequence[part], created_at=int(time.time() * 1000), policy="inverse",
            samples=chosen, class_shares={lb: 1 / len(labels) for lb in labels},
            target_shares={lb: 1 / len(labels) for lb in labels}, difficulty={},
            content_digest=digest,
        ))
        sequence[part] += 1
    return batches


def with_topics(settings: Settings, **topics: Any) -> Settings:
    """A copy of ``settings`` with some topic names replaced."""
    return settings.model_copy(update={"topics": settings.topics.model_copy(update=topics)})


def produce(settings: Settings, topic: str, batches: list[CuratedBatch]) -> None:
    """Write ``batches`` to ``topic``, each to its own partition, and wait for the acks."""
    producer = KafkaProducer(**kafka_client_options(settings.kafka), linger_ms=5,
                             max_request_size=8 * 1024 * 1024)
    try:
        for b in batches:
            producer.send(topic, key=b["batch_id"].encode(), value=encode("CuratedBatch", b),
                          partition=b["partition"])
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)
