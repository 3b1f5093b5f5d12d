"""The training loss: cross-entropy over a batch's positions, weighted per sample.

Each curated sample carries an importance weight (its class's target share over its
natural share). Re-balanced sampling shows the model a class mix it would not see in the
stream; weighting each sample's loss by the inverse of that ratio (``trainer.batches``)
undoes the shift in the model's class priors where that is wanted
(``trainer.loss_weights``). The weights are normalized per batch to sum to the batch size,
so they move the loss between samples without changing its scale, and the learning rate
means the same with them and without.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.errors import TrainerError
from trainer.models.base import IGNORE, Output


class WeightError(TrainerError):
    """A batch's weights cannot weight a loss (not finite, negative, or all zero)."""


def normalized_weights(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` scaled to sum to their count (mean 1); ``WeightError`` if they cannot be."""
    w = weights.float()
    if not torch.isfinite(w).all():
        raise WeightError(f"weights must be finite: {w.tolist()}")
    if (w < 0).any():
        raise WeightError(f"weights must not be negative: {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise WeightError("weights sum to 0: no sample would carry any loss")
    return w * (len(w) / total)


def batch_loss(out: Output, weights: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the valid positions of ``out``, each position weighted by
    its sample's normalized weight (``None``: unweighted).

    Positions whose target is ``IGNORE`` carry nothing. Equal weights give exactly the
    unweighted loss; a sample of weight 0 contributes no gradient.
    """
    if weights is None:
        return F.cross_entropy(out.logits, out.targets, ignore_index=IGNORE,
                               label_smoothing=label_smoothing)
    tok = F.cross_entropy(out.logits, out.targets, reduction="none", ignore_index=IGNORE,
                          label_smoothing=label_smoothing)
    valid = (out.targets != IGNORE).to(tok.dtype)
    w = normalized_weights(weights).to(tok.device)[out.owner] * valid
    # A weighted mean: the denominator is the weight of the positions that count, so equal
    # weights reduce to cross_entropy's own mean over non-ignored positions.
    return (tok * w).sum() / w.sum().clamp_min(torch.finfo(tok.dtype).tiny)
