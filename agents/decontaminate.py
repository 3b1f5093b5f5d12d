"""Decontamination: events that copy a protected document (an evaluation set, held-out
data) are rejected as ``contaminated`` and never reach a batch.

The protected documents live in their own Redis keys (``agents.keys.protected_prefix``),
indexed once by ``ProtectedStore.add`` (``sluice decontaminate``) in the same three layers
as the stream: content digests, the two MinHash-LSH layouts of ``agents.fuzzy`` (word
shingles; identifier-normalized code tokens for CODE) and a vector set of embeddings by
the dedup model. The pipeline only reads them:

- ``Decontaminate`` (ingest, right after ``Validate``): digest, then word shingles, then
  code tokens, so a contaminated event never takes an exact claim or a fuzzy slot;
- ``ProtectedSemantic`` (dedup, before ``SemanticDedup``): ``VSIM`` on the protected set,
  sharing the micro-batch's embeddings with ``SemanticDedup`` (``SharedEncoder``), so the
  model runs once per text.

A rejection names the protected document in ``duplicate_of``; its ``detail`` starts with
the method that matched (``exact:``, ``words:``, ``code-tokens:``, ``semantic:``) and
``similarity`` is the estimate. Thresholds are their own settings (``decontaminate``),
lower than the dedup layers': a leaked test item costs more than a lost sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis

from agents.code_tokens import CodeDoc
from agents.config import CodeFuzzySettings, DecontaminateSettings, FuzzySettings
from agents.fuzzy_index import FuzzyIndex
from agents.keys import protected_code_lsh_prefix, protected_lsh_prefix, protected_prefix
from agents.near_match import FuzzyDecision
from agents.normalize import content_digest, normalize
from agents.semantic import Encoder
from agents.shingling import CODE_TOKENS, WORDS, Shingling
from agents.step import Item, Outcome, Step, rejection
from schemas.errors import SluiceError
from streams.metrics import CONTAMINATED

KINDS = ("CODE", "TEXT")
WRITE_THRESHOLD = 0.99  # the loader's insert: only a near-identical document is left out

PROTECTED_WORDS = replace(WORDS, prefix=protected_lsh_prefix)
PROTECTED_CODE = replace(CODE_TOKENS, prefix=protected_code_lsh_prefix)


class DecontaminateError(SluiceError):
    """The protected indexes cannot be used or loaded (another model, a bad document)."""


@dataclass(frozen=True, slots=True)
class ProtectedDoc:
    """One protected document, as a JSONL line of ``sluice decontaminate`` gives it."""

    id: str
    content: str
    kind: str = "TEXT"
    language: str | None = None

    @classmethod
    def of(cls, obj: Any) -> ProtectedDoc:
        """A document from a decoded JSON value; ``DecontaminateError`` saying what is wrong."""
        if not isinstance(obj, dict):
            raise DecontaminateError("not a JSON object")
        doc_id, content = obj.get("id"), obj.get("content")
        kind = str(obj.get("kind") or "TEXT").upper()
        language = obj.get("language")
        if not isinstance(doc_id, str) or not doc_id.strip():
            raise DecontaminateError("no id (a non-empty string)")
        if not isinstance(content, str) or not content.strip():
            raise DecontaminateError(f"{doc_id}: no content (a non-empty string)")
        if kind not in KINDS:
            raise DecontaminateError(f"{doc_id}: kind {kind!r} is not CODE or TEXT")
        if language is not None and not isinstance(language, str):
            raise DecontaminateError(f"{doc_id}: language is not a string")
        return cls(doc_id, content, kind, language)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What one ``ProtectedStore.add`` did: documents indexed now, and already there."""

    added: int
    already: int


@dataclass(frozen=True, slots=True)
class Hit:
    """A match with a protected document: which, by which method, how close."""

    protected_id: str
    method: str
    similarity: float
    detail: str


