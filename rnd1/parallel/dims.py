"""Which rank holds which part of the work: data-parallel coordinates and the reductions the
trainer needs. Single-process runs use the same object with every degree equal to 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelDims:
    world_size: int = 1
    rank: int = 0
    dp_shard: int = 1  # FSDP degree
    dp_replicate: int = 1  # HSDP replicas
    ep: int = 1  # expert parallel degree (borrowed from the data-parallel ranks)
    mesh: object | None = None  # torch.distributed DeviceMesh when distributed

    @property
    def dp_size(self) -> int:
        """Ranks that read different data (EP ranks also read different data)."""
        return self.dp_shard * self.dp_replicate

    @property
    def dp_rank(self) -> int:
        return self.rank  # every rank is a data-parallel rank (no TP/PP)

    @property
    def dp_loss_scale(self) -> float:
        """Each rank's loss is already divided by the GLOBAL target count, so the right gradient
        is the SUM over data-parallel ranks; FSDP is set to sum (divide factor 1), hence 1."""
        return 1.0

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (identity in one process)."""
        if self.dp_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
