"""Recall of the dedup layers on edited copies of real code, per edit kind and per layer.

``python -m bench.clones [--quick] [--semantic]``

Corpus: real source files of this machine in six languages (Python from site-packages, C
headers from /usr/include, Go from the Go toolchain's sources, JavaScript from node and
/usr/share/javascript, Perl from /usr/share/perl, shell scripts from /usr and /etc), 1.5 to
30 kB each, byte-identical files and minified ones (a line over 400 characters) left out,
the language detected by ``streams.sources.detect_language`` as ``sluice produce`` does.

Edits (``agents.planting``, the same that ``sluice calibrate`` plants in the user's files),
each applied to a sample of the files (a copy the edit leaves unchanged, e.g. a strip of a
file without comments, is not planted):

- ``rename``: every identifier renamed consistently (a pygments ``Name`` token that is not a
  builtin, as a refactoring tool renames: strings and comments untouched);
- ``strip``: comments (not preprocessor lines or ``#!``) and docstrings removed;
- ``rename+strip``: both;
- ``reformat``: indentation halved (tabs to 4 spaces first), the space after commas removed;
- ``reorder``: top-level blocks (a line at column 0 after a blank line starts one) shuffled,
  the first (the file's header) kept in place;
- ``edit``: a few lines deleted, a line of another file inserted, a line repeated
  (``agents.planting.near_copy``).

For each edit kind, a fresh namespace receives every distinct file, then the copies, through
sluice's own pipeline (``build_pipeline`` with stages ``ingest``; ``--semantic`` adds the
``dedup`` stage and its model), in micro-batches of ``ingest.batch_size``. A copy's layer is
the one that rejected it: exact digest, word-shingle MinHash (``words``), code-token MinHash
(``code-tokens``), or the embedding (``semantic``). "Distinct dropped" is the share of the
distinct files rejected as a duplicate of another one (they can be real near-copies: the
JSON lists each with what it matched). The baseline is today's word layer: the recall of
exact + words, and the ingest throughput with ``fuzzy.code.enabled = false``, both measured
in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
import uuid
from collections import Counter
from itertools import zip_longest
from pathlib import Path
from typing import Any

from agents.planting import EDITS, planted
from bench.common import SITE, console, private_redis, show, write_result

ROOTS: dict[str, tuple[list[Path], tuple[str, ...]]] = {
    "python": ([SITE], (".py",)),
    "c": ([Path("/usr/include")], (".h",)),
    "go": ([Path("/usr/local/go/src")], (".go",)),
    "javascript": ([Path("/usr/lib/node_modules"), Path("/usr/share/javascript"),
                    Path("/usr/share/nodejs")], (".js",)),
    "perl": ([Path("/usr/share/perl"), Path("/usr/lib/x86_64-linux-gnu/perl")], (".pm", ".pl")),
    "shell": ([Path("/usr/lib"), Path("/usr/share"), Path("/usr/local"), Path("/etc")],
              (".sh",)),
}
LAYERS = ("exact", "words", "code-tokens", "semantic")
DUPLICATE_REASONS = {"exact_duplicate", "near_duplicate", "semantic_duplicate"}
MIN_BYTES, MAX_BYTES, MAX_LINE = 1500, 30_000, 400


# -- the corpus ------------------------------------------------------------------------------


def language_files(language: str, limit: int, rng: random.Random) -> list[Path]:
    """Up to ``limit`` files of ``language`` under its roots, sampled with ``rng``."""
    roots, suffixes = ROOTS[language]
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found.extend(p for p in root.rglob("*") if p.suffix in suffixes
                         and "test" not in p.name and p.is_file()
                         and MIN_BYTES <= p.stat().st_size <= MAX_BYTES)
    found.sort()
    rng.shuffle(found)
    return found[: 4 * limit]  # more than needed: some are unreadable, minified or copies


def corpus(per_language: int, seed: int) -> list[dict[str, Any]]:
    """Distinct real files as events (id, source, kind, language, label, content), in
    stream order: the languages interleaved."""
    from streams.sources import detect_language

    rng = random.Random(seed)
    seen: set[str] = set()
    by_language: dict[str, list[dict[str, Any]]] = {}
    for language in ROOTS:
        picked = by_language.setdefault(language, [])
        for path in language_files(language, per_language, rng):
            if len(picked) == per_language:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha256(text.strip().encode()).hexdigest()
            detected = detect_language(path, text[:200])
            if (digest in seen or detected is None or detected[1] != "CODE"
                    or max(map(len, text.splitlines() or [""])) > MAX_LINE):
                continue
            seen.add(digest)
            picked.append({"id": f"{language}:{path}", "source": str(path), "kind": "CODE",
                           "language": detected[0], "label": detected[0], "content": text})
    groups = zip_longest(*by_language.values())
    stream = [e for group in groups for e in group if e is not None]
    return stream


# -- the edits (the workload, not what is measured): agents.planting ----------------------


# -- running the product ---------------------------------------------------------------------


def layer_of(outcome: Any) -> str | None:
    """Which layer rejected an outcome as a duplicate (None: kept, or another reason)."""
    reason = outcome.reason
    if reason == "exact_duplicate":
        return "exact"
    if reason == "semantic_duplicate":
        return "semantic"
    if reason == "near_duplicate":
        return str(outcome.record["detail"]).split(":", 1)[0]
    return None


def run_pipeline(client: Any, settings: Any, events: list[dict[str, Any]], semantic: bool,
                 embedder: Any = None) -> tuple[list[Any], float, dict[str, float]]:
    """The events through ``build_pipeline`` in micro-batches, in a fresh namespace;
    (outcomes, seconds, seconds per step)."""
    from agents.pipeline import build_pipeline
    from agents.step import Coords, Item

    stages = ["ingest", "dedup"] if semantic else ["ingest"]
    pipeline = build_pipeline(settings, client, stages=stages, namespace=uuid.uuid4().hex,
                              embedder=embedder)
    fields = ("id", "source", "kind", "language", "label", "content")
    batch = settings.ingest.batch_size
    outcomes: list[Any] = []
    started = time.perf_counter()
    for start in range(0, len(events), batch):
        items = [Item(json.dumps({f: e[f] for f in fields}).encode(),
                      Coords("bench", 0, start + k))
                 for k, e in enumerate(events[start:start + batch])]
        outcomes.extend(pipeline.run(items))
    return outcomes, time.perf_counter() - started, pipeline.seconds()


def run(quick: bool, semantic: bool, seed: int = 0) -> dict[str, Any]:
    """Every edit kind in its own namespace; the table and bench/results/clones[-quick].json."""
    from sluice.settings import load_settings

    per_language, planted_per_language = (25, 10) if quick else (100, 40)
    distinct = corpus(per_language, seed)
    languages = Counter(e["language"] for e in distinct)
    settings = load_settings(dedup={"enabled": semantic, "torch_threads": 1})
    embedder = None
    if semantic:
        from agents.pipeline import load_embedder

        embedder = load_embedder(settings)
    baseline_settings = load_settings(dedup={"enabled": False},
                                      fuzzy={"code": {"enabled": False}})

    rows, per_kind = [], {}
    dropped: dict[str, Any] = {}
    throughput: dict[str, float] = {}
    with private_redis() as client:
        base, base_s, _ = run_pipeline(client, baseline_settings, distinct, False)
        throughput["words only"] = len(distinct) / base_s
        # Copies are planted only of files the pipeline admits: a copy of a file that the
        # quality rules reject says nothing about the dedup layers.
        admitted = [e for e, o in zip(distinct, base, strict=True) if not o.rejected]
        sample = [e for lang in languages for e in
                  [d for d in admitted if d["language"] == lang][:planted_per_language]]
        console.print(f"{len(distinct)} distinct files ({dict(languages)}), "
                      f"{len(admitted)} admitted; copies of {len(sample)} per edit kind")
        for kind in EDITS:
            copies = planted(sample, kind, seed)
            outcomes, seconds, parts = run_pipeline(client, settings, distinct + copies,
                                                    semantic, embedder)
            head, tail = outcomes[: len(distinct)], outcomes[len(distinct):]
            if kind == EDITS[0]:
                throughput["words + code"] = len(distinct + copies) / (
                    seconds - parts.get("semantic", 0.0) - parts.get("embed", 0.0)
                    - parts.get("admit", 0.0))
                dropped = drops(distinct, head)
                quality_distinct = sum(bool(o.reason and o.reason.startswith("quality"))
                                       for o in head)
            by_layer = Counter(layer_of(o) for o in tail)
            of_original = sum(layer_of(o) is not None and o.record["duplicate_of"] ==
                              c["original"] for o, c in zip(tail, copies, strict=True))
            quality = sum(bool(o.reason and o.reason.startswith("quality")) for o in tail)
            n = len(copies)
            recall = {layer: by_layer[layer] / max(n, 1) for layer in LAYERS}
            caught = sum(by_layer[layer] for layer in LAYERS)
            baseline = (by_layer["exact"] + by_layer["words"]) / max(n, 1)
            per_kind[kind] = {"copies": n, "caught": caught, "recall": caught / max(n, 1),
                              "baseline_recall": baseline, "by_layer": recall,
                              "of_original": of_original, "quality_rejected": quality,
                              "seconds": seconds, "by_language": by_language(copies, tail)}
            rows.append([kind, n, recall["exact"], recall["words"], recall["code-tokens"],
                         *([recall["semantic"]] if semantic else []), baseline,
                         caught / max(n, 1), f"{caught / max(n * baseline, 1):.2f}x", quality])
    columns = ["edit", "copies", "exact", "words", "code-tokens",
               *(["semantic"] if semantic else []), "exact+words (baseline)", "recall",
               "vs baseline", "quality drops"]
    show("Share of planted copies caught, by the layer that caught them", columns, rows)
    share = dropped["count"] / len(distinct)
    show("Distinct files dropped as duplicates", ["layer", "files", "share"],
         [[layer, n, n / len(distinct)] for layer, n in dropped["by_layer"].items()]
         + [["all", dropped["count"], share]])
    show("Ingest throughput on the distinct files (one core)", ["pipeline", "files/s", "ratio"],
         [["exact + words (baseline)", throughput["words only"], 1.0],
          ["exact + words + code", throughput["words + code"],
           throughput["words + code"] / throughput["words only"]]])
    goal = {"rename>=0.95": per_kind["rename"]["recall"] >= 0.95,
            "strip>=0.95": per_kind["strip"]["recall"] >= 0.95,
            "rename+strip>=0.95": per_kind["rename+strip"]["recall"] >= 0.95,
            "reorder>=0.85": per_kind["reorder"]["recall"] >= 0.85,
            "distinct_dropped<=0.01": share <= 0.01}
    console.print(f"goal: {goal}")
    payload = {"distinct_files": len(distinct), "languages": dict(languages),
               "planted_from": len(sample), "semantic": semantic, "edits": per_kind,
               "distinct_dropped": {**dropped, "share": share},
               "distinct_quality_rejected": quality_distinct,
               "files_per_s": throughput, "goal": goal,
               "settings": {"fuzzy": settings.fuzzy.model_dump()}}
    write_result("clones", quick, payload)
    return payload


def drops(distinct: list[dict[str, Any]], outcomes: list[Any]) -> dict[str, Any]:
    """The distinct files rejected as duplicates: count, by layer, and each with its match."""
    listed = []
    for event, outcome in zip(distinct, outcomes, strict=True):
        layer = layer_of(outcome)
        if layer is not None:
            listed.append({"id": event["id"], "layer": layer,
                           "duplicate_of": outcome.record["duplicate_of"],
                           "similarity": outcome.record["similarity"],
                           "detail": outcome.record["detail"]})
    return {"count": len(listed), "by_layer": dict(Counter(d["layer"] for d in listed)),
            "files": listed}


def by_language(copies: list[dict[str, Any]], outcomes: list[Any]) -> dict[str, Any]:
    """Copies and caught copies per language."""
    out: dict[str, dict[str, int]] = {}
    for copy, outcome in zip(copies, outcomes, strict=True):
        entry = out.setdefault(copy["language"], {"copies": 0, "caught": 0})
        entry["copies"] += 1
        entry["caught"] += layer_of(outcome) is not None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    parser.add_argument("--semantic", action="store_true",
                        help="also the embedding layer (slow on CPU)")
    args = parser.parse_args(argv)
    run(args.quick, args.semantic)


if __name__ == "__main__":
    main()
