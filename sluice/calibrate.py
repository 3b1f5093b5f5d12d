"""``sluice calibrate CORPUS``: choose each dedup layer's threshold on the user's own data.

A sample of the user's files (folders, files or JSONL, read as ``sluice produce`` reads
them; byte-identical ones and what the quality rules reject left out) gets planted copies
(``agents.planting``: renamed, stripped, reformatted, reordered, edited). Then, per layer:

- **words** and **code tokens**: every record's MinHash signature, computed by the
  product's own ``FuzzyIndex`` (shingling, permutations and tokenizer as configured), in a
  throwaway Redis namespace; the estimated Jaccard of every pair; for each threshold of a
  grid, the copies caught (by an earlier distinct file at or above it) and the distinct
  files dropped, deciding in stream order as the index does (a file is dropped when a
  file kept before it is at or above the threshold);
- **semantic** (when ``dedup.enabled``): every record is embedded by each backend
  (``torch`` fp32 is the reference) and decided in stream order by cosine; torch's
  threshold is the one that adds the most copies to those the fuzzy layers caught within
  the loss budget, and each other backend's is the one whose keep/drop decisions agree
  most with torch's at torch's threshold.

"Lost" is the share of distinct files a threshold drops beyond those it drops at the
strictest threshold of its grid (there, only near-identical files go: duplicates by any
reading, which real corpora have). A layer's threshold is the one that catches the most
copies while losing at most ``max_lost`` of the distinct files (ties: the stricter).

Finally the chosen fuzzy settings run through the product's pipeline (``build_pipeline``,
stage ``ingest``) over the distinct files and then the copies, in another throwaway
namespace: the "verified" line is what the worker would do. The chosen settings are
written to a TOML file (never over an existing one without ``force``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agents.code_tokens import CodeDoc
from agents.config import DedupSettings
from agents.fuzzy_index import FuzzyIndex, LayerSettings
from agents.pipeline import build_pipeline
from agents.planting import EDITS, Event, gather, planted
from agents.shingling import CODE_TOKENS, WORDS, Shingling
from agents.step import Coords, Item
from agents.validate import Validate
from schemas.errors import SluiceError
from sluice.settings import Settings
from streams.connections import redis_client

FUZZY_GRID = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))  # 0.50 … 0.95
SEMANTIC_GRID = tuple(round(0.94 + 0.005 * k, 3) for k in range(11))  # 0.940 … 0.990
#: Where the other backends look for their agreement with torch: higher too, since a
#: cruder model (static) puts unrelated files closer and agrees only near 0.9975.
AGREEMENT_GRID = (*SEMANTIC_GRID, 0.9925, 0.995, 0.9975, 0.999)
DUPLICATE_REASONS = {"exact_duplicate", "near_duplicate", "semantic_duplicate"}
FIELDS = ("id", "source", "kind", "language", "label", "content")
#: Agreement with torch at which a faster backend may replace it (issue 11).
AGREEMENT_FOR_DEFAULT = 0.99
#: The embedding backends it can compare (``dedup.backend`` values but ``auto``).
BACKENDS = ("torch", "onnx", "onnx-int8", "static")


class CalibrationError(SluiceError):
    """The corpus cannot be calibrated on (too few usable files) or the output exists."""


@dataclass(frozen=True, slots=True)
class Point:
    """One threshold of one layer: copies caught per edit kind and overall, the share of
    distinct files dropped, and of those the share beyond the strictest threshold."""

    threshold: float
    recall: dict[str, float]
    caught: float
    dropped: float
    lost: float
    agreement: float | None = None


#: (words threshold, code threshold or None, the two layers together).
Pair = tuple[float, float | None, Point]


@dataclass(slots=True)
class Calibration:
    """Everything the command measured and chose."""

    distinct: int
    copies: dict[str, int]
    sweeps: dict[str, list[Point]] = field(default_factory=dict)
    chosen: dict[str, Point] = field(default_factory=dict)
    verified: dict[str, Any] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    combined: Point | None = None
    #: backend -> (torch's configured threshold, the backend's best threshold against it,
    #: their keep/drop agreement)
    at_configured: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    backend: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def settings(self) -> dict[str, dict[str, Any]]:
        """The chosen settings, by section (what is written to the TOML file)."""
        out: dict[str, dict[str, Any]] = {}
        if "words" in self.chosen:
            out["fuzzy"] = {"threshold": self.chosen["words"].threshold}
        if "code-tokens" in self.chosen:
            out["fuzzy.code"] = {"threshold": self.chosen["code-tokens"].threshold}
        if self.backend is not None:
            out["dedup"] = {"backend": self.backend,
                            "threshold": self.chosen[f"semantic:{self.backend}"].threshold}
        return out


# -- pure parts: similarities, stream-order decisions, the choice ------------------------------


def minhash_similarity(a: np.ndarray, b: np.ndarray, block: int = 64) -> np.ndarray:
    """Estimated Jaccard of every row of ``a`` with every row of ``b`` (signatures, one a
    row; a row of all-max values stands for "no signature" and matches nothing)."""
    out = np.zeros((len(a), len(b)), dtype=np.float32)
    if not len(a) or not len(b):
        return out
    for start in range(0, len(a), block):
        part = a[start:start + block, None, :] == b[None, :, :]
        out[start:start + block] = part.mean(axis=2)
    empty = np.uint32(np.iinfo(np.uint32).max)
    out[(a == empty).all(axis=1)] = 0.0
    out[:, (b == empty).all(axis=1)] = 0.0
    return out


def stream_keep(sims: np.ndarray, threshold: float) -> np.ndarray:
    """Stream-order admission over a square similarity matrix: item i is kept unless an
    item kept before it is at or above ``threshold`` (what the indexes do)."""
    keep = np.zeros(len(sims), dtype=bool)
    for i in range(len(sims)):
        keep[i] = not (sims[i, :i][keep[:i]] >= threshold).any()
    return keep


@dataclass(frozen=True, slots=True)
class Decisions:
    """One layer's stream-order decisions at each threshold of its grid: which distinct
    files it keeps, which copies it catches."""

    keep: dict[float, np.ndarray]
    caught: dict[float, np.ndarray]

    @property
    def strict_drop(self) -> np.ndarray:
        """The distinct files dropped at the strictest threshold (near-identical ones)."""
        return ~self.keep[max(self.keep)]


def decide(grid: Sequence[float], distinct_sims: np.ndarray, copy_sims: np.ndarray
           ) -> Decisions:
    """A layer's decisions at each threshold: ``distinct_sims`` is distinct × distinct,
    ``copy_sims`` copies × distinct (a copy is caught by a kept distinct file)."""
    keep: dict[float, np.ndarray] = {}
    caught: dict[float, np.ndarray] = {}
    for threshold in grid:
        keep[threshold] = stream_keep(distinct_sims, threshold)
        caught[threshold] = np.asarray((copy_sims[:, keep[threshold]] >= threshold).any(axis=1))
    return Decisions(keep, caught)


def point(threshold: float, keep: np.ndarray, caught: np.ndarray, strict_drop: np.ndarray,
          edits: Sequence[str], agreement: float | None = None) -> Point:
    """The ``Point`` of one decision: recall per edit kind and overall, dropped, lost."""
    kinds = np.array(edits)
    recall = {kind: float(caught[kinds == kind].mean()) for kind in dict.fromkeys(edits)}
    total = max(len(keep), 1)
    return Point(threshold, recall, float(caught.mean()) if len(caught) else 0.0,
                 float((~keep).sum() / total), float((~keep & ~strict_drop).sum() / total),
                 agreement)


def layer_points(decisions: Decisions, edits: Sequence[str]) -> list[Point]:
    """One ``Point`` per threshold of a layer alone."""
    strict = decisions.strict_drop
    return [point(t, decisions.keep[t], decisions.caught[t], strict, edits)
            for t in decisions.keep]


def pair_points(words: Decisions, code: Decisions | None, edits: Sequence[str]) -> list[Pair]:
    """(words threshold, code threshold, the two layers together) for every pair of the
    grids; the point's threshold is the words one, "lost" beyond both strictest."""
    code_grid: list[float | None] = list(code.keep) if code is not None else [None]
    strict = words.strict_drop | (code.strict_drop if code is not None else False)
    pairs: list[Pair] = []
    for tw in words.keep:
        for tc in code_grid:
            keep, caught = words.keep[tw], words.caught[tw]
            if code is not None and tc is not None:
                keep, caught = keep & code.keep[tc], caught | code.caught[tc]
            pairs.append((tw, tc, point(tw, keep, caught, strict, edits)))
    return pairs


