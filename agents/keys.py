"""Every Redis key sluice writes, in one place, with one hash-tag convention.

Keys are ``sluice:<namespace>:<part>…``. Keys that one script or transaction touches
together share a Redis Cluster hash tag: the braces around ``<namespace>:<group>``, so they
land in one slot. Keys used one at a time carry no tag and spread over every slot.

| what | key | type |
|---|---|---|
| exact claims | ``sluice:<ns>:exact:<digest>`` | string: the first id to claim the digest |
| first versions | ``sluice:<ns>:first:<id>`` | string: the first digest seen under the id |
| fuzzy index | ``sluice:{<ns>:lsh}:meta``, ``…:sig``, ``…:seq``, ``…:band:…`` | ``agents.fuzzy`` |
| code fuzzy index | ``sluice:{<ns>:lsh-code}:meta``, ``…:sig``, ``…:seq``, ``…:band:…`` | same |
| vector set | ``sluice:<ns>:vset`` | Redis 8 vector set |
| class buffers | ``sluice:{<ns>:buf:<partition>}:…`` | see ``agents.buffers`` (with the |
| | | composed batches not yet confirmed sent: ``…:outbox``) |
| class labels | ``sluice:<ns>:labels`` | set: the labels admitted (at most ``max_labels``) |
| loss statistics | ``sluice:{<ns>:loss}:state``, ``…:difficulty``, ``…:seen`` | JSON string, |
| | | hash, zset of the (batch id, step) pairs folded |
"""

from __future__ import annotations


def exact_key(namespace: str, digest: str) -> str:
    """Claims a normalized content digest for the first event id (used alone: untagged)."""
    return f"sluice:{namespace}:exact:{digest}"


def first_digest_key(namespace: str, event_id: str) -> str:
    """The first content digest seen under an id (``agents.identity``; used alone)."""
    return f"sluice:{namespace}:first:{event_id}"


def lsh_prefix(namespace: str) -> str:
    """Prefix of the fuzzy MinHash-LSH index; its script touches all of it (one tag)."""
    return f"sluice:{{{namespace}:lsh}}"


def code_lsh_prefix(namespace: str) -> str:
    """Prefix of the code layer's MinHash-LSH index (token shingles of CODE records): the
    same layout as ``lsh_prefix``, its own tag."""
    return f"sluice:{{{namespace}:lsh-code}}"


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


def labels_key(namespace: str) -> str:
    """The class labels admitted in the namespace (one script touches only this key)."""
    return f"sluice:{namespace}:labels"


def feedback_seen_key(namespace: str) -> str:
    """The (batch id, step) pairs already folded, watched by the feedback transaction."""
    return f"sluice:{{{namespace}:loss}}:seen"
