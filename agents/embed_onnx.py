"""ONNX Runtime backends for the embedder: an fp32 export and an int8-quantized one.

Both are built offline, once, from the local sentence-transformers model (never
downloaded) and cached under ``~/.cache/sluice/onnx/<model>-<variant>-<hash>/``:

- ``onnx``: the whole sentence-transformers pipeline (transformer, pooling, normalize)
  traced to ONNX with eager attention, then fused by ONNX Runtime's transformer optimizer
  (Attention, SkipLayerNorm, BiasGelu) when the architecture is one it knows. Same vectors
  as torch to ~1e-6.
- ``onnx-int8``: the fused graph with dynamic int8 quantization of the MatMul/Attention
  weights, per output channel. Per-tensor scales (ONNX Runtime's default) cost far more
  accuracy on MiniLM: measured min cosine to fp32 0.85 per-tensor vs 0.96-0.99 per-channel
  on stdlib lines and files.

The sentence-transformers ``backend="onnx"`` route needs optimum-onnx, which pins
transformers < 4.58; exporting with torch and running with onnxruntime needs neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from schemas.errors import SluiceError

#: Where exports are cached unless the caller names a folder.
DEFAULT_CACHE = Path.home() / ".cache" / "sluice" / "onnx"
#: Bumped when the export recipe changes, so old caches are not reused.
RECIPE = 1
VARIANTS = ("onnx", "onnx-int8")
# Architectures that onnxruntime.transformers.optimizer fuses (config.model_type → its name).
_FUSABLE = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
            "mpnet": "bert", "electra": "bert"}
# Sentences used to check an export against torch before it is cached.
_PROBES = [
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "x",
]


class OnnxBackendError(SluiceError):
    """The ONNX export could not be built, checked or loaded."""


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxBackendError(
            "dedup.backend onnx/onnx-int8 needs onnxruntime and onnx: "
            "pip install onnxruntime onnx"
        ) from exc
    return onnxruntime


def cache_folder(model_path: str, variant: str, cache_dir: Path | None = None,
                 label: str | None = None) -> Path:
    """The folder holding one model's export of one variant (``label`` names it)."""
    if variant not in VARIANTS:
        raise OnnxBackendError(f"unknown ONNX variant {variant!r}; choose from {VARIANTS}")
    digest = model_digest(model_path, str(RECIPE))
    return (cache_dir or DEFAULT_CACHE) / f"{cache_slug(model_path, label)}-{variant}-{digest}"


def model_digest(model_path: str, *recipe: str) -> str:
    """Ten hex digits naming one version of a local model and the recipe built from it.

    The folder's resolved path and its weights files' names, sizes and mtimes name the
    version, so a changed model gets a new cache entry (also used by ``agents.embed_static``).
    """
    source = Path(model_path)
    stamp = [str(source.resolve()), *recipe]
    for weights in sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin")):
        info = weights.stat()
        stamp += [weights.name, str(info.st_size), str(int(info.st_mtime))]
    return hashlib.sha256("\0".join(stamp).encode()).hexdigest()[:10]


