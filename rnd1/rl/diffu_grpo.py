"""diffu-GRPO, the policy loss of d1 (Zhao, Gupta, Zheng and Grover, 2025: "d1: Scaling Reasoning
in Diffusion Large Language Models via Reinforcement Learning", section 3.2).

GRPO (Shao et al., 2024) scores G completions o_1..o_G of each prompt q with a verifier, and
pushes up the log-probability of the tokens of completions that beat their group. It needs
log pi(o^k | q, o^<k) per token; a masked diffusion LM has no left-to-right factorisation, and
its exact sequence likelihood is intractable (the ELBO needs many masked forwards). d1's
estimate costs one forward pass:

    q'            = the prompt with each token replaced by [MASK] with probability p_mask
                    (d1: 0.15), drawn afresh for every gradient step
    x             = q' followed by the completion, *all* of it masked
    log pi(o^k)  ~= log p_theta(o^k | x)       the model's prediction at completion position k

(For A2D, the prediction for position k is read at output k - 1, as everywhere else: the
objective's ``predictions``.) The random prompt mask is d1's regulariser: with mu > 1 gradient
steps on one batch of rollouts, each step sees another view of the same prompts. The same mask
serves pi_theta, pi_old and pi_ref within a step, so their ratios compare like with like.

The loss for one prompt's group (d1 eq. 3, GRPO's clipped surrogate per token):

    rho_i^k = exp(log pi_theta(o_i^k) - log pi_old(o_i^k))
    A_i     = (r_i - mean_j r_j) / (std_j r_j + delta)          group-relative advantage
    L       = -1/G sum_i 1/|o_i| sum_k [ min(rho_i^k A_i, clip(rho_i^k, 1 - eps, 1 + eps) A_i)
                                         - beta KL_i^k ]
    KL_i^k  = exp(l_ref - l_theta) - (l_ref - l_theta) - 1      (the k3 estimator, >= 0)

beta = 0 (no reference model) is the default, as in DAPO and much recent work; with mu = 1,
pi_old is pi_theta detached and rho = 1, so clipping is inert (GRPO's on-policy case). A group
whose rewards are all equal has A = 0: it teaches nothing, and the trainer logs their share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rnd1.diffusion.objective import Objective


def group_advantages(rewards: torch.Tensor, *, scale: bool = True, delta: float = 1e-4) -> torch.Tensor:
    """[P, G] rewards (P prompts, G completions each) -> [P, G] advantages: minus the group mean,
    divided by the group's standard deviation (+ ``delta``) when ``scale`` (GRPO; Dr. GRPO
    drops the division)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, G >= 2], got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True)
    return torch.where(std > 0, centred / (std + delta), torch.zeros_like(centred))  # equal rewards: 0


def zero_advantage_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: the groups whose G rewards are all equal (advantage 0: no learning signal)."""
    return rewards.max(dim=1).values == rewards.min(dim=1).values


def zero_advantage_fraction(rewards: torch.Tensor) -> float:
    """Share of groups whose G rewards are all equal."""
    return zero_advantage_groups(rewards).float().mean().item()


def masked_view(sequences: torch.Tensor, prompt: torch.Tensor, completion: torch.Tensor, mask_id: int,
                p_mask: float, generator: "torch.Generator | list[torch.Generator]",
                objective: Objective) -> torch.Tensor:
    """d1's input: prompt tokens masked with probability ``p_mask`` (never the objective's
    protected positions, nor padding: ``prompt`` is False there), the completion all masked.
    ``prompt`` / ``completion``: [B, L] bool, the row's tokens ending at column L (left padding).

    The draws are row-relative: a row's uniforms run over its own tokens, from its first one,
    and its own first ``shift`` positions are the protected ones, so a row's mask does not depend
    on how much padding a longer row in its batch put before it. ``generator``: one, or one per
    row (the trainer keys each row's by step and rollout, so a resume draws the same masks)."""
    if not 0.0 <= p_mask < 1.0:
        raise ValueError(f"p_mask must be in [0, 1), got {p_mask}")
    B, L = sequences.shape
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * B
    row = prompt | completion
    draw = torch.zeros(B, L, dtype=torch.bool)
    protected = torch.zeros(B, L, dtype=torch.bool)
    shift = int(objective.protected(L).sum())  # the objective's first `shift` positions no output predicts
    for b in range(B):
        cols = torch.nonzero(row[b].cpu()).flatten()
        if len(cols):
            first = int(cols[0])
            draw[b, first:] = torch.rand(L - first, generator=gens[b]) < p_mask
            protected[b, first:first + shift] = True
    draw, protected = draw.to(sequences.device), protected.to(sequences.device)
    hide = (prompt & draw & ~protected) | completion
    return torch.where(hide, torch.full_like(sequences, mask_id), sequences)


def completion_logprobs(model, objective: Objective, view: torch.Tensor, sequences: torch.Tensor,
                        completion: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """[B, L] float32: log p(sequences[b, k] | view) at completion positions, 0 elsewhere.
    ``model_kwargs`` (doc_ids, positions) isolate left padding as the sampler does."""
    rows, cols = completion.nonzero(as_tuple=True)
    if hasattr(model, "lm_head"):  # the LM head only at the outputs that predict the completion
        h = model(view, return_hidden=True, **model_kwargs)
        logits_at = F.linear(h[rows, objective.output_index(cols)], model.lm_head.weight)
    else:
        logits_at = objective.predictions(model(view, **model_kwargs))[rows, cols]
    logp = torch.zeros(sequences.shape, dtype=torch.float32, device=sequences.device)
    picked = F.log_softmax(logits_at.float(), dim=-1)
    logp[rows, cols] = picked.gather(1, sequences[rows, cols][:, None]).squeeze(1)
    return logp


@dataclass
class PolicyLossStats:
    clipped_fraction: float  # completion tokens whose ratio left [1 - eps, 1 + eps]
    kl: float  # mean k3 KL per completion token (0 without a reference)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, completion: torch.Tensor,
                *, clip_eps: float = 0.2, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, PolicyLossStats]:
    """d1 eq. 3 over a batch of B completions (any number of groups): ``logp`` / ``old_logp`` /
    ``ref_logp`` [B, L], ``advantages`` [B], ``completion`` [B, L] bool. Each completion's tokens
    are averaged (1/|o_i|), then the completions (1/B)."""
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs the reference model's log-probabilities")
    mask = completion.float()
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].float()
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if beta:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
    per_token = -(surrogate - beta * kl) * mask
    lengths = mask.sum(1).clamp_min(1)
    loss = (per_token.sum(1) / lengths).mean()
    with torch.no_grad():
        tokens = mask.sum().clamp_min(1)
        clipped = (((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).float() * mask).sum() / tokens
        stats = PolicyLossStats(clipped_fraction=clipped.item(), kl=((kl * mask).sum() / tokens).item())
    return loss, stats
