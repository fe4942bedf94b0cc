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


def _row_generator(seed: int, key: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + key * 0x85EBCA77 + 0x632BE5AB) % (2**63 - 1))


def corrupt_rows(x0: torch.Tensor, mask_id: int, *, seed: int, sample_ids: torch.Tensor, samples_per_step: int,
                 eps: float = 1e-3, low_discrepancy: bool = False, fixed_t: float | None = None,
                 protect: torch.Tensor | None = None) -> Corruption:
    """Mask each token of row b with probability t_b, never where ``protect`` [B, L] is True.

    Noise is keyed by each sequence's global sample index, not by where the sequence happens to
    be processed: the same sample gets the same t and mask whatever the number of ranks or
    gradient-accumulation steps, and after a resume (no RNG state needed).

    ``low_discrepancy`` stratifies t over the global batch of ``samples_per_step`` sequences:
    t_g = eps + (1 - eps) * ((u_step + (g mod G) / G) mod 1), u_step drawn per step.
    ``fixed_t`` gives every row that noise level (validation on a fixed grid). Which positions
    are protected is the objective's business (``rnd1.diffusion.objective``)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    ts, masks = [], []
    for g in sample_ids.tolist():
        gen = _row_generator(seed, g)
        if fixed_t is not None:
            t = torch.tensor([float(fixed_t)])
        elif low_discrepancy:
            step, pos = divmod(g, samples_per_step)
            u = torch.rand((), generator=_row_generator(seed, -1 - step)).item()
            r = (u + pos / samples_per_step) % 1.0
            t = torch.tensor([eps + (1.0 - eps) * r])
        else:
            t = sample_t(1, eps=eps, generator=gen)
        ts.append(t)
        masks.append(torch.rand(x0.shape[1], generator=gen))
    t = torch.cat(ts).float()
    u = torch.stack(masks).to(x0.device)
    masked = u < t.to(x0.device)[:, None]
    if protect is not None:
        masked &= ~protect.to(x0.device)
    return Corruption(torch.where(masked, torch.full_like(x0, mask_id), x0), masked, t)
