"""The training loss: weighted cross-entropy at the supervised positions only, normalised by the
number of target positions in the GLOBAL batch.

Only the selected hidden states reach the LM head (for a2d at mean t = 0.5 that is about half
the head's FLOPs and logits memory), and the cross-entropy itself runs through the fused,
chunked kernel (``kernels.masked_cross_entropy``), which never materialises [N, V] logits.

Normalisation: each micro-batch on each rank returns sum(w * CE) / N_global, where N_global counts
target positions over all micro-batches of the step and all data-parallel ranks. Summing these
(gradient accumulation adds, data-parallel reduction must SUM, not average) gives exactly the
full-batch loss and gradient, however the batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.masked_cross_entropy import masked_cross_entropy
from rnd1.diffusion.objectives import Targets


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: weighted CE sum / num_targets_global
    weighted_ce_sum: torch.Tensor
    num_targets: torch.Tensor  # local


def objective_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: Targets,
                   num_targets_global, *, ce_backend: str = "auto") -> LossOutput:
    sel = targets.select
    h = hidden[sel]  # [N, H]: only the supervised positions
    ce_sum = masked_cross_entropy(h, head_weight, targets.targets[sel], targets.weights[sel], backend=ce_backend)
    denom = torch.as_tensor(num_targets_global, dtype=torch.float32, device=hidden.device).clamp_min(1.0)
    return LossOutput(ce_sum / denom, ce_sum.detach(), sel.sum())