class ProtectedStore:
    """The protected documents' indexes in one namespace: ``add`` writes them, the rest
    only reads (the pipeline's steps never write a protected key).

    A fuzzy layer is opened only once its index exists (the loader creates it), because
    opening a ``FuzzyIndex`` records its layout in Redis.
    """

    def __init__(self, client: redis.Redis, namespace: str, settings: DecontaminateSettings,
                 fuzzy: FuzzySettings) -> None:
        self.redis = client
        self.settings = settings
        self.namespace = namespace
        prefix = protected_prefix(namespace)
        self.docs_key, self.exact_key = f"{prefix}:docs", f"{prefix}:exact"
        self.meta_key, self.vset_key = f"{prefix}:meta", f"{prefix}:vset"
        self.words_settings = FuzzySettings(
            threshold=settings.fuzzy_threshold, num_perm=fuzzy.num_perm,
            shingle_words=fuzzy.shingle_words)
        self.code_settings = CodeFuzzySettings(
            threshold=settings.code_threshold, num_perm=fuzzy.code.num_perm,
            shingle_tokens=fuzzy.code.shingle_tokens)
        self._layers: dict[str, FuzzyIndex] = {}

    def __len__(self) -> int:
        return int(self.redis.hlen(self.docs_key))

    # -- reading ---------------------------------------------------------------------------
    def _layer(self, shingling: Shingling, settings: FuzzySettings | CodeFuzzySettings
               ) -> FuzzyIndex | None:
        index = self._layers.get(shingling.method)
        if index is None and self.redis.exists(f"{shingling.prefix(self.namespace)}:meta"):
            index = FuzzyIndex(self.redis, self.namespace, settings, shingling=shingling)
            self._layers[shingling.method] = index
        return index

    def exact(self, digests: Sequence[str]) -> list[str | None]:
        """The protected document with each normalized content digest (None: none)."""
        if not digests:
            return []
        owners = self.redis.hmget(self.exact_key, list(digests))
        return [o.decode() if isinstance(o, bytes) else o for o in owners]

    def near(self, docs: Sequence[tuple[str, str]] | Sequence[tuple[str, CodeDoc]],
             code: bool) -> list[FuzzyDecision] | None:
        """``FuzzyIndex.check`` of each (id, document) against the protected word (or code
        token) layer; None while that layer holds nothing."""
        index = (self._layer(PROTECTED_CODE, self.code_settings) if code
                 else self._layer(PROTECTED_WORDS, self.words_settings))
        return index.check(docs) if index is not None and docs else None

    def nearest(self, vectors: np.ndarray) -> list[tuple[str, float] | None]:
        """The most similar protected embedding of each unit vector and its cosine (None:
        the set is empty)."""
        if not len(vectors) or not self.redis.exists(self.vset_key):
            return [None] * len(vectors)
        pipe = self.redis.pipeline(transaction=False)
        for vector in np.asarray(vectors, dtype="<f4"):
            pipe.execute_command("VSIM", self.vset_key, "FP32", vector.tobytes(), "COUNT", 1,
                                 "WITHSCORES")
        out: list[tuple[str, float] | None] = []
        for reply in pipe.execute():
            # redis-py parses VSIM … WITHSCORES into {element: score}; RESP2 alone, a list.
            pairs = list(reply.items()) if isinstance(reply, dict) else list(
                zip(reply[::2], reply[1::2], strict=True)) if reply else []
            if not pairs:
                out.append(None)
                continue
            name, score = max(pairs, key=lambda pair: float(pair[1]))
            name = name.decode() if isinstance(name, bytes) else str(name)
            out.append((name, 2.0 * float(score) - 1.0))  # VSIM's score is (1 + cos) / 2
        return out

    def model(self) -> str | None:
        """The embedding model the protected vectors were made with (None: none loaded)."""
        value = self.redis.hget(self.meta_key, "model")
        return value.decode() if isinstance(value, bytes) else value

    # -- loading ---------------------------------------------------------------------------
    def add(self, docs: Sequence[ProtectedDoc], encoder: Encoder | None = None,
            model: str = "") -> Loaded:
        """Index ``docs`` in every layer (the vector set only with an ``encoder``, made by
        ``model``). Idempotent by id: a document already loaded is counted, not re-indexed;
        a load cut short is completed by the next one (the id is recorded last)."""
        if not docs:
            return Loaded(0, 0)
        known = self.redis.hmget(self.docs_key, [d.id for d in docs])
        todo = list({d.id: d for d, k in zip(docs, known, strict=True) if k is None}.values())
        if todo:
            texts = [normalize(d.content) for d in todo]
            digests = [content_digest(t) for t in texts]
            pipe = self.redis.pipeline(transaction=False)
            for doc, digest in zip(todo, digests, strict=True):
                pipe.hsetnx(self.exact_key, digest, doc.id)
            pipe.execute()
            self._insert(PROTECTED_WORDS, self.words_settings,
                         [(d.id, t) for d, t in zip(todo, texts, strict=True)])
            self._insert(PROTECTED_CODE, self.code_settings,
                         [(d.id, CodeDoc(t, d.language, None))
                          for d, t in zip(todo, texts, strict=True) if d.kind == "CODE"])
            if encoder is not None:
                self._add_vectors([d.id for d in todo], encoder.encode(texts), model)
            self.redis.hset(self.docs_key,
                            mapping={d.id: g for d, g in zip(todo, digests, strict=True)})
        return Loaded(len(todo), len(docs) - len(todo))

    def _insert(self, shingling: Shingling, settings: FuzzySettings | CodeFuzzySettings,
                docs: Sequence[tuple[str, str]] | Sequence[tuple[str, CodeDoc]]) -> None:
        if not docs:
            return
        # Opened first with the check threshold, so the layout (bands × rows) is the one
        # the checks want; then written through a twin at threshold 0.99 (the highest
        # datasketch lays out), which inserts every document but one whose signature is
        # within 1 % of another's: the same coverage.
        FuzzyIndex(self.redis, self.namespace, settings, shingling=shingling)
        writer = FuzzyIndex(self.redis, self.namespace,
                            settings.model_copy(update={"threshold": WRITE_THRESHOLD}),
                            shingling=shingling)
        writer.check_and_insert(docs)

    def _add_vectors(self, ids: list[str], vectors: np.ndarray, model: str) -> None:
        self.redis.hsetnx(self.meta_key, "model", model)
        if self.model() != model:
            raise DecontaminateError(f"the protected vectors of namespace {self.namespace} "
                                     f"were made by {self.model()}, not {model}")
        pipe = self.redis.pipeline(transaction=False)
        for doc_id, vector in zip(ids, np.asarray(vectors, dtype="<f4"), strict=True):
            # Full precision: protected sets are small, and quantization should never decide.
            pipe.execute_command("VADD", self.vset_key, "FP32", vector.tobytes(), doc_id,
                                 "NOQUANT")
        pipe.execute()


