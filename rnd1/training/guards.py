"""Numerics guard: a step whose loss or gradient norm is not finite is skipped, not applied."""

from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts skipped steps; past ``limit`` skips in a run it stops training, naming the step
    and the last good checkpoint to restart from."""

    def __init__(self, limit: int):
        self.limit, self.skipped = limit, 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, last_checkpoint=None) -> bool:
        """True when the optimiser may step. Called on every rank with the globally reduced
        loss and norm, so all ranks take the same decision. ``last_checkpoint`` is a callable
        returning (step, path) or None, only consulted when something went wrong."""
        if math.isfinite(float(loss)) and math.isfinite(float(grad_norm)):
            return True
        self.skipped += 1
        latest = last_checkpoint() if last_checkpoint is not None else None
        where = f"{latest[1]}" if latest else "none (no checkpoint saved yet)"
        print(f"[rnd1] step {step}: non-finite loss {float(loss)} / grad norm {float(grad_norm)}; "
              f"update skipped ({self.skipped}/{self.limit} allowed)", flush=True)
        if self.skipped > self.limit:
            raise NonFiniteError(
                f"step {step}: {self.skipped} non-finite steps exceed training.max_nonfinite_skips="
                f"{self.limit}; last good checkpoint: {where}")
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state.get("skipped", 0)
