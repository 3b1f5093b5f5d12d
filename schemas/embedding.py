"""The ``embedding`` field of ``CuratedSample`` and ``BatchSample`` on the wire: the vector
as little-endian float16 bytes (``embedding_dim`` values). Written by semantic dedup, read
by the trainer; this is its one codec."""

from __future__ import annotations

import numpy as np

from schemas.errors import SluiceError


class EmbeddingError(SluiceError):
    """Embedding bytes that do not hold ``embedding_dim`` float16 values."""


def encode_embedding(vector: np.ndarray) -> bytes:
    """A vector as little-endian float16 bytes."""
    return np.asarray(vector, dtype="<f2").tobytes()


def decode_embedding(data: bytes, dim: int) -> np.ndarray:
    """The float32 vector of ``dim`` values written by ``encode_embedding``."""
    if len(data) != 2 * dim:
        raise EmbeddingError(f"embedding has {len(data)} bytes, expected {2 * dim} "
                             f"for dim {dim}")
    return np.frombuffer(data, dtype="<f2").astype(np.float32)