def _contaminated(item: Item, stage: str, hit: Hit) -> Outcome:
    return rejection(stage, CONTAMINATED, item.coords, event=dict(item.record),
                     duplicate_of=hit.protected_id, similarity=hit.similarity,
                     detail=f"{hit.method}: {hit.detail}")


class Decontaminate(Step):
    """Candidates in; the same candidate, or ``contaminated`` when its digest, word
    shingles or (CODE) code tokens match a protected document. Writes nothing."""

    name = "decontaminate"
    stage = "ingest"

    def __init__(self, settings: DecontaminateSettings, store: ProtectedStore) -> None:
        super().__init__()
        self.settings = settings
        self.store = store

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per candidate, in input order."""
        hits: dict[int, Hit] = {}
        for j, owner in enumerate(self.store.exact([i.record["digest"] for i in items])):
            if owner is not None:
                hits[j] = Hit(owner, "exact", 1.0, "the normalized content of a protected "
                              "document")
        self._near(items, hits, code=False)
        self._near(items, hits, code=True)
        return [_contaminated(item, self.stage, hits[j]) if j in hits
                else Outcome(item.record, rejected=False) for j, item in enumerate(items)]

    def _near(self, items: Sequence[Item], hits: dict[int, Hit], code: bool) -> None:
        todo = [j for j, item in enumerate(items)
                if j not in hits and (not code or item.record["kind"] == "CODE")]
        records = [items[j].record for j in todo]
        docs: list[tuple[str, str]] | list[tuple[str, CodeDoc]] = (
            [(r["id"], CodeDoc(r["content"], r.get("language"), r.get("source")))
             for r in records] if code else [(r["id"], r["content"]) for r in records])
        decisions = self.store.near(docs, code)
        if decisions is None:
            return
        method = (PROTECTED_CODE if code else PROTECTED_WORDS).method
        threshold = self.settings.code_threshold if code else self.settings.fuzzy_threshold
        for j, decision in zip(todo, decisions, strict=True):
            if not decision.keep and decision.duplicate_of is not None:
                sim = float(decision.similarity or 0.0)
                hits[j] = Hit(decision.duplicate_of, method, sim,
                              f"estimated Jaccard {sim:.3f} ≥ {threshold}")


class SharedEncoder:
    """An encoder whose last call's embeddings are reused: ``ProtectedSemantic`` embeds a
    micro-batch, and ``SemanticDedup``'s call for the survivors costs no model time. Holds
    one micro-batch of vectors at most."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self._last: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of ``texts``, from the last call where it had them."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._last]
        known = dict(self._last)
        if missing:
            known.update(zip(missing, self.encoder.encode(missing), strict=True))
        self._last = {t: known[t] for t in texts}
        if not texts:
            return np.empty((0, 0), dtype=np.float32)
        return np.stack([known[t] for t in texts])


class ProtectedSemantic(Step):
    """Candidates in; the same candidate, or ``contaminated`` when its embedding is within
    ``semantic_threshold`` of a protected document's. Writes nothing."""

    name = "decontaminate_semantic"
    stage = "dedup"

    def __init__(self, settings: DecontaminateSettings, model: str, encoder: Encoder,
                 store: ProtectedStore) -> None:
        super().__init__()
        stored = store.model()
        if stored is not None and stored != model:
            raise DecontaminateError(
                f"the protected documents were embedded by {stored}, the dedup model is "
                f"{model}: load them again into a fresh namespace")
        self.settings = settings
        self.encoder = encoder
        self.store = store

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """One outcome per candidate, in input order."""
        with self.timed("embed"):
            vectors = self.encoder.encode([item.record["content"] for item in items])
        nearest = self.store.nearest(vectors)
        threshold = self.settings.semantic_threshold
        return [_contaminated(item, self.stage, Hit(best[0], "semantic", best[1],
                                                    f"cosine {best[1]:.4f} ≥ {threshold}"))
                if best is not None and best[1] >= threshold
                else Outcome(item.record, rejected=False)
                for item, best in zip(items, nearest, strict=True)]


def load_protected(store: ProtectedStore, docs: Iterable[ProtectedDoc], batch_size: int,
                   encoder: Encoder | None = None, model: str = "",
                   progress: Callable[[Loaded], None] | None = None) -> Loaded:
    """``store.add`` over ``docs`` in batches of ``batch_size``; ``progress`` after each."""
    added = already = 0
    batch: list[ProtectedDoc] = []

    def flush() -> None:
        nonlocal added, already
        done = store.add(batch, encoder, model)
        added, already = added + done.added, already + done.already
        if progress is not None:
            progress(done)
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return Loaded(added, already)
