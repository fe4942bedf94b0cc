"""The objective as one object: what a training objective decides, asked in one place.

Everything that depends on *which* objective a run trains (ar, mdlm, a2d, or a new one) is a
method or attribute of an ``Objective``; the trainer, validation, the sampler, the ELBO, the task
scorer and the lm-eval adapter hold one and ask it. No other file compares objective names.

An objective answers five questions:

1. **How to corrupt** a clean batch x0: ``corrupt`` (``masks``: whether it uses the mask token at
   all; ``protected``: positions it never masks). Noise is keyed by each sequence's global sample
   index (``rnd1.diffusion.corruption``), so the layout never changes what a sample sees.
2. **Which outputs are supervised, against which targets, with which weights**: ``targets``.
   Output i of the model is read as a prediction for position i + ``shift``.
3. **How to read the prediction for position j** from the model's outputs: ``predictions``
   (the shift lives here and only here).
4. **Which attention it trains with**: ``attention`` (a recipe may keep attention causal for a
   while first: grafting).
5. **Its normaliser**: ``scored`` marks the positions whose likelihood the loss bounds; the
   default loss divides the weighted CE sum by their number in the global batch, which makes
   the diffusion loss the per-token negative ELBO (an upper bound on the NLL per token,
   comparable with the AR loss). ``normaliser="supervised"`` divides by the supervised outputs
   instead (the pre-NELBO convention; roughly twice the per-token bound for weights 1/t).

A new objective is one new file with a subclass plus one line in ``OBJECTIVES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnd1.diffusion.corruption import Corruption, corrupt_rows

NORMALISERS = ("maskable", "supervised")


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


class Objective:
    name: str = ""
    masks: bool = True  # corrupts with the mask token (diffusion); False: the input stays clean
    shift: int = 0  # output i predicts position i + shift
    attention: str = "bidirectional"  # what it trains with once any grafting phase is over

    def __init__(self, *, eps: float = 1e-3, low_discrepancy: bool = False, normaliser: str = "maskable"):
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if normaliser not in NORMALISERS:
            raise ValueError(f"normaliser {normaliser!r} unknown; expected one of {NORMALISERS}")
        self.eps, self.low_discrepancy, self.normaliser = eps, low_discrepancy, normaliser

    # ----------------------------------------------------------------- 1. corruption
    def protected(self, length: int) -> torch.Tensor:
        """[L] bool: positions this objective never masks."""
        return torch.zeros(length, dtype=torch.bool)

    def corrupt(self, x0: torch.Tensor, mask_id: int, *, seed: int, sample_ids: torch.Tensor,
                samples_per_step: int, fixed_t: float | None = None) -> Corruption:
        """x0 [B, L] -> x_t, masked, t (noise keyed by ``sample_ids``; ``fixed_t`` for validation)."""
        protect = self.protected(x0.shape[1]).to(x0.device).expand_as(x0)
        return corrupt_rows(x0, mask_id, seed=seed, sample_ids=sample_ids, samples_per_step=samples_per_step,
                            eps=self.eps, low_discrepancy=self.low_discrepancy, fixed_t=fixed_t, protect=protect)

    # ----------------------------------------------------------------- 2. supervision
    def supervised_positions(self, x0: torch.Tensor, c: Corruption) -> torch.Tensor:
        """[B, L] bool over *positions*: whose token the loss asks the model to predict."""
        return c.masked

    def position_weights(self, c: Corruption) -> torch.Tensor:
        """[B] weight of every supervised position of a row: 1/t, the masked-diffusion ELBO weight."""
        return 1.0 / c.t.float()

    def targets(self, x0: torch.Tensor, c: Corruption) -> Targets:
        """Supervised outputs, their target ids and weights, on the [B, L] grid of *outputs*:
        output i carries position i + shift."""
        B, L = x0.shape
        s = self.shift
        pos = self.supervised_positions(x0, c)
        select = torch.zeros_like(pos)
        targets = torch.zeros_like(x0)
        select[:, :L - s] = pos[:, s:]
        targets[:, :L - s] = x0[:, s:]
        w = self.position_weights(c).to(x0.device)[:, None].expand(B, L)
        return Targets(select, targets, torch.where(select, w, 0.0).float())

    # ----------------------------------------------------------------- 3. reading predictions
    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] model outputs -> [B, L, ...] predictions *for* each position (positions
        with no predicting output, the first ``shift`` ones, hold NaN)."""
        if self.shift == 0:
            return outputs
        out = torch.full_like(outputs, float("nan"))
        out[:, self.shift:] = outputs[:, :-self.shift]
        return out

    def output_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Index of the output that predicts each position."""
        return positions - self.shift

    # ----------------------------------------------------------------- 5. normaliser
    def scored(self, length: int) -> torch.Tensor:
        """[L] bool: positions whose likelihood the loss bounds: every position some output can
        predict and the objective may mask (a2d: 1..L-1; mdlm: all; ar: 1..L-1)."""
        ok = torch.arange(length) >= self.shift
        return ok & ~self.protected(length)

    def normaliser_count(self, x0: torch.Tensor, targets: Targets) -> torch.Tensor:
        """This micro-batch's share of the loss denominator (summed over the global batch)."""
        if self.normaliser == "supervised":
            return targets.num_targets.float()
        return (self.scored(x0.shape[1]).sum() * x0.shape[0]).float()


def get_objective(objective: "str | Objective", **kwargs) -> Objective:
    """An ``Objective`` by registry name (or the object itself, unchanged)."""
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} unknown; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective](**kwargs)


# The registry. Imported last: each objective's module subclasses ``Objective`` above.
from rnd1.diffusion.a2d import A2D  # noqa: E402
from rnd1.diffusion.ar import AR  # noqa: E402
from rnd1.diffusion.mdlm import MDLM  # noqa: E402

OBJECTIVES: dict[str, type[Objective]] = {"a2d": A2D, "mdlm": MDLM, "ar": AR}
