"""Log-likelihood of a continuation given a context, as benchmarks score multiple choice.

- AR models: exact, the sum of next-token log-probabilities of the continuation.
- Diffusion models (A2D / MDLM): a Monte Carlo estimate of the ELBO, as LLaDA and Dream score
  tasks. Only continuation tokens are ever masked; for each of K samples, t ~ U[eps, 1]
  (stratified over the K samples: low-discrepancy), each continuation token is masked with
  probability t, and the sample contributes (1/t) * sum over masked positions of log p(x0_j | x_t).
  Its expectation is the ELBO, a lower bound on log p(continuation | context); A2D predictions
  are read through the shift (position j from output j - 1). A block-diffusion model's bound is
  the sum of its per-block bounds, each block denoised next to the clean earlier ones.
"""

from __future__ import annotations

import torch

from rnd1.diffusion.corruption import Corruption
from rnd1.diffusion.objective import Objective, get_objective


@torch.no_grad()
def ar_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum log p(continuation | context), whether greedy decoding reproduces it)."""
    x = torch.tensor([context + continuation])
    logp = torch.log_softmax(model(x).float()[0, :-1], dim=-1)
    tgt = x[0, 1:]
    n0 = len(context) - 1
    lp = logp[n0:].gather(1, tgt[n0:, None]).squeeze(1)
    greedy = bool((logp[n0:].argmax(-1) == tgt[n0:]).all())
    return float(lp.sum()), greedy


@torch.no_grad()
def elbo_loglikelihood(model, context: list[int], continuation: list[int], *, mask_id: int,
                       objective: "str | Objective" = "a2d", num_samples: int = 32, eps: float = 1e-3,
                       batch_size: int = 16, generator: torch.Generator | None = None) -> float:
    """Monte Carlo ELBO of log p(continuation | context) with ``num_samples`` masks."""
    objective = get_objective(objective)
    if objective.shift and not context:
        raise ValueError(f"{objective.name} scoring needs a non-empty context (position 0 is never predicted)")
    x0 = torch.tensor(context + continuation)
    L, n0, n = len(x0), len(context), len(continuation)
    u = torch.rand((), generator=generator)
    ts = eps + (1 - eps) * ((u + torch.arange(num_samples) / num_samples) % 1.0)  # stratified t
    total = 0.0
    for s in range(0, num_samples, batch_size):
        t = ts[s:s + batch_size]
        B = len(t)
        m = torch.zeros(B, L, dtype=torch.bool)
        m[:, n0:] = torch.rand(B, n, generator=generator) < t[:, None]
        x_t = torch.where(m, torch.full_like(x0, mask_id).expand(B, L), x0.expand(B, L))
        # block diffusion: every block of a sample at its t (an unbiased estimate of the sum of
        # per-block bounds); the model reads [x_t | x0] with the objective's mask
        logits = objective.forward(model, Corruption(x_t, m, t), x0.expand(B, L))
        logp = torch.log_softmax(objective.predictions(logits.float(), L), dim=-1)
        lp = logp.gather(2, x0.expand(B, L)[..., None]).squeeze(2)
        lp = torch.where(m, lp, torch.zeros_like(lp))
        total += float((lp.sum(1) / t).sum())
    return total / num_samples


@torch.no_grad()
def loglikelihood_rolling(model, tokens: list[int], *, objective: "str | Objective", mask_id: int | None = None,
                          num_samples: int = 32, generator: torch.Generator | None = None) -> float:
    """Log-likelihood of a whole text (perplexity): exact for AR; for diffusion the ELBO of
    tokens[1:] given the first token."""
    return continuation_loglikelihood(model, tokens[:1], tokens[1:], objective=objective, mask_id=mask_id,
                                      num_samples=num_samples, generator=generator)


def continuation_loglikelihood(model, context: list[int], continuation: list[int], *,
                               objective: "str | Objective", mask_id: int | None = None, num_samples: int = 32,
                               generator: torch.Generator | None = None) -> float:
    """log p(continuation | context) the way ``objective`` reads the model: exact for an objective
    that does not mask (AR), the Monte Carlo ELBO for a diffusion objective."""
    objective = get_objective(objective)
    if not objective.masks:
        return ar_loglikelihood(model, context, continuation)[0]
    return elbo_loglikelihood(model, context, continuation, mask_id=mask_id, objective=objective,
                              num_samples=num_samples, generator=generator)
