"""MinHash signatures over word or token shingles, computed with numpy (no per-word Python
work).

Signatures are datasketch's ``affine32`` MinHash (its permutations, its formula), computed
for a whole document: the shingle hashes come from polynomial prefix sums over the
document's bytes. ``agents.fuzzy`` keeps them in a Redis LSH index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from datasketch import MinHash

SCHEME = "affine32"
SEED = 1
TOKENIZER = "w+lower/v1"  # bump when shingling changes: stored signatures become stale

_CHUNK = 4096  # shingles per permutation step: bounds the (chunk × num_perm) temporary
_WORD = re.compile(r"\w+")
# Bytes that are not ASCII word characters become spaces and A-Z become a-z; bytes >= 0x80
# only occur on the non-ASCII path, where tokens are already lower-cased \w+ runs.
_ASCII_FOLD = bytes(
    (b | 0x20 if 65 <= b <= 90 else b) if (chr(b).isalnum() or b == 95 or b >= 128) else 32
    for b in range(256)
)
_SPACE = 32
_NUL = 0  # separates tokens, which may hold spaces
_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_SHINGLE_BASE = np.uint64(0x9E3779B97F4A7C15)

# -- signatures ----------------------------------------------------------------------------


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    # datasketch's affine32 pre-mix (MurmurHash3's 32-bit finalizer), applied before the
    # permutations exactly as MinHash.update_batch does.
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def word_bytes(text: str) -> bytes:
    """The text's words (``\\w+`` runs, lower-cased) as bytes, separated by runs of spaces.

    Case, punctuation and whitespace edits do not change the words. ASCII text (most code)
    is folded by one ``bytes.translate``; other text goes through the regex.
    """
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_FOLD)
    words = _WORD.findall(text.lower())
    return " ".join(words).encode("utf-8", "surrogatepass")


class MinHasher:
    """Computes MinHash signatures (uint32 arrays of ``num_perm``) over word k-shingles, or
    over the k-shingles of a token sequence (``shingle_words`` is k for both).

    Equal to datasketch's ``MinHash(num_perm, seed=1, scheme="affine32")`` updated with the
    32-bit shingle hashes from ``shingle_hashes`` (a unit test pins this), so signatures
    can be handed to datasketch as ``MinHash(hashvalues=sig, scheme="affine32")``.
    """

    def __init__(self, num_perm: int = 128, shingle_words: int = 5) -> None:
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        a, b = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
        self._a = np.asarray(a, dtype=np.uint32)
        self._b = np.asarray(b, dtype=np.uint32)
        # (BASE^j, BASE^-j) for j < size, replaced as one tuple so threads never see a mix.
        self._powers_cache = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """BASE^j and BASE^-j (mod 2^64) for j < n, grown on demand and kept."""
        powers, inverses = self._powers_cache
        if len(powers) < n:
            size = max(n, 2 * len(powers))
            powers, inverses = _powers_of(_BASE, size), _powers_of(_BASE_INV, size)
            self._powers_cache = (powers, inverses)
        return powers[:n], inverses[:n]

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hashes (uint32) of the text's word k-shingles, in order, with repeats.

        A text of fewer than k words is one shingle of all its words; a text without
        words has none.
        """
        return self._run_shingles(word_bytes(text), _SPACE)

    def token_shingle_hashes(self, tokens: Sequence[str]) -> np.ndarray:
        """32-bit hashes of the k-shingles of a token sequence (``agents.code_tokens``),
        hashed like words: tokens may hold spaces or punctuation, never a NUL byte."""
        data = "\x00".join(tokens).encode("utf-8", "surrogatepass")
        return self._run_shingles(data, _NUL)

    def _run_shingles(self, data: bytes, separator: int) -> np.ndarray:
        """Shingle hashes of the runs of non-``separator`` bytes in ``data``."""
        buf = np.frombuffer(data, dtype=np.uint8)
        is_word = np.zeros(len(buf) + 2, dtype=np.int8)
        is_word[1:-1] = buf != separator
        edges = np.diff(is_word)
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        if len(starts) == 0:
            return np.empty(0, dtype=np.uint32)
        # Polynomial hash of every word at once: with prefix sums of byte * BASE^-j, the
        # hash of bytes [s, e) is (C[e] - C[s]) * BASE^(e-1) = sum byte_j * BASE^(e-1-j).
        pw, pw_inv = self._powers(len(buf))
        prefix = np.zeros(len(buf) + 1, dtype=np.uint64)
        np.cumsum((buf.astype(np.uint64) + np.uint64(1)) * pw_inv, out=prefix[1:])
        words = (prefix[ends] - prefix[starts]) * pw[ends - 1]
        k = min(self.shingle_words, len(words))
        count = len(words) - k + 1
        acc = words[:count].copy()
        for j in range(1, k):
            acc = acc * _SHINGLE_BASE + words[j : j + count]
        return (_fmix64(acc) >> np.uint64(32)).astype(np.uint32)

    def from_hashes(self, hashes: np.ndarray) -> np.ndarray | None:
        """The signature of a set of 32-bit hashes; ``None`` for the empty set."""
        if len(hashes) == 0:
            return None
        mixed = _fmix32(hashes.astype(np.uint32, copy=False))[:, None]
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        # One scratch block reused in place: fresh temporaries of this size cost more in
        # page faults than the arithmetic (measured 5x slower).
        scratch = np.empty((min(len(mixed), _CHUNK), self.num_perm), dtype=np.uint32)
        for start in range(0, len(mixed), _CHUNK):
            chunk = mixed[start : start + _CHUNK]
            out = scratch[: len(chunk)]
            np.multiply(chunk, self._a, out=out)  # uint32 wraparound is the mod 2^32
            np.add(out, self._b, out=out)
            np.minimum(sig, out.min(axis=0), out=sig)
        return sig

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature of the text's shingle set; ``None`` when it has no words."""
        return self.from_hashes(self.shingle_hashes(text))

    def signatures(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """``signature`` of each text, in order."""
        return [self.signature(text) for text in texts]


def _powers_of(base: np.uint64, size: int) -> np.ndarray:
    powers = np.full(size, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures: the fraction of equal minima."""
    return float(np.count_nonzero(a == b)) / len(a)
