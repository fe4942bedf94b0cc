"""Which positions are supervised, against which targets, with which weights.

Three objectives, all expressed as (select, targets, weights) over the [B, L] grid of the
model's outputs, so one loss function serves them all:

- ``ar``: output i predicts x0[i+1] (plain next-token prediction), weight 1.
- ``mdlm`` (RND1 eq. 1): output i predicts x0[i] where x_t[i] is masked, weight 1/t.
- ``a2d`` (RND1 eq. 2): output i predicts x0[i+1] where x_t[i+1] is masked, weight 1/t. The AR
  head keeps its next-token meaning, which is why a pretrained AR model converts so cheaply.

Worked a2d example, one row with t = 0.5::

    x0      = [A, B, C, D]
    x_t     = [A, M, C, M]          masked = [0, 1, 0, 1]   (position 0 is never masked)
    select  = [1, 0, 1, 0]          output 0 predicts B, output 2 predicts D
    targets = [B, ., D, .]          weights = [2, 0, 2, 0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Targets:
    select: torch.Tensor  # [B, L] bool: outputs that reach the LM head
    targets: torch.Tensor  # [B, L] long: meaningful where select
    weights: torch.Tensor  # [B, L] float32: 1/t (or 1), 0 where not selected

    @property
    def num_targets(self) -> torch.Tensor:
        return self.select.sum()

    def to(self, device) -> "Targets":
        return Targets(self.select.to(device), self.targets.to(device), self.weights.to(device))


def build_targets(objective: str, x0: torch.Tensor, x_t: torch.Tensor, masked: torch.Tensor,
                  t: torch.Tensor) -> Targets:
    B, L = x0.shape
    inv_t = (1.0 / t.float()).to(x0.device)[:, None].expand(B, L)
    shifted = torch.zeros_like(x0)
    shifted[:, :-1] = x0[:, 1:]
    if objective == "ar":
        select = torch.ones_like(x0, dtype=torch.bool)
        select[:, -1] = False
        targets, weights = shifted, select.float()
    elif objective == "mdlm":
        select = masked.clone()
        targets, weights = x0.clone(), torch.where(select, inv_t, 0.0)
    elif objective == "a2d":
        select = torch.zeros_like(masked)
        select[:, :-1] = masked[:, 1:]
        targets, weights = shifted, torch.where(select, inv_t, 0.0)
    else:
        raise ValueError(f"objective {objective!r} unknown; expected 'ar', 'mdlm' or 'a2d'")
    return Targets(select, targets, weights.float())
