"""Model plugins: the built-in ones by name, any other as ``module:factory``."""

from __future__ import annotations

import importlib
from typing import Any

from trainer.errors import PluginError
from trainer.models.base import IGNORE, BatchError, ModelPlugin, Output, TrainBatch
from trainer.models.bytelm import ByteLM, byte_lm
from trainer.models.classifier import EmbeddingClassifier, embedding_classifier

BUILTIN = {
    "embedding-classifier": "trainer.models:embedding_classifier",
    "byte-lm": "trainer.models:byte_lm",
}

__all__ = [
    "BUILTIN",
    "IGNORE",
    "BatchError",
    "ByteLM",
    "EmbeddingClassifier",
    "ModelPlugin",
    "Output",
    "TrainBatch",
    "byte_lm",
    "embedding_classifier",
    "load_plugin",
]


def load_plugin(spec: str, options: dict[str, Any] | None = None) -> ModelPlugin:
    """Build the plugin named by ``spec`` (a built-in name or ``module:factory``).

    ``options`` are passed to the factory as keywords (a checkpoint's ``config()``). It
    imports and calls what ``spec`` names: hand it a configured spec, never one read from
    data such as a checkpoint (``trainer.run_state.build_model`` compares those).
    """
    target = BUILTIN.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(
            f"model {spec!r} is neither built in ({', '.join(BUILTIN)}) nor module:factory"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"model {spec!r}: cannot import {target}: {exc}") from exc
    try:
        plugin = factory(**(options or {}))
    except TypeError as exc:
        raise PluginError(f"model {spec!r}: factory rejected options {options}: {exc}") from exc
    if not isinstance(plugin, ModelPlugin):
        raise PluginError(f"model {spec!r}: {target} returned {type(plugin).__name__}, "
                          "not a trainer.models.ModelPlugin")
    return plugin
