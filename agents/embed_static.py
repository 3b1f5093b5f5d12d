"""The ``static`` backend of the embedder: a model2vec static model distilled from the local one.

Distillation (``model2vec.distill``) runs every token of the model's vocabulary through the
local sentence-transformers model once (about a minute on a CPU for MiniLM's 29,525
tokens), keeps one vector per token, rotates them with PCA to the model's own embedding
dimension (so ``embedding_dim`` on the wire and the vector index do not change with the
backend) and weights them by token frequency (SIF). A text's vector is then the mean of
its tokens' vectors: no transformer at encode time, so it is far faster and cruder than
the model it comes from (``python -m bench.embed`` measures both).

Built offline, once, from the folder ``agents.embed.resolve_model`` gives (never
downloaded) and cached under ``~/.cache/sluice/static/<model>-static-<hash>/``, keyed
like the ONNX exports (``agents.embed_onnx.model_digest``): a changed model or recipe
makes a new entry. The vectors are kept in float32 (model2vec's default is float16, whose
rounding moves cosines near the dedup threshold).

Needs ``model2vec`` and ``skeletoken`` (the distillation's tokenizer surgery), installed
as plain dependencies: the ``model2vec[distill]`` extra pins transformers < 5.4, below
sluice's, and the distillation works with ours (tests/agents/test_embed_static.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agents.embed_onnx import DEFAULT_CACHE as ONNX_CACHE
from agents.embed_onnx import cache_slug, model_digest
from schemas.errors import SluiceError

log = logging.getLogger(__name__)

#: Where static models are cached unless the caller names a folder (beside the ONNX ones).
DEFAULT_CACHE = ONNX_CACHE.parent / "static"
#: Bumped when the distillation recipe changes, so old caches are not reused.
RECIPE = 1
#: Written last into a finished cache folder: its presence means the folder is whole.
META = "sluice-static.json"


class StaticBackendError(SluiceError):
    """The static model could not be distilled, cached or loaded."""


def _missing(exc: ImportError) -> StaticBackendError:
    return StaticBackendError(
        f"the static embedding backend needs model2vec and skeletoken ({exc}): "
        "pip install model2vec skeletoken")


def cache_folder(model_path: str, dim: int, cache_dir: Path | None = None,
                 label: str | None = None) -> Path:
    """The folder holding the static model distilled from ``model_path`` at ``dim``."""
    digest = model_digest(model_path, f"static{RECIPE}", str(dim))
    return (cache_dir or DEFAULT_CACHE) / f"{cache_slug(model_path, label)}-static-{digest}"


def build(model_path: str, cache_dir: Path | None = None, model_name: str | None = None,
          dim: int | None = None) -> Path:
    """The cached static model's folder, distilled now if missing (about a minute).

    ``dim`` is the vector dimension to keep: the sentence-transformers model's embedding
    dimension (default: its transformer's hidden size, the same for a mean-pooled model
    without a Dense layer). ``model_name`` (the setting) names the cache folder.
    """
    dim = dim or _hidden_size(model_path)
    folder = cache_folder(model_path, dim, cache_dir, model_name)
    if (folder / META).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Built in a sibling temporary folder and renamed: a crash or a second process never
    # sees a half-written model.
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        log.warning("dedup.backend='static': distilling a static model from %s into %s "
                    "(once; about a minute on a CPU)", model_path, folder)
        model = _distill(model_path, dim)
        final = work / "final"
        model.save_pretrained(str(final))
        (final / META).write_text(json.dumps(
            {"source": str(model_path), "recipe": RECIPE, "dim": dim}, indent=1))
        try:
            os.replace(final, folder)
        except OSError:
            if not (folder / META).is_file():  # another process won the race: use theirs
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _hidden_size(model_path: str) -> int:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        return int(config["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StaticBackendError(f"cannot read the hidden size of {model_path!r} "
                                 f"(config.json): {exc}") from exc


def _distill(model_path: str, dim: int) -> Any:
    # Offline before the imports: huggingface_hub reads the variables once. A local folder
    # is never looked up on the hub by model2vec either.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if not Path(model_path).is_dir():
        raise StaticBackendError(f"the static model is distilled from a local folder; "
                                 f"{model_path!r} is not one")
    try:
        from model2vec.distill import distill
    except ImportError as exc:
        raise _missing(exc) from exc
    try:
        model = distill(model_name=model_path, pca_dims=dim, quantize_to="float32")
    except Exception as exc:  # transformers, skeletoken, torch: all mean "cannot distill"
        raise StaticBackendError(f"cannot distill a static model from {model_path!r}: "
                                 f"{exc}") from exc
    if int(model.dim) != dim:
        raise StaticBackendError(
            f"the static model distilled from {model_path!r} has {model.dim} dimensions, "
            f"not the model's {dim} (PCA cannot add dimensions: a model whose Dense layer "
            "widens its vectors has no static equivalent)")
    return model


class StaticEncoder:
    """Runs a cached static model: texts in, L2-normalized float32 vectors out.

    model2vec drops the unknown token, so a text with no token it knows (empty, or only
    characters the tokenizer maps to ``[UNK]``) would be a zero vector, which no cosine can
    compare: it gets the unknown token's own vector instead, so such texts are alike, as
    they are to the transformer.
    """

    def __init__(self, folder: Path) -> None:
        if not (Path(folder) / META).is_file():  # never let model2vec try the hub
            raise StaticBackendError(f"{folder} is not a built static model")
        try:
            from model2vec import StaticModel
        except ImportError as exc:
            raise _missing(exc) from exc
        try:
            self.model = StaticModel.from_pretrained(Path(folder))
        except Exception as exc:  # safetensors/tokenizers/json errors: unreadable cache
            raise StaticBackendError(f"cannot load the static model in {folder}: "
                                     f"{exc}") from exc
        self.dim = int(self.model.dim)
        unk = self.model.unk_token_id
        fallback = (np.asarray(self.model.embedding[unk], dtype=np.float32) if unk is not None
                    else np.ones(self.dim, dtype=np.float32))
        if not np.linalg.norm(fallback) > 0:
            fallback = np.ones(self.dim, dtype=np.float32)
        self.no_token = fallback / np.linalg.norm(fallback)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit vectors, float32, in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # No truncation: the embedder's windows already fit the source model, and the
        # static tokenizer may cut a window into a few more tokens than it did.
        vectors = np.asarray(self.model.encode(texts, batch_size=batch_size, max_length=None,
                                               normalize=False, use_multiprocessing=False),
                             dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        out = vectors / np.where(norms > 0, norms, 1.0)
        out[norms[:, 0] == 0] = self.no_token
        return out.astype(np.float32, copy=False)
