"""The objective as one object: what a training objective decides, asked in one place.

Everything that depends on *which* objective a run trains (ar, mdlm, a2d, block diffusion, or a
new one) is a method or attribute of an ``Objective``; the trainer, validation, the sampler, the
ELBO, the task scorer and the lm-eval adapter hold one and ask it. No other file compares
objective names.

An objective answers six questions:

1. **How to corrupt** a clean batch x0: ``corrupt`` (``masks``: whether it uses the mask token at
   all; ``protected``: positions it never masks; the data's ``loss_mask``: tokens it never
   masks either, e.g. SFT prompts). Noise is keyed by each sequence's global sample index
   (``rnd1.diffusion.corruption``), so the layout never changes what a sample sees.
   ``complementary`` objectives see every sample twice, masked complementarily.
2. **Which outputs are supervised, against which targets, with which weights**: ``targets``.
   Output i of the model is read as a prediction for position i + ``shift``.
3. **What the model reads**: ``model_inputs`` / ``forward`` (x_t, or block diffusion's
   [x_t | x0] stream with its own attention mask).
4. **How to read the prediction for position j** from the model's outputs: ``predictions``
   (the shift lives here and only here).
5. **Which attention it trains with**: ``attention`` (a recipe may keep attention causal for a
   while first: grafting).
6. **Its normaliser**: ``scored`` marks the positions whose likelihood the loss bounds (inside
   the data's loss mask: the response tokens of SFT); the default loss divides the weighted CE
   sum by their number in the global batch, which makes the diffusion loss the per-token
   negative ELBO (an upper bound on the NLL per token, comparable with the AR loss).
   ``normaliser="supervised"`` divides by the supervised outputs instead (the pre-NELBO
   convention; roughly twice the per-token bound for weights 1/t).

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
    rows: torch.Tensor | None = None  # [N] long: flat indices of ``select`` (``with_rows``)

    @property
    def num_targets(self) -> torch.Tensor:
        return self.select.sum()

    def with_rows(self) -> "Targets":
        """The selected outputs as flat indices, computed once where ``select`` lives (the host):
        the loss then gathers a known number of rows, so the device never reports a count back
        (a boolean index on CUDA is a host sync) and fake tensors, which hold no values, can run
        the step (rnd1.tools.memory_estimate)."""
        return Targets(self.select, self.targets, self.weights, self.select.flatten().nonzero().squeeze(1))

    def to(self, device) -> "Targets":
        rows = None if self.rows is None else self.rows.to(device)
        return Targets(self.select.to(device), self.targets.to(device), self.weights.to(device), rows)


class Objective:
    name: str = ""
    masks: bool = True  # corrupts with the mask token (diffusion); False: the input stays clean
    shift: int = 0  # output i predicts position i + shift
    attention: str = "bidirectional"  # what it trains with once any grafting phase is over

    def __init__(self, *, eps: float = 1e-3, low_discrepancy: bool = False, normaliser: str = "maskable",
                 complementary: bool = False):
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if normaliser not in NORMALISERS:
            raise ValueError(f"normaliser {normaliser!r} unknown; expected one of {NORMALISERS}")
        if complementary and not self.masks:
            raise ValueError(f"complementary masking needs a masking objective, not {self.name!r}")
        self.eps, self.low_discrepancy, self.normaliser = eps, low_discrepancy, normaliser
        self.complementary = complementary

    # ----------------------------------------------------------------- 1. corruption
    def protected(self, length: int) -> torch.Tensor:
        """[L] bool: positions this objective never masks: the first ``shift`` ones, which no
        output predicts (a2d, ar: position 0)."""
        return torch.arange(length) < self.shift

    def maskable(self, x0: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] bool: positions the objective may mask and scores: not ``protected``, and inside
        the data's ``loss_mask`` when there is one (SFT: response tokens only; a prompt token is
        never masked, so never supervised, and never counted in the normaliser)."""
        ok = ~self.protected(x0.shape[1]).to(x0.device).expand_as(x0)
        return ok if loss_mask is None else ok & loss_mask.to(x0.device)

    def corrupt(self, x0: torch.Tensor, mask_id: int, *, seed: int, sample_ids: torch.Tensor,
                samples_per_step: int, fixed_t: float | None = None,
                loss_mask: torch.Tensor | None = None, complementary: bool = False) -> Corruption:
        """x0 [B, L] -> x_t, masked, t (noise keyed by ``sample_ids``; ``fixed_t`` for validation).
        ``complementary``: rows come in pairs holding the same sample (``pair_rows``); the second
        row's mask is the first's complement inside the maskable positions, its t is 1 - t."""
        return corrupt_rows(x0, mask_id, seed=seed, sample_ids=sample_ids, samples_per_step=samples_per_step,
                            eps=self.eps, low_discrepancy=self.low_discrepancy, fixed_t=fixed_t,
                            protect=~self.maskable(x0, loss_mask), complementary=complementary)

    # ----------------------------------------------------------------- 2. supervision
    def supervised_positions(self, x0: torch.Tensor, c: Corruption) -> torch.Tensor:
        """[B, L] bool over *positions*: whose token the loss asks the model to predict."""
        return c.masked

    def position_weights(self, c: Corruption) -> torch.Tensor:
        """[B, L] weight of each supervised position: 1/t of its row, the masked-diffusion ELBO
        weight (block diffusion: 1/t of its block)."""
        return (1.0 / c.t_per_position().float())

    def targets(self, x0: torch.Tensor, c: Corruption) -> Targets:
        """Supervised outputs, their target ids and weights, on the [B, L] grid of *outputs*:
        output i carries position i + shift."""
        s = self.shift
        L = x0.shape[1]
        pos = self.supervised_positions(x0, c)
        w = self.position_weights(c).to(x0.device)
        select = torch.zeros_like(pos)
        targets = torch.zeros_like(x0)
        weights = torch.zeros(pos.shape, dtype=torch.float32, device=x0.device)
        select[:, :L - s] = pos[:, s:]
        targets[:, :L - s] = x0[:, s:]
        weights[:, :L - s] = w[:, s:]
        return Targets(select, targets, torch.where(select, weights, 0.0))

    # ----------------------------------------------------------------- the forward pass
    def model_inputs(self, c: Corruption, x0: torch.Tensor, doc_ids: torch.Tensor | None = None) -> dict:
        """Keyword arguments of the model's forward for this corruption: the corrupted ids (and
        the documents). Block diffusion feeds [x_t | x0] with its own mask instead."""
        return {"input_ids": c.x_t, "doc_ids": doc_ids}

    def forward(self, model, c: Corruption, x0: torch.Tensor, doc_ids: torch.Tensor | None = None, *,
                device=None, **kwargs) -> torch.Tensor:
        """``model`` on this corruption's inputs (moved to ``device``): what training, validation,
        the ELBO and held-out scoring all run. ``kwargs`` go to the model (``return_hidden``)."""
        inputs = {k: v if device is None else v.to(device)
                  for k, v in self.model_inputs(c, x0, doc_ids).items() if v is not None}
        return model(inputs.pop("input_ids"), **inputs, **kwargs)

    # ----------------------------------------------------------------- 3. reading predictions
    def predictions(self, outputs: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """[B, L, ...] outputs of ``model(**model_inputs(...))`` for sequences of ``length`` -> [B, L, ...]
        predictions *for* each position (positions with no predicting output, the first ``shift``
        ones, hold NaN)."""
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
        predict and the objective may mask (a2d: 1..L-1; mdlm: all; ar: 1..L-1). A data
        ``loss_mask`` narrows it further (``normaliser_count``)."""
        ok = torch.arange(length) >= self.shift
        return ok & ~self.protected(length)

    def normaliser_count(self, x0: torch.Tensor, targets: Targets,
                         loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """This micro-batch's share of the loss denominator (summed over the global batch): its
        scored positions (inside ``loss_mask``: per response token for SFT), or its supervised
        outputs."""
        if self.normaliser == "supervised":
            return targets.num_targets.float()
        scored = self.scored(x0.shape[1])
        if loss_mask is None:
            return (scored.sum() * x0.shape[0]).float()
        return (loss_mask.to(scored.device) & scored).sum().float()


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
from rnd1.diffusion.block import BlockA2D, BlockMDLM  # noqa: E402
from rnd1.diffusion.mdlm import MDLM  # noqa: E402

OBJECTIVES: dict[str, type[Objective]] = {"a2d": A2D, "mdlm": MDLM, "ar": AR,
                                          "block_a2d": BlockA2D, "block_mdlm": BlockMDLM}
