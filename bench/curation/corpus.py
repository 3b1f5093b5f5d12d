"""The labelled corpus of real files, its held-out split (before any curation) and the
held-out JSONL the trainer reads (steps 1–2 of ``bench.curated_vs_raw``'s method)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DOCS, SITE, STDLIB

TEXT_CHARS = 1_500
HOLDOUT = 0.15
SEED = 0
# Files per class at most (full run): a long tail, as a crawl of mixed sources has.
CAPS = {"python": 900, "c": 450, "text": 350, "yaml": 200, "javascript": 150, "perl": 110,
        "markdown": 80, "restructuredtext": 60, "shell": 45, "cmake": 35, "css": 24}
QUICK_SCALE = 0.27
# Where each class's files are looked for (a class may also come from elsewhere by name).
ROOTS = [Path("/usr"), SITE]


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
    """The held-out set as ``trainer.evaluate.load_eval_jsonl`` reads it."""
    with path.open("w", encoding="utf-8") as out:
        for i in indexes:
            rec = records[i]
            out.write(json.dumps({
                "id": rec["id"], "label": rec["label"], "kind": rec["kind"],
                "source": rec["source"], "content": rec["content"],
                "embedding": [round(float(x), 5) for x in vectors[i]],
            }) + "\n")
