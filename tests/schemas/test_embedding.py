"""The one codec of the embedding bytes on the wire (little-endian float16)."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.embedding import EmbeddingError, decode_embedding, encode_embedding


def test_f16_round_trip_is_little_endian_and_checked() -> None:
    vec = np.array([1.0, -0.5, 0.25, 1e-3], dtype=np.float32)
    data = encode_embedding(vec)
    assert data == np.array(vec, dtype="<f2").tobytes() and len(data) == 8
    back = decode_embedding(data, 4)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, vec, rtol=1e-3)
    with pytest.raises(EmbeddingError, match="expected 6"):
        decode_embedding(data, 3)
