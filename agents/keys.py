"""Every Redis key sluice writes, in one place, with one hash-tag convention.

Keys are ``sluice:<namespace>:<part>…``. Keys that one script or transaction touches
together share a Redis Cluster hash tag: the braces around ``<namespace>:<group>``, so they
land in one slot. Keys used one at a time carry no tag and spread over every slot.

| what | key | type |
|---|---|---|
| exact claims | ``sluice:<ns>:exact:<digest>`` | string: the first id to claim the digest |
| fuzzy index | ``sluice:{<ns>:lsh}:meta``, ``…:sig``, ``…:seq``, ``…:band:…`` | ``agents.fuzzy`` |
| vector set | ``sluice:<ns>:vset`` | Redis 8 vector set |
| class buffers | ``sluice:{<ns>:buf:<partition>}:…`` | see ``agents.buffers`` |
| loss statistics | ``sluice:{<ns>:loss}:state``, ``…:difficulty`` | JSON string, hash |
"""

from __future__ import annotations


def exact_key(namespace: str, digest: str) -> str:
    """Claims a normalized content digest for the first event id (used alone: untagged)."""
    return f"sluice:{namespace}:exact:{digest}"


def lsh_prefix(namespace: str) -> str:
    """Prefix of the fuzzy MinHash-LSH index; its script touches all of it (one tag)."""
    return f"sluice:{{{namespace}:lsh}}"


def vset_key(namespace: str) -> str:
    """The namespace's vector set (its script touches only this key)."""
    return f"sluice:{namespace}:vset"


def buffer_prefix(namespace: str, partition: int) -> str:
    """Prefix of one samples partition's class buffers (one tag per partition)."""
    return f"sluice:{{{namespace}:buf:{partition}}}"


def loss_state_key(namespace: str) -> str:
    """The shared ``LossEMA`` state (JSON), watched by the feedback transaction."""
    return f"sluice:{{{namespace}:loss}}:state"


def difficulty_key(namespace: str) -> str:
    """Difficulty factor per class, written in the same transaction as the loss state."""
    return f"sluice:{{{namespace}:loss}}:difficulty"