def choose_pair(pairs: Sequence[Pair], max_lost: float) -> Pair:
    """The pair that catches the most copies losing at most ``max_lost`` of the distinct
    files (ties: the stricter, the code layer's first); the strictest when none is
    within the budget."""
    def rank(pair: Pair) -> tuple[float, float, float]:
        tw, tc, p = pair
        feasible = p.lost <= max_lost
        return (float(feasible), round(p.caught, 9) if feasible else 0.0,
                tw + 1.001 * (tc or 0.0))

    return max(pairs, key=rank)


def choose(points: Sequence[Point], max_lost: float) -> Point:
    """The threshold that catches the most copies losing at most ``max_lost`` of the
    distinct files (ties: the stricter); the strictest when none is within the budget."""
    within = [p for p in points if p.lost <= max_lost]
    if not within:
        return max(points, key=lambda p: p.threshold)
    return max(within, key=lambda p: (round(p.caught, 9), p.threshold))


def semantic_points(grid: Sequence[float], sims: np.ndarray, distinct: int,
                    fuzzy_caught: np.ndarray, edits: Sequence[str],
                    reference: np.ndarray | None) -> tuple[list[Point], dict[float, np.ndarray]]:
    """One backend's sweep over every record: ``sims`` is (distinct files, then copies) ×
    the same; a copy counts as caught when the fuzzy layers (``fuzzy_caught``) or the
    embedding caught it, "dropped" and "lost" are the embedding's own on the distinct
    files; ``reference`` is torch's keep/drop of every record at its chosen threshold (None:
    torch itself, no agreement yet). Points, and the keep/drop at each threshold."""
    strict = ~stream_keep(sims, max(grid))[:distinct]
    points, decisions = [], {}
    for threshold in grid:
        keep = stream_keep(sims, threshold)
        caught = fuzzy_caught | ~keep[distinct:]
        agree = None if reference is None else float((keep == reference).mean())
        points.append(point(threshold, keep[:distinct], caught, strict, edits, agree))
        decisions[threshold] = keep
    return points, decisions


