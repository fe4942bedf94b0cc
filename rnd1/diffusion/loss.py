"""The training loss: weighted cross-entropy at the supervised outputs only.

Only the selected hidden states reach the LM head (for a2d at mean t = 0.5 that is about half
the head's FLOPs and logits memory), and the cross-entropy itself runs through the fused,
chunked kernel (``rnd1.kernels.masked_cross_entropy``), which never materialises [N, V] logits.

Normalisation happens once, outside: ``rnd1.training.step`` divides the weighted sum of every
micro-batch by the objective's normaliser counted over the GLOBAL batch (all micro-batches of
the step, all data-parallel ranks) before the first backward. Summing those parts (gradient
accumulation adds, the data-parallel reduction SUMS) gives exactly the full-batch loss and
gradient, however the batch is split.
"""

from __future__ import annotations

import torch

from rnd1.kernels.masked_cross_entropy import masked_cross_entropy
from rnd1.diffusion.objective import Targets


def weighted_ce_sum(hidden: torch.Tensor, head_weight: torch.Tensor, targets: Targets, *,
                    ce_backend: str = "auto") -> torch.Tensor:
    """sum over supervised outputs of weight * CE(head(hidden), target): a scalar."""
    rows = targets.rows if targets.rows is not None else targets.select.flatten().nonzero().squeeze(1)
    h = hidden.flatten(0, -2).index_select(0, rows)  # [N, H]: only the supervised outputs
    return masked_cross_entropy(h, head_weight, targets.targets.flatten().index_select(0, rows),
                                targets.weights.flatten().index_select(0, rows), backend=ce_backend)
