"""The forward (noising) process of masked diffusion: draw a noise level t per sequence, then
replace each token by the mask token with probability t."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Corruption:
    x_t: torch.Tensor  # [B, L] corrupted ids
    masked: torch.Tensor  # [B, L] bool, True where x_t holds the mask token
    t: torch.Tensor  # [B] float32 noise level of each sequence; block diffusion: [B, blocks], one per block
    maskable: torch.Tensor | None = None  # [B, L] bool: positions that could have been masked
    block_size: int = 0  # > 0: t holds one noise level per block of this many positions

    def t_per_position(self) -> torch.Tensor:
        """[B, L] the noise level each position was masked with."""
        L = self.x_t.shape[1]
        if self.t.dim() == 1:
            return self.t[:, None].expand(-1, L)
        block = torch.arange(L, device=self.t.device) // self.block_size
        return self.t[:, block]


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
                 protect: torch.Tensor | None = None, block_size: int = 0,
                 complementary: bool = False) -> Corruption:
    """Mask each token of row b with probability t_b, never where ``protect`` [B, L] is True.

    Noise is keyed by each sequence's global sample index, not by where the sequence happens to
    be processed: the same sample gets the same t and mask whatever the number of ranks or
    gradient-accumulation steps, and after a resume (no RNG state needed).

    ``low_discrepancy`` stratifies t over the global batch of ``samples_per_step`` sequences:
    t_g = eps + (1 - eps) * ((u_step + (g mod G) / G) mod 1), u_step drawn per step.
    ``fixed_t`` gives every row that noise level (validation on a fixed grid). Which positions
    are protected is the objective's business (``rnd1.diffusion.objective``).

    ``block_size`` > 0 (block diffusion): each block of that many positions draws its own t
    (t is then [B, blocks]); the draws come first in the row's stream, block 0's exactly where
    the whole row's t is drawn otherwise, so one block covering the row gives the same noise as
    no blocks at all. Low discrepancy then stratifies the (sample, block) pairs of the step.

    ``complementary`` (LLaDA 2.0's SFT): rows come in pairs holding the same sample; the second
    row masks exactly the maskable positions the first leaves clean (u >= t instead of u < t), so
    it is masked with probability 1 - t, which is its t. The first row's t is then drawn from
    [eps, 1 - eps], so neither weight exceeds 1/eps. Each row is an unbiased estimate on its
    own; together every maskable token is supervised once per pair."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    B, L = x0.shape
    ids = sample_ids.tolist()
    n_blocks = -(-L // block_size) if block_size > 0 else 1
    if complementary and (B % 2 or any(ids[i] != ids[i + 1] for i in range(0, B, 2))):
        raise ValueError("complementary masking needs rows in pairs of the same sample (use pair_rows)")
    # complementary pairs draw t in [eps, 1 - eps], so the second row's 1 - t keeps the eps floor
    # that bounds every 1/t weight
    span = 1.0 - (2 * eps if complementary else eps)
    strata = samples_per_step * n_blocks
    ts, us = [], []
    for r, g in enumerate(ids):
        if complementary and r % 2:  # the pair's second row: the first row's draws
            ts.append(ts[-1])
            us.append(us[-1])
            continue
        gen = _row_generator(seed, g)
        row_t = []
        for k in range(n_blocks):
            if fixed_t is not None:
                t = torch.tensor([float(fixed_t)])
            elif low_discrepancy:  # stratum k * G + pos: the blocks of one row land far apart
                step, pos = divmod(g, samples_per_step)
                u = torch.rand((), generator=_row_generator(seed, -1 - step)).item()
                r_ = (u + (k * samples_per_step + pos) / strata) % 1.0
                t = torch.tensor([eps + span * r_])
            else:
                t = (eps + span * torch.rand(1, generator=gen)).float()
            row_t.append(t)
        ts.append(torch.cat(row_t))
        us.append(torch.rand(L, generator=gen))
    t = torch.stack(ts).float()  # [B, n_blocks]
    u = torch.stack(us).to(x0.device)
    block = torch.arange(L) // block_size if block_size > 0 else torch.zeros(L, dtype=torch.long)
    t_pos = t[:, block].to(x0.device)
    masked = u < t_pos
    if complementary:
        second = torch.arange(B, device=x0.device) % 2 == 1
        masked = torch.where(second[:, None], ~masked, masked)
        t = torch.where(second[:, None].cpu(), 1.0 - t, t)
    maskable = torch.ones_like(masked) if protect is None else ~protect.to(x0.device)
    masked &= maskable
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    if block_size > 0:
        return Corruption(x_t, masked, t, maskable, block_size)
    return Corruption(x_t, masked, t[:, 0], maskable)


def pair_rows(*tensors: torch.Tensor | None) -> tuple:
    """Each row twice in a row (for complementary masking): [B, ...] -> [2B, ...]; None stays None."""
    return tuple(None if x is None else x.repeat_interleave(2, dim=0) for x in tensors)