def semantic_grid(backend: str) -> tuple[float, ...]:
    """The thresholds a backend is swept over: torch's grid (whose strictest threshold is
    what "lost" is measured against), wider for the others (``AGREEMENT_GRID``)."""
    return SEMANTIC_GRID if backend == "torch" else AGREEMENT_GRID


def closest_agreement(points: Sequence[Point], reference: float) -> Point:
    """The point of highest agreement with torch (ties: the threshold nearest torch's)."""
    return max(points, key=lambda p: (p.agreement or 0.0, -abs(p.threshold - reference)))


# -- running the product -----------------------------------------------------------------------


@contextmanager
def _namespace(client: redis.Redis) -> Iterator[str]:
    """A throwaway namespace whose keys are deleted afterwards."""
    namespace = f"calibrate-{uuid.uuid4().hex}"
    try:
        yield namespace
    finally:
        keys = list(client.scan_iter(match=f"sluice:*{namespace}*", count=1000))
        for start in range(0, len(keys), 500):
            for key in keys[start:start + 500]:  # one by one: keys of many cluster slots
                client.delete(key)


def _item(event: Event, offset: int) -> Item:
    return Item(json.dumps({f: event.get(f) for f in FIELDS}).encode(),
                Coords("calibrate", 0, offset))


def admitted(settings: Settings, events: list[Event]) -> list[Event]:
    """The events the product's validation and quality rules pass (``Validate``): copies
    of a file the quality rules reject say nothing about the dedup layers."""
    outcomes = Validate(settings.ingest).process([_item(e, k) for k, e in enumerate(events)])
    return [e for e, o in zip(events, outcomes, strict=True) if not o.rejected]


