"""The embedder on real stdlib files: unit vectors, chunking past the window, f16 wire bytes."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from agents.config import DedupSettings
from agents.embed import (
    PACKAGED_MODELS,
    Embedder,
    EmbedError,
    resolve_model,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _read(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(DedupSettings(device="cpu"))


def test_encode_gives_unit_float32_rows_in_input_order(embedder: Embedder) -> None:
    texts = [line for line in _read("bisect.py").splitlines() if len(line) > 30][:6]
    texts.append(_read("colorsys.py"))  # one long text among short ones
    together = embedder.encode(texts)
    assert together.dtype == np.float32
    assert together.shape == (len(texts), embedder.dim) == (7, 384)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    one_by_one = np.vstack([embedder.encode([text]) for text in texts[::-1]])[::-1]
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_windows_fit_the_model_and_spread_over_long_text(embedder: Embedder) -> None:
    text = _read("textwrap.py")  # ~19 KB: far more windows than max_chunks
    assert embedder.window <= embedder.model.max_seq_length - 2
    chunks = embedder.chunks([text], max_chunks=4)[0]
    assert len(chunks) == 4
    assert text.startswith(chunks[0]) and text.rstrip().endswith(chunks[-1].rstrip())
    for chunk in chunks:
        tokens = embedder.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        assert len(tokens) <= embedder.window + 2  # re-tokenizing a slice may shift a token
    assert embedder.chunks(["short"])[0] == ["short"]


def test_chunked_embedding_sees_past_the_first_window(embedder: Embedder) -> None:
    prefix = _read("textwrap.py")[:1600]  # ~390 tokens: more than one whole window
    assert len(embedder.tokenizer(prefix, add_special_tokens=False)["input_ids"]) > (
        embedder.window
    )
    first, second = prefix + _read("bisect.py"), prefix + _read("colorsys.py")
    truncated = embedder.model.encode([first, second], normalize_embeddings=True)
    chunked = embedder.encode([first, second])
    threshold = DedupSettings().threshold
    # A model that truncates at its window sees the same text twice...
    assert float(truncated[0] @ truncated[1]) > 0.999
    assert float(np.prod(embedder.encode([first, second], max_chunks=1), axis=0).sum()) > 0.999
    # ...the chunk mean sees two different files.
    assert float(chunked[0] @ chunked[1]) < threshold - 0.2


def test_packaged_names_resolve_to_the_shipped_folder() -> None:
    for name in PACKAGED_MODELS:
        assert (Path(resolve_model(name)) / "config.json").is_file()
    assert resolve_model("/some/local/model") == "/some/local/model"


def test_unavailable_backend_or_model_fails_at_construction() -> None:
    with pytest.raises(EmbedError, match="device"):  # the ONNX backends run on the CPU
        Embedder(DedupSettings(backend="onnx", device="cuda:0"))
    with pytest.raises(EmbedError, match="offline"):
        Embedder(DedupSettings(model="/nonexistent/sluice-model", device="cpu"))
