"""Model plugins: collation, the growing label vocabulary, loading by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.records import BatchSample
from tests.trainer.trainer_data import batch_samples, stdlib_functions
from trainer.config import TrainerSettings
from trainer.errors import PluginError
from trainer.loop import configure_optimizer
from trainer.models import IGNORE, BatchError, ByteLM, EmbeddingClassifier, load_plugin

CPU = torch.device("cpu")


def _samples(n: int = 24) -> list[BatchSample]:
    """``n`` samples spread over every package (the corpus is ordered by package)."""
    records = list(stdlib_functions(scale=0.1))
    return batch_samples(records[:: len(records) // n][:n], content_chars=400)


def test_builtin_and_module_factory_names_load_the_same_plugin() -> None:
    assert isinstance(load_plugin("embedding-classifier"), EmbeddingClassifier)
    assert isinstance(load_plugin("trainer.models:byte_lm", {"layers": 1}), ByteLM)
    with pytest.raises(PluginError, match="neither built in"):
        load_plugin("no-such-model")
    with pytest.raises(PluginError, match="cannot import"):
        load_plugin("trainer.models:nothing_here")
    with pytest.raises(PluginError, match="returned OrderedDict"):
        load_plugin("collections:OrderedDict")


def test_classifier_collates_little_endian_float16_embeddings() -> None:
    samples = _samples(4)
    batch = EmbeddingClassifier().collate("b", samples)
    expected = np.frombuffer(samples[2]["embedding"], "<f2").astype(np.float32)
    assert batch.inputs["x"].shape == (4, 384)
    assert torch.equal(batch.inputs["x"][2], torch.from_numpy(expected))
    with pytest.raises(BatchError, match="384"):
        EmbeddingClassifier(embedding_dim=128).collate("b", samples)


def test_a_new_class_grows_the_head_and_keeps_weights_and_adam_moments() -> None:
    plugin = EmbeddingClassifier()
    optimizer = configure_optimizer(plugin.module, TrainerSettings(), CPU)
    samples = _samples()
    first = [s for s in samples if s["label"] in ("asyncio", "xml")]
    plugin.add_labels(["asyncio", "xml"], optimizer)
    for _ in range(3):
        batch = plugin.collate("b", first)
        out = plugin.forward(batch, CPU)
        F.cross_entropy(out.logits, out.targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    head = plugin.module.head
    weight, moment = head.weight.detach().clone(), optimizer.state[head.weight]["exp_avg"].clone()
    hidden = plugin.module.body[1]
    assert isinstance(hidden, torch.nn.Linear)
    body = hidden.weight.detach().clone()

    plugin.add_labels(plugin.unseen_labels(plugin.collate("b", samples)), optimizer)

    assert plugin.labels[:2] == ["asyncio", "xml"] and len(plugin.labels) > 2
    assert head.weight.shape[0] == len(plugin.labels)
    assert torch.equal(head.weight[:2], weight)
    assert torch.equal(head.weight[2:], torch.zeros_like(head.weight[2:]))
    assert torch.equal(optimizer.state[head.weight]["exp_avg"][:2], moment)
    assert torch.equal(hidden.weight, body)
    assert any(p is head.weight for g in optimizer.param_groups for p in g["params"])
    # The grown model trains on every class at once.
    out = plugin.forward(plugin.collate("b", samples), CPU)
    assert (out.targets != IGNORE).all()
    F.cross_entropy(out.logits, out.targets).backward()
    optimizer.step()


def test_classifier_state_round_trips_with_its_vocabulary() -> None:
    plugin = EmbeddingClassifier(hidden=32)
    plugin.add_labels(["a", "b", "c"], None)
    torch.nn.init.normal_(plugin.module.head.weight)
    clone = load_plugin("embedding-classifier", plugin.config())
    clone.load_state_dict(plugin.state_dict())
    assert isinstance(clone, EmbeddingClassifier)
    assert clone.labels == ["a", "b", "c"]
    assert torch.equal(clone.module.head.weight, plugin.module.head.weight)


def test_byte_lm_predicts_each_next_byte_and_ignores_padding() -> None:
    plugin = ByteLM(block_size=16, dim=32, layers=1, heads=2)
    samples = _samples(3)
    samples[1] = BatchSample(**{**samples[1], "content": "abc"})
    batch = plugin.collate("b", samples)
    x, y = batch.inputs["x"], batch.inputs["y"]
    assert x.shape == (3, 16)
    assert bytes(x[1, :2].tolist()) == b"ab" and bytes(y[1, :2].tolist()) == b"bc"
    assert (y[1, 2:] == IGNORE).all()
    out = plugin.forward(batch, CPU)
    assert out.logits.shape == (48, 256)
    assert out.owner.tolist()[:17] == [0] * 16 + [1]
    with pytest.raises(BatchError):
        plugin.collate("b", [BatchSample(**{**samples[0], "content": "a"})])
