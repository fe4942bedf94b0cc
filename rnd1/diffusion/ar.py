"""AR: plain next-token prediction, the objective of the base model a conversion starts from.

Output i predicts x0[i+1] for every i < L-1, weight 1, on the clean input with causal attention
(bidirectional attention would let each output see its target). Its loss is the exact NLL per
token over positions 1..L-1, the same positions A2D's bound covers, so the two read on one scale.
"""

from __future__ import annotations

import torch

from rnd1.diffusion.corruption import Corruption
from rnd1.diffusion.objective import Objective


class AR(Objective):
    name = "ar"
    masks = False
    shift = 1
    attention = "causal"

    def corrupt(self, x0: torch.Tensor, mask_id: int, *, loss_mask: torch.Tensor | None = None,
                **_) -> Corruption:
        """Nothing is masked; t = 1 (a weight of 1). Every position but the first is supervised
        (SFT: every response position)."""
        return Corruption(x0, torch.zeros_like(x0, dtype=torch.bool), torch.ones(x0.shape[0]),
                          self.maskable(x0, loss_mask))

    def supervised_positions(self, x0: torch.Tensor, c: Corruption) -> torch.Tensor:
        return self.maskable(x0) if c.maskable is None else c.maskable