def signatures(index: FuzzyIndex, events: Sequence[Event], tick: Callable[[], None]
               ) -> np.ndarray:
    """The layer's MinHash signature of each event, computed by the product's index
    (all-max rows: no shingle, or a kind the layer does not see)."""
    out = np.full((len(events), index.settings.num_perm), np.iinfo(np.uint32).max,
                  dtype=np.uint32)
    for k, event in enumerate(events):
        tick()
        if index.shingling is CODE_TOKENS and event.get("kind") != "CODE":
            continue
        doc: str | CodeDoc = (CodeDoc(event["content"], event.get("language"),
                                      event.get("source"))
                              if index.shingling is CODE_TOKENS else event["content"])
        sig = index.hasher.from_hashes(index.shingling.hashes(index.hasher, doc))
        if sig is not None:
            out[k] = sig
    return out


def calibrate(settings: Settings, paths: Sequence[Path], *, limit: int = 300,
              originals: int = 60, max_lost: float = 0.005, semantic: bool | None = None,
              backends: Sequence[str] = ("torch", "onnx-int8"), seed: int = 0,
              console: Console | None = None) -> Calibration:
    """Plant, sweep, choose and verify (see the module doc); prints the tables."""
    console = console or Console(stderr=True)
    semantic = settings.dedup.enabled if semantic is None else semantic
    started = time.perf_counter()
    with console.status("reading the corpus"):
        found = gather(list(paths), limit, settings.produce.max_file_bytes, seed=seed)
        distinct = admitted(settings, found)
    if len(distinct) < 10:
        raise CalibrationError(f"only {len(distinct)} usable distinct records under "
                               f"{', '.join(map(str, paths))} (of {len(found)} read): "
                               "calibration needs at least 10")
    step = max(1, len(distinct) // originals)
    sources = distinct[::step][:originals]
    copies = [c for kind in EDITS for c in planted(sources, kind, seed)]
    edits = [c["id"].split(":", 1)[0] for c in copies]
    result = Calibration(len(distinct), {k: edits.count(k) for k in EDITS})
    console.print(f"{len(distinct)} distinct records ({len(found) - len(distinct)} rejected "
                  f"by the quality rules); {len(copies)} planted copies of {len(sources)}")
    if len(distinct) * max_lost < 1:
        console.print(f"[yellow]{len(distinct)} records cannot resolve a loss of "
                      f"{max_lost:.2%}: any loss exceeds it (more records: --limit)")
    if not settings.fuzzy.enabled:
        raise CalibrationError("fuzzy.enabled is false: nothing to calibrate the fuzzy "
                               "layers on")

    client = redis_client(settings.redis)
    try:
        with _namespace(client) as ns, _progress(console) as progress:
            words = _fuzzy_layer(client, ns, "words", settings.fuzzy, WORDS, distinct,
                                 copies, edits, progress, result)
            code = (_fuzzy_layer(client, ns, "code-tokens", settings.fuzzy.code, CODE_TOKENS,
                                 distinct, copies, edits, progress, result)
                    if settings.fuzzy.code.enabled else None)
            result.pairs = pair_points(words, code, edits)
            tw, tc, combined = choose_pair(result.pairs, max_lost)
            result.chosen["words"] = _at(result.sweeps["words"], tw)
            if tc is not None:
                result.chosen["code-tokens"] = _at(result.sweeps["code-tokens"], tc)
            result.combined = combined
            caught = words.caught[tw]
            if code is not None and tc is not None:
                caught = caught | code.caught[tc]
            result.seconds["fuzzy"] = time.perf_counter() - started
            if semantic:
                _semantic(settings, distinct, copies, edits, caught, backends, max_lost,
                          progress, result)
                result.seconds["semantic"] = time.perf_counter() - started
            result.verified = _verify(settings, client, result, distinct, copies, edits,
                                      progress)
    finally:
        client.close()
    result.seconds["total"] = time.perf_counter() - started
    show(console, result)
    return result


def _at(points: Sequence[Point], threshold: float) -> Point:
    return next(p for p in points if p.threshold == threshold)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=None),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def _fuzzy_layer(client: redis.Redis, ns: str, name: str, layer: LayerSettings,
                 shingling: Shingling, distinct: list[Event], copies: list[Event],
                 edits: list[str], progress: Progress, result: Calibration) -> Decisions:
    """One fuzzy layer's signatures (by the product's index) and its decisions at each
    threshold of the grid; its points (the layer alone) go into ``result.sweeps``."""
    index = FuzzyIndex(client, f"{ns}-{name}", layer, shingling=shingling)
    task = progress.add_task(f"{name} signatures", total=len(distinct) + len(copies))
    sigs = signatures(index, [*distinct, *copies], lambda: progress.advance(task))
    sig_d, sig_c = sigs[: len(distinct)], sigs[len(distinct):]
    decisions = decide(FUZZY_GRID, minhash_similarity(sig_d, sig_d),
                       minhash_similarity(sig_c, sig_d))
    result.sweeps[name] = layer_points(decisions, edits)
    return decisions


