"""Content normalization and the exact-dedup key.

Two events whose contents differ only in Unicode composition, line endings, trailing
whitespace or trailing blank lines are the same document: ``normalize`` maps them to one
string, and ``content_digest`` of that string is the exact-dedup key (``SET digest id NX``).
"""

from __future__ import annotations

import hashlib
import unicodedata

ID_PREFIX = "sha256:"
"""Prefix of ids derived from the content digest, so they are recognisable as such."""

_DERIVED_ID_HEX = 32  # 128 bits of the digest: collision-free for any realistic stream
_BOM = "\ufeff"


def normalize(content: str) -> str:
    """Return ``content`` in canonical form.

    - Unicode NFC (a composed "é" and "e" + combining accent are one character);
    - a leading byte-order mark is dropped (editors add or drop it at will);
    - CRLF and lone CR become LF;
    - trailing whitespace is stripped from every line, leading indentation is kept;
    - trailing blank lines are dropped, and the result has no final newline.

    Linear in the length of the input (no regular expressions, so no backtracking on
    pathological lines).
    """
    if not unicodedata.is_normalized("NFC", content):
        content = unicodedata.normalize("NFC", content)
    if content.startswith(_BOM):
        content = content[1:]
    if "\r" in content:
        content = content.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in content.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def content_digest(normalized: str) -> str:
    """Hex SHA-256 of the UTF-8 bytes of ``normalized`` content: the exact-dedup key.

    Lone surrogates (possible in ``str`` built from escaped JSON) are encoded as such
    rather than raising, so every string has a digest.
    """
    return hashlib.sha256(normalized.encode("utf-8", "surrogatepass")).hexdigest()


def derive_id(digest: str) -> str:
    """The id of an event sent without one: ``"sha256:"`` + the first 32 hex digits.

    Deterministic, so a producer's replay of the same content gets the same id and the
    replay stays idempotent downstream.
    """
    return ID_PREFIX + digest[:_DERIVED_ID_HEX]
