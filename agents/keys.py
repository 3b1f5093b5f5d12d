"""Every Redis key sluice writes, in one place, with one hash-tag convention.

Keys are ``sluice:<namespace>:<part>…``. Keys that one script or transaction touches
together share a Redis Cluster hash tag: the braces around ``<namespace>:<group>``, so they
land in one slot. Keys used one at a time carry no tag and spread over every slot.

| what | key | type |
|---|---|---|
| exact claims | ``sluice:<ns>:exact:<digest>`` | string: the first id to claim the digest |
| | | (TTL ``dedup.horizon.age_s`` when set) |
| first versions | ``sluice:<ns>:first:<id>`` | string: the first digest seen under the id |
| | | (TTL ``dedup.horizon.age_s`` when set) |
| fuzzy index | ``sluice:{<ns>:lsh}:meta``, ``…:sig``, ``…:seq``, ``…:order``, | |
| | ``…:band:…`` | ``agents.fuzzy_index`` |
| code fuzzy index | ``sluice:{<ns>:lsh-code}:meta``, ``…:sig``, ``…:seq``, ``…:order``, | same |
| | ``…:band:…`` | |
| semantic index | ``sluice:{<ns>:vset}:set``, ``…:vec``, ``…:log``, ``…:clock``, | vector set, |
| | ``…:pending`` | FP32 vectors (hash), admission log (zset), its clock, ids |
| | | written but not yet settled (set); ``agents.index`` |
| semantic shards | ``sluice:{<ns>:vset:<version>:<shard>}:set``, ``…:vec``, | the same, one |
| | ``…:log``, ``…:clock``, ``…:pending``, ``…:shadows`` | tag per shard of a centroid |
| | | version, with the log of items probing it from another home (zset of |
| | | ``<home>:<id>``); ``agents.sharded_index`` |
| centroids | ``sluice:<ns>:shards:current`` (string: the version in use), | |
| | ``…:shards:seq`` (the last version fitted), ``…:shards:<version>`` | hash: the record |
| | | (``agents.shards.encode_centroids``); each used alone |
| class buffers | ``sluice:{<ns>:buf:<partition>}:…`` | see ``agents.buffers`` (with the |
| | | composed batches not yet confirmed sent: ``…:outbox``) |
| class labels | ``sluice:<ns>:labels`` | set: the labels admitted (at most ``max_labels``) |
| loss statistics | ``sluice:{<ns>:loss}:state``, ``…:difficulty``, ``…:seen`` | JSON string, |
| | | hash, zset of the (batch id, step) pairs folded |
| held-out samples | ``sluice:{<ns>:loss}:holdout`` | hash id → label, embedding |
| | | (``agents.feedback``: the reference model's data) |
| protected documents | ``sluice:{<ns>:protected}:docs``, ``…:exact``, ``…:meta``, | hashes (id → |
| | ``…:lsh…``, ``…:lsh-code…``, ``…:vset`` | digest, digest → id), the fuzzy |
| | | layouts, a vector set: read-only to the pipeline (``agents.decontaminate``) |
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


def vset_prefix(namespace: str) -> str:
    """Prefix of the semantic index: the vector set and what its scripts keep beside it
    (FP32 vectors, admission log, clock) share one tag."""
    return f"sluice:{{{namespace}:vset}}"


def vset_key(namespace: str) -> str:
    """The namespace's vector set."""
    return f"{vset_prefix(namespace)}:set"


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


def holdout_key(namespace: str) -> str:
    """The held-out samples of the reducible-loss policy: id → label and embedding."""
    return f"sluice:{{{namespace}:loss}}:holdout"


def protected_prefix(namespace: str) -> str:
    """Prefix of the protected documents' indexes (``agents.decontaminate``): one tag, so
    the loader's fuzzy scripts may touch them; the pipeline only reads them."""
    return f"sluice:{{{namespace}:protected}}"


def protected_lsh_prefix(namespace: str) -> str:
    """The protected documents' word MinHash-LSH index (``agents.fuzzy_index`` layout)."""
    return f"{protected_prefix(namespace)}:lsh"


def protected_code_lsh_prefix(namespace: str) -> str:
    """The protected documents' code-token MinHash-LSH index (``agents.fuzzy_index``
    layout)."""
    return f"{protected_prefix(namespace)}:lsh-code"


def shard_prefix(namespace: str, version: int, shard: int) -> str:
    """Prefix of one shard of a sharded semantic index (``dedup.shards`` > 1): the same
    layout as ``vset_prefix``, one tag per (centroid version, shard), so a Redis Cluster
    spreads the shards over its slots."""
    return f"sluice:{{{namespace}:vset:{version}:{shard}}}"


def centroids_current_key(namespace: str) -> str:
    """The centroid version the namespace's workers use (a string; absent: unsharded)."""
    return f"sluice:{namespace}:shards:current"


def centroids_seq_key(namespace: str) -> str:
    """The last centroid version handed out (``INCR``: each fit gets a new one)."""
    return f"sluice:{namespace}:shards:seq"


def centroids_key(namespace: str, version: int) -> str:
    """One centroid version's record (a hash: ``agents.shards.encode_centroids``)."""
    return f"sluice:{namespace}:shards:{version}"
