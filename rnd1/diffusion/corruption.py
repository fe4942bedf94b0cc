"""The forward (noising) process of masked diffusion: draw a noise level t per sequence, then
replace each token by the mask token with probability t."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Corruption:
    x_t: torch.Tensor  # [B, L] corrupted ids
    masked: torch.Tensor  # [B, L] bool, True where x_t holds the mask token
    t: torch.Tensor  # [B] float32 noise level of each sequence


def sample_t(batch_size: int, *, eps: float = 1e-3, generator: torch.Generator | None = None,
             low_discrepancy: bool = False, device=None) -> torch.Tensor:
    """t ~ U[eps, 1] per sequence.

    ``low_discrepancy``: one uniform offset u and t_i from (u + i / B) mod 1, so a batch covers
    the noise range evenly (the stratified sampler of variational diffusion models): the same
    expectation, a lower-variance loss estimate."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if low_discrepancy:
        u = torch.rand((), generator=generator)
        r = (u + torch.arange(batch_size) / batch_size) % 1.0
    else:
        r = torch.rand(batch_size, generator=generator)
    return (eps + (1.0 - eps) * r).to(device=device, dtype=torch.float32)


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, mask_id: int, *, generator: torch.Generator | None = None,
                never_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token of row b independently with probability t[b]."""
    u = torch.rand(x0.shape, generator=generator).to(x0.device)
    masked = u < t.to(x0.device)[:, None]
    if never_mask is not None:
        masked &= ~never_mask
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def corrupt(x0: torch.Tensor, objective: str, mask_id: int, *, eps: float = 1e-3,
            generator: torch.Generator | None = None, low_discrepancy: bool = False,
            t: torch.Tensor | None = None, never_mask: torch.Tensor | None = None) -> Corruption:
    """Corrupt a batch for ``objective``. ``ar`` leaves it clean (t = 1, nothing masked);
    ``a2d`` never masks position 0 (there is no position -1 whose output could predict it).
    ``t`` fixes the noise levels (validation on a fixed grid)."""
    B, L = x0.shape
    if objective == "ar":
        return Corruption(x0, torch.zeros_like(x0, dtype=torch.bool), torch.ones(B))
    if objective not in ("mdlm", "a2d"):
        raise ValueError(f"objective {objective!r} unknown; expected 'ar', 'mdlm' or 'a2d'")
    if t is None:
        t = sample_t(B, eps=eps, generator=generator, low_discrepancy=low_discrepancy)
    protect = torch.zeros_like(x0, dtype=torch.bool)
    if objective == "a2d":
        protect[:, 0] = True
    if never_mask is not None:
        protect |= never_mask
    x_t, masked = mask_tokens(x0, t, mask_id, generator=generator, never_mask=protect)
    return Corruption(x_t, masked, t.float())
