"""``byte-lm``: a small causal transformer over the UTF-8 bytes of the content.

No tokenizer to ship or version: 256 symbols, any language, any code. Each sample
contributes its first ``block_size + 1`` bytes (deterministic, so a resumed run sees the
same tensors); shorter samples are padded and their padding carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from schemas.records import BatchSample
from trainer.models.base import IGNORE, BatchError, ModelPlugin, Output, TrainBatch

VOCAB = 256


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) → (B, T, dim)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """Byte and position embeddings, ``layers`` blocks, a head tied to the byte embedding."""

    def __init__(self, block_size: int, dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as in GPT-2 / nanoGPT
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Byte ids (B, T) → next-byte logits (B, T, 256)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.ln(x))
        return out


class ByteLM(ModelPlugin):
    """Next-byte prediction over the samples' content."""

    name = "byte-lm"
    task = "lm"

    def __init__(
        self,
        block_size: int = 128,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        self.options = {
            "block_size": block_size, "dim": dim, "layers": layers, "heads": heads,
            "dropout": dropout,
        }
        super().__init__(ByteTransformer(block_size, dim, layers, heads, dropout))
        self.block_size = block_size

    def config(self) -> dict[str, Any]:
        """See ``ModelPlugin.config``."""
        return dict(self.options)

    def collate(self, batch_id: str, samples: Sequence[BatchSample]) -> TrainBatch:
        """Inputs ``x`` (B, T) and next-byte targets ``y`` (B, T), padding ignored."""
        kept = [(s, s["content"].encode("utf-8")[: self.block_size + 1]) for s in samples]
        kept = [(s, data) for s, data in kept if len(data) >= 2]
        if not kept:
            raise BatchError(f"batch {batch_id} has no sample of at least 2 bytes")
        width = max(len(data) for _, data in kept) - 1
        x = torch.zeros((len(kept), width), dtype=torch.long)
        y = torch.full((len(kept), width), IGNORE, dtype=torch.long)
        for row, (_, data) in enumerate(kept):
            seq = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
            x[row, : len(seq) - 1] = seq[:-1]
            y[row, : len(seq) - 1] = seq[1:]
        return TrainBatch(
            batch_id, [s["id"] for s, _ in kept], [s["label"] for s, _ in kept], {"x": x, "y": y}
        )

    def forward(self, batch: TrainBatch, device: torch.device) -> Output:
        """One position per input byte."""
        inputs = batch.to(device)
        logits = self._call(inputs["x"])
        b, t = inputs["x"].shape
        owner = torch.arange(b, device=device).repeat_interleave(t)
        return Output(logits.reshape(b * t, VOCAB), inputs["y"].reshape(b * t), owner)


def byte_lm(**options: Any) -> ByteLM:
    """Factory for ``--model byte-lm`` (``trainer.models:byte_lm``)."""
    return ByteLM(**options)