def _semantic(settings: Settings, distinct: list[Event], copies: list[Event],
              edits: list[str], caught: np.ndarray,
              backends: Sequence[str], max_lost: float, progress: Progress,
              result: Calibration) -> None:
    """Embed every record with each backend; torch's threshold by the copies it adds to
    the fuzzy layers' within the loss budget, each other backend's by keep/drop agreement
    with torch at torch's threshold."""
    from agents.embed import Embedder

    # Every record, not only what the fuzzy layers left: the keep/drop agreement of two
    # backends is about the embedding, and near-threshold pairs are among the copies.
    texts = [e["content"] for e in [*distinct, *copies]]
    reference: np.ndarray | None = None
    torch_threshold = settings.dedup.threshold
    configured = min(SEMANTIC_GRID, key=lambda t: abs(t - settings.dedup.threshold))
    at_configured: np.ndarray | None = None
    for backend in ("torch", *[b for b in backends if b != "torch"]):
        dedup = DedupSettings(**{**settings.dedup.model_dump(), "backend": backend,
                                 "device": "cpu"})
        embedder = Embedder(dedup, threads=dedup.torch_threads or None)
        task = progress.add_task(f"embedding ({backend})", total=len(texts))
        vectors = []
        for start in range(0, len(texts), 16):
            vectors.append(embedder.encode(texts[start:start + 16]))
            progress.advance(task, len(texts[start:start + 16]))
        matrix = np.vstack(vectors) if vectors else np.zeros((0, embedder.dim))
        points, decisions = semantic_points(semantic_grid(backend), matrix @ matrix.T,
                                            len(distinct), caught, edits, reference)
        if reference is None:  # torch: the reference, chosen by recall within the budget
            torch_threshold = choose(points, max_lost).threshold
            reference, at_configured = decisions[torch_threshold], decisions[configured]
            points = [Point(p.threshold, p.recall, p.caught, p.dropped, p.lost,
                            float((decisions[p.threshold] == reference).mean()))
                      for p in points]
            best = _at(points, torch_threshold)
        else:
            best = closest_agreement(points, torch_threshold)
            # And at the configured threshold (the default's operating point), which the
            # chosen one may not be when the fuzzy layers leave the model nothing to add.
            assert at_configured is not None
            agree = {t: float((keep == at_configured).mean()) for t, keep in decisions.items()}
            near = max(agree, key=lambda t: (agree[t], -abs(t - configured)))
            result.at_configured[backend] = (configured, near, agree[near])
        result.sweeps[f"semantic:{backend}"] = points
        result.chosen[f"semantic:{backend}"] = best
    fast = [b for b in backends if b != "torch"
            and (result.chosen[f"semantic:{b}"].agreement or 0.0) >= AGREEMENT_FOR_DEFAULT]
    result.backend = fast[0] if fast else "torch"


def _verify(settings: Settings, client: redis.Redis, result: Calibration,
            distinct: list[Event], copies: list[Event], edits: list[str],
            progress: Progress) -> dict[str, Any]:
    """The chosen fuzzy thresholds through the product's ingest pipeline."""
    chosen = result.settings()
    fuzzy = settings.fuzzy.model_copy(update={
        **chosen.get("fuzzy", {}),
        "code": settings.fuzzy.code.model_copy(update=chosen.get("fuzzy.code", {}))})
    tuned = settings.model_copy(update={"fuzzy": fuzzy})
    events = [*distinct, *copies]
    task = progress.add_task("verifying (ingest pipeline)", total=len(events))
    outcomes = []
    with _namespace(client) as ns:
        pipeline = build_pipeline(tuned, client, stages=["ingest"], namespace=ns)
        batch = settings.ingest.batch_size
        began = time.perf_counter()
        for start in range(0, len(events), batch):
            part = events[start:start + batch]
            outcomes += pipeline.run([_item(e, start + k) for k, e in enumerate(part)])
            progress.advance(task, len(part))
        seconds = time.perf_counter() - began
    dup = np.array([o.reason in DUPLICATE_REASONS for o in outcomes])
    kinds = np.array(edits)
    tail = dup[len(distinct):]
    return {"recall": {k: float(tail[kinds == k].mean()) for k in dict.fromkeys(edits)},
            "caught": float(tail.mean()) if len(tail) else 0.0,
            "dropped": float(dup[: len(distinct)].mean()),
            "records_per_s": len(events) / max(seconds, 1e-9),
            "parts_s": pipeline.seconds()}


