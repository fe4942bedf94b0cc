"""torch.compile per transformer block (torchtitan's granularity).

Compiling blocks one by one keeps compile time independent of depth (all blocks share one
compiled graph), composes with FSDP2 (which hooks around each block) and with activation
checkpointing (applied before, so the checkpointed region is what gets compiled)."""

from __future__ import annotations

import torch


def apply_compile(model: torch.nn.Module, *, backend: str = "inductor", fullgraph: bool = True) -> None:
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, backend=backend, fullgraph=fullgraph)
