"""The static backend (model2vec): distilled offline from the packaged model into a cache
folder once, reused, and giving unit float32 vectors of the model's own dimension that
still tell a renamed copy of real code from unrelated code."""

from __future__ import annotations

import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import agents.embed as embed
import agents.embed_static as embed_static
from agents.config import DedupSettings
from agents.embed import Embedder, EmbedError, resolve_backend, resolve_model
from agents.embed_static import META, StaticBackendError, StaticEncoder, build, cache_folder

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODEL = DedupSettings().model


def _function(file: str, name: str) -> str:
    """The source of one top-level function of a stdlib file."""
    text = (STDLIB / file).read_text(encoding="utf-8")
    start = text.index(f"def {name}(")
    end = text.find("\ndef ", start + 1)
    return text[start:end if end > 0 else None]


def _renamed(code: str) -> str:
    for old, new in {"insort_right": "put_sorted", "lo": "start", "hi": "stop",
                     "key": "keyfn", "a": "items", "x": "needle"}.items():
        code = re.sub(rf"\b{old}\b", new, code)
    return code


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root with the static model distilled once (about a minute) for the module."""
    root = tmp_path_factory.mktemp("static-cache")
    with pytest.MonkeyPatch.context() as patch:  # nothing may come from a hub
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        build(resolve_model(MODEL), root, MODEL)
    return root


@pytest.fixture(scope="module")
def embedder(cache: Path) -> Embedder:
    return Embedder(DedupSettings(backend="static", device="cpu"), static_cache=cache)


@pytest.fixture(scope="module")
def torch_dim() -> int:
    return Embedder(DedupSettings(device="cpu")).dim


def test_build_caches_once_and_reuses(cache: Path, torch_dim: int) -> None:
    folders = list(cache.iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in folders] == [f"{MODEL}-static"]
    folder = folders[0]
    assert (folder / META).is_file() and (folder / "model.safetensors").is_file()
    assert folder == cache_folder(resolve_model(MODEL), torch_dim, cache, MODEL)
    stamp = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    started = time.perf_counter()
    assert build(resolve_model(MODEL), cache, MODEL, dim=torch_dim) == folder  # reused
    assert time.perf_counter() - started < 5  # a rebuild takes about a minute
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no leftovers


def test_vectors_are_unit_float32_of_the_model_dimension(cache: Path, torch_dim: int) -> None:
    encoder = StaticEncoder(next(cache.iterdir()))
    lines = [line for line in (STDLIB / "bisect.py").read_text().splitlines() if line.strip()]
    vectors = encoder.encode(lines[:20], batch_size=8)
    assert vectors.dtype == np.float32 and vectors.shape == (20, torch_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # A text without a token the model knows is not a zero vector (no cosine for it).
    blank = encoder.encode(["", "😀😀"])
    np.testing.assert_allclose(np.linalg.norm(blank, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, torch_dim)


def test_a_renamed_copy_is_closer_than_unrelated_code(embedder: Embedder) -> None:
    original = _function("bisect.py", "insort_right")
    copy = _renamed(original)
    assert copy != original and "put_sorted" in copy
    unrelated = _function("colorsys.py", "rgb_to_hls")
    prose = "The committee met on Tuesday to discuss the budget for next year's harvest fair."
    v = embedder.encode([original, copy, unrelated, prose])
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.15  # measured 0.72 vs 0.42
    assert float(v[0] @ v[1]) > float(v[0] @ v[3]) + 0.15  # and 0.29


def test_embedder_runs_static_on_long_texts_and_empty_input(embedder: Embedder,
                                                            torch_dim: int) -> None:
    assert embedder.backend == "static" and embedder.device == "cpu"
    assert embedder.static is not None and embedder.onnx is None
    assert embedder.dim == torch_dim
    texts = [(STDLIB / "textwrap.py").read_text(), (STDLIB / "colorsys.py").read_text(),
             "short line"]
    assert len(embedder.chunks(texts[:1])[0]) > 1  # longer than one window: chunked
    together = embedder.encode(texts)
    assert together.dtype == np.float32 and together.shape == (3, torch_dim)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    one_by_one = np.vstack([embedder.encode([text]) for text in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert float(together[0] @ together[1]) < 0.99  # two files, two vectors
    assert embedder.encode([]).shape == (0, torch_dim)


def test_static_runs_on_the_cpu_and_auto_stays_as_it_was() -> None:
    assert resolve_backend("static", "auto") == ("static", "cpu", False)
    assert resolve_backend("static", "cpu") == ("static", "cpu", False)
    assert resolve_backend("auto", "cpu") == ("onnx-int8", "cpu", False)
    with pytest.raises(EmbedError, match="device"):
        Embedder(DedupSettings(backend="static", device="cuda:0"))


def test_unknown_backend_is_rejected_by_the_settings() -> None:
    assert DedupSettings(backend="static").backend == "static"
    with pytest.raises(ValidationError, match="backend"):
        DedupSettings(backend="fp8")


def test_a_failed_build_leaves_no_cache_and_names_the_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(model_path: str, dim: int) -> None:
        raise StaticBackendError("distillation failed halfway")

    monkeypatch.setattr(embed_static, "_distill", broken)
    with pytest.raises(EmbedError, match=r"dedup.backend='static'.*halfway"):
        Embedder(DedupSettings(backend="static", device="cpu"), static_cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a temporary folder


def test_missing_model2vec_is_a_clear_error(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / META).write_text("{}")
    monkeypatch.setitem(sys.modules, "model2vec", None)  # as if not installed
    with pytest.raises(StaticBackendError, match="pip install model2vec skeletoken"):
        StaticEncoder(tmp_path)
    monkeypatch.setattr(embed, "build", lambda *a, **k: tmp_path)
    with pytest.raises(EmbedError, match=r"dedup.backend='static'.*model2vec"):
        Embedder(DedupSettings(backend="static", device="cpu"))


def test_a_changed_model_or_dimension_gets_a_new_cache_entry(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"0" * 16)
    first = cache_folder(str(model), 384, tmp_path)
    assert first.parent == tmp_path and first.name.startswith("model-static-")
    assert cache_folder(str(model), 384, tmp_path) == first
    assert cache_folder(str(model), 256, tmp_path) != first
    weights.write_bytes(b"1" * 32)  # another version of the weights
    assert cache_folder(str(model), 384, tmp_path) != first
    assert embed_static.DEFAULT_CACHE.parent == embed_static.ONNX_CACHE.parent
