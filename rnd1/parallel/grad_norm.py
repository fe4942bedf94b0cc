"""Global gradient-norm clipping that works for plain tensors and for DTensors on different meshes
(FSDP-sharded dense parameters and EP x FSDP-sharded experts live on different sub-meshes, which
``torch.nn.utils.clip_grad_norm_`` cannot mix)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def _local_sq_sum(g: torch.Tensor) -> torch.Tensor:
    """This rank's share of ||g||^2: the local shard's sum of squares, divided by the number of
    ranks holding an identical copy of it (Replicate placements), so a world-wide SUM is exact."""
    if isinstance(g, DTensor):
        copies = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if isinstance(p, Replicate))
        return g.to_local().float().pow(2).sum() / copies
    return g.float().pow(2).sum()


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip in place to ``max_norm`` (<= 0: measure only); return the total norm before clipping.
    Collective when any gradient is a DTensor: every rank must call it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([_local_sq_sum(g) for g in grads]).sum()
    if any(isinstance(g, DTensor) for g in grads) and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return norm