# -- output ----------------------------------------------------------------------------------


SHORT = {"rename": "rename", "strip": "strip", "rename+strip": "ren+str",
         "reformat": "reform", "reorder": "reorder", "edit": "edit"}


def show(console: Console, result: Calibration) -> None:
    """One table per layer (a line per threshold, the chosen one marked), the combined
    choice, the verified line and the backend chosen. Shares in %."""
    for name, points in result.sweeps.items():
        semantic = name.startswith("semantic")
        what = ("copies caught with the fuzzy layers; its own drops; agreement with torch "
                "at torch's threshold" if semantic
                else "copies caught by this layer alone")
        table = Table(title=f"{name}: {what}, distinct files dropped and lost (%)",
                      title_justify="left")
        for column in ("thr", *SHORT.values(), "all", "drop", "lost",
                       *(["agree"] if semantic else []), ""):
            table.add_column(column, justify="right")
        for p in points:
            chosen = p is result.chosen.get(name)
            table.add_row(f"{p.threshold:g}", *[_pct(p.recall.get(k)) for k in SHORT],
                          _pct(p.caught), _pct(p.dropped), _pct(p.lost),
                          *([_pct(p.agreement)] if semantic else []), "◀" if chosen else "",
                          style="bold green" if chosen else None)
        console.print(table)
    if result.combined is not None:
        c = result.combined
        layers = ", ".join(f"{n} {p.threshold:g}" for n, p in result.chosen.items()
                           if not n.startswith("semantic"))
        console.print(f"chosen fuzzy thresholds: {layers}; together they catch "
                      + ", ".join(f"{SHORT[k]} {_pct(r)}" for k, r in c.recall.items())
                      + f" (all {_pct(c.caught)} %), losing {_pct(c.lost)} % of the distinct "
                      "files")
    if result.verified:
        v = result.verified
        console.print("verified through the ingest pipeline: "
                      + ", ".join(f"{SHORT[k]} {_pct(r)}" for k, r in v["recall"].items())
                      + f" (all {_pct(v['caught'])} %); distinct dropped "
                      f"{_pct(v['dropped'])} %; {v['records_per_s']:.0f} records/s")
    if result.backend is not None:
        agreement = {b.split(":", 1)[1]: p for b, p in result.chosen.items()
                     if b.startswith("semantic:") and not b.endswith(":torch")}
        console.print(f"semantic backend: {result.backend} (another backend replaces torch "
                      f"when its keep/drop agreement at its threshold is ≥ "
                      f"{AGREEMENT_FOR_DEFAULT:.0%}: "
                      + (", ".join(f"{b} {_pct(p.agreement)} % at {p.threshold:g}"
                                   for b, p in agreement.items()) or "none compared") + ")")
        for backend, (torch_at, own, agree) in result.at_configured.items():
            console.print(f"against torch at the configured threshold {torch_at:g}: {backend} "
                          f"agrees {_pct(agree)} % at {own:g}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_toml(result: Calibration, out: Path, *, force: bool = False,
               sources: Sequence[Path] = ()) -> Path:
    """The chosen settings as a TOML file; an existing file only with ``force``."""
    if out.exists() and not force:
        raise CalibrationError(f"{out} exists: pass --force to overwrite it, or --out "
                               "another file")
    lines = [f"# chosen by `sluice calibrate` on {time.strftime('%Y-%m-%d %H:%M')} from "
             f"{result.distinct} records of {', '.join(map(str, sources)) or 'the corpus'}",
             "# and planted copies of them; merge these sections into your settings file."]
    for section, values in result.settings().items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
