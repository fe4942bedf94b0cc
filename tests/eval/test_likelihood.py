"""The ELBO estimator's expectation equals the exact sum over all masks (within Monte Carlo
error); AR log-likelihood is exact."""

import itertools
import math

import torch

from rnd1.eval.likelihood import ar_loglikelihood, elbo_loglikelihood, loglikelihood_rolling
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model

MASK = 511


def exact_elbo(model, context, continuation, objective, eps=1e-3):
    """E_t E_mask[(1/t) sum_masked log p]: enumerate the 2^n masks; integrate the weight
    t^(k-1) (1-t)^(n-k) over t ~ U[eps, 1] numerically."""
    n, n0 = len(continuation), len(context)
    x0 = torch.tensor(context + continuation)
    grid = torch.linspace(eps, 1, 200001, dtype=torch.float64)
    total = 0.0
    for bits in itertools.product([0, 1], repeat=n):
        k = sum(bits)
        if k == 0:
            continue
        w = torch.trapezoid(grid ** (k - 1) * (1 - grid) ** (n - k), grid).item() / (1 - eps)
        x = x0.clone()
        for j, b in enumerate(bits):
            if b:
                x[n0 + j] = MASK
        logits = model(x[None]).float()[0]
        pred = logits[:-1] if objective == "a2d" else logits
        offset = -1 if objective == "a2d" else 0
        lp = 0.0
        for j, b in enumerate(bits):
            if b:
                pos = n0 + j
                lp += torch.log_softmax(pred[pos + offset], -1)[x0[pos]].item()
        total += w * lp
    return total


def test_elbo_expectation_matches_exact_enumeration():
    model = build_model(get_preset("debug"), seed=0, attention_mode="bidirectional").eval()
    ctx, cont = [10, 11, 12, 13], [20, 21, 22]
    for objective in ("a2d", "mdlm"):
        exact = exact_elbo(model, ctx, cont, objective)
        g = torch.Generator().manual_seed(0)
        samples = torch.tensor([elbo_loglikelihood(model, ctx, cont, mask_id=MASK, objective=objective,
                                                   num_samples=16, generator=g) for _ in range(60)])
        mean, se = samples.mean().item(), samples.std().item() / math.sqrt(len(samples))
        assert abs(mean - exact) < 4 * se + 1e-3, (objective, mean, exact, se)


def test_elbo_is_below_the_true_loglikelihood_scale_and_finite():
    model = build_model(get_preset("debug"), seed=0, attention_mode="bidirectional").eval()
    v = elbo_loglikelihood(model, [1, 2, 3], [4, 5], mask_id=MASK, num_samples=8)
    assert math.isfinite(v) and v < 0


def test_ar_loglikelihood_is_the_exact_sum():
    model = build_model(get_preset("debug"), seed=0, attention_mode="causal").eval()
    ctx, cont = [3, 4, 5], [6, 7]
    lp, _ = ar_loglikelihood(model, ctx, cont)
    logits = model(torch.tensor([ctx + cont])).float()[0]
    manual = torch.log_softmax(logits[2], -1)[6] + torch.log_softmax(logits[3], -1)[7]
    assert abs(lp - manual.item()) < 1e-5
    assert abs(loglikelihood_rolling(model, ctx + cont, objective="ar") -
               ar_loglikelihood(model, ctx[:1], ctx[1:] + cont)[0]) < 1e-6
