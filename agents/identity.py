"""Identity is (id, content digest) (DESIGN.md, "Guarantees to test").

The same pair again is a replay and changes nothing. The same id with new content is a
later *version*: ``ExactDedup`` marks it with ``earlier_digest`` (the digest of the first
content seen under the id), and the stores that recognize replays by name (the fuzzy
index, the vector set, the class buffers) know it by ``store_id``: the plain id for the
first version, ``<id>@<digest prefix>`` for a later one. So a replay of either version is
recognized, and a later version is curated like a new event, against everything, its own
earlier version included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERSION_MARK = "@"
DIGEST_CHARS = 16  # 64 bits of the SHA-256: collisions between versions of one id: none


def store_id(record: Mapping[str, Any]) -> str:
    """The name a record has in the stores: its id, or its version's name."""
    if not record.get("earlier_digest"):
        return str(record["id"])
    return f"{record['id']}{VERSION_MARK}{str(record['digest'])[:DIGEST_CHARS]}"


def event_id(name: str) -> str:
    """The event id behind a store name (``store_id``'s inverse for what rejections say)."""
    head, mark, tail = name.rpartition(VERSION_MARK)
    if mark and len(tail) == DIGEST_CHARS and all(c in "0123456789abcdef" for c in tail):
        return head
    return name
