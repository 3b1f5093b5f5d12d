"""The ONNX backends on real stdlib text: same vectors as torch (fp32), close ones (int8),
built offline into a cache folder and reused."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.config import DedupSettings
from agents.embed import Embedder, resolve_backend
from agents.embed_onnx import OnnxBackendError, cache_folder

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _texts() -> list[str]:
    lines = [line.strip() for line in (STDLIB / "bisect.py").read_text().splitlines()
             if len(line.strip()) > 25][:12]
    return [*lines, (STDLIB / "textwrap.py").read_text(), (STDLIB / "colorsys.py").read_text()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    return Embedder(DedupSettings(device="cpu")).encode(_texts())


def test_fp32_export_gives_the_torch_vectors(cache: Path, torch_vectors: np.ndarray) -> None:
    embedder = Embedder(DedupSettings(backend="onnx"), onnx_cache=cache)
    assert embedder.device == "cpu" and embedder.onnx is not None
    got = embedder.encode(_texts())  # includes two files longer than one window
    assert got.dtype == np.float32 and got.shape == torch_vectors.shape
    np.testing.assert_allclose(got, torch_vectors, atol=1e-5)
    # Batching and order do not change a vector.
    one_by_one = np.vstack([embedder.encode([text]) for text in _texts()])
    np.testing.assert_allclose(one_by_one, got, atol=1e-5)


def test_int8_export_stays_close_and_is_cached(cache: Path, torch_vectors: np.ndarray) -> None:
    embedder = Embedder(DedupSettings(backend="onnx-int8"), onnx_cache=cache)
    got = embedder.encode(_texts())
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = (got * torch_vectors).sum(axis=1)
    # Per-channel int8: measured ≥ 0.96 per item on stdlib lines and files.
    assert cosines.min() > 0.95 and cosines.mean() > 0.98
    built = sorted(p.name for p in cache.iterdir())
    assert [name.rsplit("-", 1)[0] for name in built] == [
        "all-MiniLM-L6-v2-onnx", "all-MiniLM-L6-v2-onnx-int8"]
    stamp = {p: p.stat().st_mtime_ns for p in cache.glob("*/model.onnx")}
    Embedder(DedupSettings(backend="onnx-int8"), onnx_cache=cache)  # reused, not rebuilt
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/model.onnx")} == stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no leftovers


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OnnxBackendError, match="variant"):
        cache_folder(str(tmp_path), "onnx-fp8")


def test_backends_resolve_from_the_settings() -> None:
    assert resolve_backend("auto", "cpu") == ("onnx-int8", "cpu", False)
    assert resolve_backend("onnx", "auto") == ("onnx", "cpu", False)
    assert resolve_backend("torch", "cpu") == ("torch", "cpu", False)
    if torch.cuda.is_available():  # fp16 torch on a GPU
        assert resolve_backend("auto", "auto") == ("torch", "cuda", True)
    else:
        assert resolve_backend("auto", "auto") == ("onnx-int8", "cpu", False)


def test_auto_on_the_cpu_runs_the_int8_export(cache: Path, torch_vectors: np.ndarray) -> None:
    embedder = Embedder(DedupSettings(backend="auto", device="cpu"), onnx_cache=cache)
    assert embedder.backend == "onnx-int8" and embedder.onnx is not None
    int8 = Embedder(DedupSettings(backend="onnx-int8"), onnx_cache=cache)
    np.testing.assert_allclose(embedder.encode(_texts()), int8.encode(_texts()), atol=1e-6)
