"""The one composition of the curation steps, used by the Faust worker, ``sluice dedup``
and every benchmark.

A ``Pipeline`` is a plain list of filter steps run in order over a micro-batch: what a step
rejects stops there, what it passes goes on to the next step, and ``run`` returns one
``Outcome`` per input item, in input order. ``build_pipeline`` chooses the steps of the
named stages from the settings, over stores in the Redis it is given:

- ``ingest``: ``Validate`` → ``Decontaminate`` (when ``decontaminate.enabled``: before any
  layer claims anything) → ``ExactDedup`` → ``FuzzyDedup`` (word shingles, when
  ``fuzzy.enabled``) → ``CodeFuzzyDedup`` (normalized code tokens of CODE records, when
  ``fuzzy.code.enabled`` too);
- ``dedup``: ``ProtectedSemantic`` (when ``decontaminate.enabled``; it shares its
  embeddings with the next step) → ``SemanticDedup`` (when ``dedup.enabled``; else
  ``PassSemantic``, and no model is loaded).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from agents.config import AGENTS, Curation
from agents.decontaminate import (
    Decontaminate,
    ProtectedSemantic,
    ProtectedStore,
    SharedEncoder,
)
from agents.exact import ExactClaims, ExactDedup
from agents.fuzzy import CodeFuzzyDedup, FuzzyDedup
from agents.fuzzy_index import FuzzyIndex
from agents.semantic import Encoder, PassSemantic, SemanticDedup
from agents.sharded_index import build_vector_index
from agents.shingling import CODE_TOKENS
from agents.step import Item, Outcome, Step
from agents.validate import Validate
from schemas.errors import SluiceError

#: The stages a pipeline composes, in stream order (balance and feedback are sinks).
STAGES = AGENTS[:2]


class Pipeline:
    """Filter steps run in order; one outcome per item: its first rejection, or what the
    last step passed on."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)

    def run(self, items: Sequence[Item]) -> list[Outcome]:
        """Every item through the steps; outcomes in input order."""
        decided: list[Outcome | None] = [None] * len(items)
        alive = list(range(len(items)))
        current = list(items)
        passed_by: list[tuple[Step, list[int], list[Item]]] = []
        for step in self.steps:
            if not current:
                break
            outcomes = step.run(current)
            if len(outcomes) != len(current):
                raise SluiceError(f"step {step.name} returned {len(outcomes)} outcomes for "
                                  f"{len(current)} items")
            passed, passed_items, given = [], [], []
            for index, item, outcome in zip(alive, current, outcomes, strict=True):
                if outcome.rejected:
                    decided[index] = outcome
                else:
                    passed.append(index)
                    given.append(item)
                    passed_items.append(Item(outcome.record, item.coords, item.key))
            passed_by.append((step, passed, given))
            alive, current = passed, passed_items
        for index, item in zip(alive, current, strict=True):
            decided[index] = Outcome(item.record, rejected=False)
        # What a step stored for an item a later step failed on (``error:*``) is given back
        # (``Step.forget``): the event never becomes a sample, and a retry or a copy must not
        # be its duplicate. An item a later layer rejects as a duplicate keeps its entries,
        # so that a replay meets the same decisions.
        for step, indices, given in passed_by:
            later = [given[n] for n, index in enumerate(indices)
                     if (final := decided[index]) is not None and final.rejected
                     and str(final.reason).startswith("error:")]
            if later:
                step.forget(later)
        return [outcome for outcome in decided if outcome is not None]

    def seconds(self) -> dict[str, float]:
        """Time spent per step and timed part, since the pipeline was built."""
        total: dict[str, float] = {}
        for step in self.steps:
            for part, seconds in step.seconds.items():
                total[part] = total.get(part, 0.0) + seconds
        return total


def build_pipeline(config: Curation, client: redis.Redis, *,
                   stages: Sequence[str] = STAGES, namespace: str | None = None,
                   embedder: Encoder | None = None) -> Pipeline:
    """The steps of ``stages`` (in stream order) over stores in ``client``'s Redis.

    ``namespace`` overrides ``redis.namespace``; ``embedder`` reuses a loaded model (the
    benchmarks and tests), else the ``dedup`` stage loads it now, so a missing model fails
    before anything is consumed.
    """
    if isinstance(stages, str):
        raise SluiceError(f"stages must be a list of names, not the string {stages!r}")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SluiceError(f"unknown stage(s) {', '.join(sorted(unknown))}; "
                          f"choose from {', '.join(STAGES)}")
    ns = namespace or config.redis.namespace
    steps: list[Step] = []
    decontaminate = config.decontaminate
    protected = (ProtectedStore(client, ns, decontaminate, config.fuzzy)
                 if decontaminate.enabled else None)
    if "ingest" in stages:
        steps.append(Validate(config.ingest))
        if protected is not None:
            steps.append(Decontaminate(decontaminate, protected))
        horizon = config.dedup.horizon  # bounds every dedup layer, not only the vector set
        steps.append(ExactDedup(ExactClaims(client, ns, horizon)))
        if config.fuzzy.enabled:
            steps.append(FuzzyDedup(config.fuzzy, FuzzyIndex(client, ns, config.fuzzy,
                                                              horizon=horizon)))
            if config.fuzzy.code.enabled:
                code = config.fuzzy.code
                steps.append(CodeFuzzyDedup(code, FuzzyIndex(client, ns, code,
                                                             shingling=CODE_TOKENS,
                                                             horizon=horizon)))
    if "dedup" in stages:
        if config.dedup.enabled:
            encoder = embedder or load_embedder(config)
            if protected is not None:
                encoder = SharedEncoder(encoder)
                steps.append(ProtectedSemantic(decontaminate, config.dedup.model, encoder,
                                               protected))
            steps.append(SemanticDedup(config.dedup, encoder,
                                       build_vector_index(client, ns, config.dedup)))
        else:
            steps.append(PassSemantic())
    return Pipeline(steps)


def load_embedder(config: Curation) -> Encoder:
    """The configured embedding model, loaded now (it checks its dependencies at once)."""
    from agents.embed import Embedder  # torch and sentence-transformers: only when needed

    return Embedder(config.dedup, threads=config.dedup.torch_threads or None)