def cache_slug(model_path: str, label: str | None = None) -> str:
    """The readable part of a cache folder's name: ``label`` (the setting) or the folder's."""
    name = (label or Path(model_path).name or "model").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _whole_model(model: Any, names: list[str]) -> Any:
    """The torch module traced to ONNX: named tensors in, sentence embedding out."""
    import torch

    class Whole(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = model

        def forward(self, *tensors: Any) -> Any:
            features = dict(zip(names, tensors, strict=True))
            return self.st(features)["sentence_embedding"]

    return Whole().eval()


def export(model_path: str, variant: str, cache_dir: Path | None = None,
           label: str | None = None) -> Path:
    """The cached ``model.onnx`` for ``variant``, built now if missing (seconds).

    The int8 variant is quantized from the cached fp32 one, so both see the same graph.
    """
    folder = cache_folder(model_path, variant, cache_dir, label)
    target = folder / "model.onnx"
    if target.is_file():
        return target
    _ort()
    source = export(model_path, "onnx", cache_dir, label) if variant == "onnx-int8" else None
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temporary folder and rename: a crash or a second process never
    # sees a half-written model.
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        if source is None:
            built, names = _export_fp32(model_path, work)
        else:
            built = _quantize(source, work)
            names = json.loads((source.parent / "meta.json").read_text())["inputs"]
        final = work / "final"
        final.mkdir()
        shutil.move(str(built), final / "model.onnx")
        (final / "meta.json").write_text(json.dumps(
            {"source": str(model_path), "variant": variant, "recipe": RECIPE, "inputs": names},
            indent=1))
        try:
            os.replace(final, folder)
        except OSError:
            if not target.is_file():  # another process won the race: use theirs
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _export_fp32(model_path: str, work: Path) -> tuple[Path, list[str]]:
    import torch
    from sentence_transformers import SentenceTransformer

    # Eager attention traces to the MatMul/Softmax pattern that the optimizer fuses into
    # one Attention node; SDPA would export as a graph it does not recognize.
    try:
        model = SentenceTransformer(model_path, device="cpu", local_files_only=True,
                                    model_kwargs={"attn_implementation": "eager"})
    except Exception as exc:  # HF raises OSError/ValueError for anything unloadable
        raise OnnxBackendError(f"cannot load {model_path!r} for ONNX export: {exc}") from exc
    tokenizer = model.tokenizer
    names = [n for n in tokenizer.model_input_names
             if n in ("input_ids", "attention_mask", "token_type_ids")]
    sample = tokenizer(_PROBES, padding=True, return_tensors="pt")
    raw = work / "raw.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["sentence_embedding"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shape-dependent branches
        torch.onnx.export(_whole_model(model, names), tuple(sample[n] for n in names),
                          str(raw), input_names=names, output_names=["sentence_embedding"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    expected = model.encode(_PROBES, normalize_embeddings=True, convert_to_numpy=True)
    fused = _optimize(raw, work, model)
    for candidate in (fused, raw):
        if candidate is not None and _max_error(candidate, tokenizer, names, expected) < 1e-4:
            return candidate, names
    raise OnnxBackendError(f"the ONNX export of {model_path!r} does not match torch")


def _optimize(raw: Path, work: Path, model: Any) -> Path | None:
    config = model[0].auto_model.config
    kind = _FUSABLE.get(getattr(config, "model_type", ""))
    if kind is None:
        return None
    from onnxruntime.transformers import optimizer

    try:
        fused = optimizer.optimize_model(str(raw), model_type=kind,
                                         num_heads=int(config.num_attention_heads),
                                         hidden_size=int(config.hidden_size))
    except Exception:  # an unfusable graph is still a correct graph: keep the raw one
        return None
    out = work / "fused.onnx"
    fused.save_model_to_file(str(out))
    return out


def _quantize(fp32: Path, work: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "int8.onnx"
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return out


def _max_error(path: Path, tokenizer: Any, names: list[str], expected: np.ndarray) -> float:
    session = OnnxEncoder(path, tokenizer, max_length=512, names=names)
    got = session.encode(_PROBES, batch_size=len(_PROBES))
    return float(np.abs(got - expected).max())


class OnnxEncoder:
    """Runs an exported model: texts in, L2-normalized float32 vectors out.

    Texts are sorted by length and batched so that padding stays small, as
    sentence-transformers' ``encode`` does.
    """

    def __init__(self, path: Path, tokenizer: Any, max_length: int,
                 names: list[str] | None = None, threads: int | None = None) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise OnnxBackendError(f"cannot load ONNX model {path}: {exc}") from exc
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.names = names or [i.name for i in self.session.get_inputs()]

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit vectors, float32, in input order."""
        dim = int(self.session.get_outputs()[0].shape[-1])
        out = np.zeros((len(texts), dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            picked = order[start:start + batch_size]
            encoded = self.tokenizer([texts[i] for i in picked], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="np")
            feed = {n: np.asarray(encoded[n], dtype=np.int64) for n in self.names}
            out[picked] = self.session.run(None, feed)[0]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)
