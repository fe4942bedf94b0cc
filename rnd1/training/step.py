"""One step, as training, validation and the benchmark all run it.

``run_step`` takes the micro-batches of one optimiser step (or of one validation pass) and does,
for every one of them: corrupt (the objective, noise keyed by global sample index) -> supervised
outputs, targets, weights -> forward -> weighted CE at the supervised outputs -> divide by the
GLOBAL normaliser -> backward (training only). The normaliser (the objective's scored positions,
or its supervised outputs) is summed over every micro-batch and every data-parallel rank
*before* the first forward, so the parts add up to the full-batch loss and gradient however the
batch is split.

Training passes the step's micro-batches with noise drawn per sample. Validation passes every
(validation batch, grid t) pair as a micro-batch with that fixed t, without backward: the sum of
weighted CE over all of them divided once by the total normaliser is the fixed-quadrature
per-token NELBO (every grid point weighted equally). ``scripts/bench_train_step.py`` times this
same function.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rnd1.diffusion.corruption import pair_rows
from rnd1.diffusion.loss import weighted_ce_sum
from rnd1.diffusion.objective import Objective


@dataclass
class MicroBatch:
    x0: torch.Tensor  # [B, L] clean ids
    sample_ids: torch.Tensor  # [B] global sample index of each row (keys the noise)
    doc_ids: torch.Tensor | None = None  # [B, L] per-document attention, or None
    seed: int = 0  # noise seed (training: training.seed; validation: one per grid point)
    fixed_t: float | None = None  # validation: this noise level for every row
    loss_mask: torch.Tensor | None = None  # [B, L] bool: tokens that may be masked and scored (SFT: responses)


@dataclass
class StepResult:
    loss: torch.Tensor  # global weighted CE / global normaliser (the per-token NELBO by default)
    weighted_ce: torch.Tensor  # global weighted CE sum
    normaliser: torch.Tensor  # global normaliser count
    supervised: torch.Tensor  # global number of supervised outputs
    masked_frac: float  # this rank's fraction of masked tokens


@dataclass
class PreparedStep:
    """The step's micro-batches after corruption, before any forward: what ``run_prepared`` needs.
    Corruption runs on the host (noise keyed by sample index) and reads values; the forward and
    backward do not, so ``rnd1.tools.memory_estimate`` prepares on real tensors and then runs
    ``run_prepared`` on fake ones."""

    items: list[tuple]  # (x0, doc_ids, corruption, targets) per micro-batch
    normaliser: torch.Tensor  # this rank's scored positions (float64), summed over micro-batches
    masked_frac: float  # this rank's fraction of masked tokens


def prepare_step(objective: Objective, micro_batches: list[MicroBatch], *, mask_id: int,
                 samples_per_step: int) -> PreparedStep:
    """Corrupt every micro-batch and compute its targets and this rank's normaliser."""
    items = []
    normaliser = torch.zeros((), dtype=torch.float64)
    masked = 0.0
    for mb in micro_batches:
        x0, sample_ids, doc_ids, loss_mask = mb.x0, mb.sample_ids, mb.doc_ids, mb.loss_mask
        # complementary masking (training only): every row twice, the second masked where the
        # first is not; validation's fixed grid needs no variance reduction
        pairs = objective.complementary and mb.fixed_t is None
        if pairs:
            x0, sample_ids, doc_ids, loss_mask = pair_rows(x0, sample_ids, doc_ids, loss_mask)
        c = objective.corrupt(x0, mask_id, seed=mb.seed, sample_ids=sample_ids, samples_per_step=samples_per_step,
                              fixed_t=mb.fixed_t, loss_mask=loss_mask, complementary=pairs)
        tg = objective.targets(x0, c).with_rows()
        normaliser += objective.normaliser_count(x0, tg, loss_mask).double()
        masked += c.masked.float().mean().item() / len(micro_batches)
        items.append((x0, doc_ids, c, tg))
    return PreparedStep(items, normaliser, masked)


def run_step(model, objective: Objective, micro_batches: list[MicroBatch], *, mask_id: int,
             samples_per_step: int, **kwargs) -> StepResult:
    """Forward (and backward) over ``micro_batches``; returns global, detached totals. The keyword
    arguments are ``run_prepared``'s."""
    return run_prepared(model, objective, prepare_step(objective, micro_batches, mask_id=mask_id,
                                                       samples_per_step=samples_per_step), **kwargs)


def run_prepared(model, objective: Objective, prepared: PreparedStep, *, all_reduce=lambda t: t,
                 backward: bool = True, aux_coef: float = 0.0, aux_scale: float = 1.0, loss_scale: float = 1.0,
                 autocast=nullcontext, ce_backend: str = "auto", device: torch.device | str = "cpu") -> StepResult:
    """Forward (and backward) over prepared micro-batches.

    ``all_reduce`` sums a tensor over data-parallel ranks (identity in one process);
    ``aux_coef * aux_scale`` weighs each micro-batch's MoE load-balancing loss (training only;
    the trainer sets ``aux_scale = 1 / (micro-batches x data-parallel ranks)``)."""
    denom = all_reduce(prepared.normaliser.float().to(device)).clamp_min(1.0)
    ce_total = torch.zeros((), device=device)
    supervised = torch.zeros((), device=device)
    for x0, doc_ids, c, tg in prepared.items:
        tg = tg.to(device)
        with autocast():
            hidden = objective.forward(model, c, x0, doc_ids, device=device, return_hidden=True)
            ce = weighted_ce_sum(hidden, model.lm_head.weight, tg, ce_backend=ce_backend)
            if backward:
                loss = ce / denom * loss_scale
                if aux_coef > 0:
                    loss = loss + aux_coef * model.moe_aux_loss() * aux_scale
        if backward:
            loss.backward()
        ce_total += ce.detach().float()
        supervised += tg.num_targets.float()
    ce_global = all_reduce(ce_total)
    return StepResult(ce_global / denom, ce_global, denom, all_reduce(supervised), prepared.masked_frac)
