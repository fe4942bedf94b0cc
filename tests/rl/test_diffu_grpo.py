"""diffu-GRPO's pieces (rnd1.rl.diffu_grpo) against hand-computed values and the model."""

import math

import pytest
import torch

from rnd1.diffusion.objective import get_objective
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model
from rnd1.rl.diffu_grpo import (completion_logprobs, group_advantages, masked_view, policy_loss,
                                zero_advantage_fraction)


def test_group_advantages_and_zero_advantage_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = group_advantages(r, delta=0.0)
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s) and torch.all(a[1] == 0)
    assert torch.allclose(group_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert zero_advantage_fraction(r) == 0.5
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_masked_view_masks_the_completion_and_some_prompt_tokens():
    a2d = get_objective("a2d")
    seq = torch.arange(1, 41).reshape(2, 20)
    prompt = torch.zeros(2, 20, dtype=torch.bool)
    prompt[:, :12] = True
    prompt[1, :3] = False  # left padding in row 1
    completion = torch.zeros_like(prompt)
    completion[:, 12:] = True
    g = torch.Generator().manual_seed(0)
    view = masked_view(seq, prompt, completion, 99, 0.5, g, a2d)
    assert torch.all(view[completion] == 99)
    hidden = (view == 99) & prompt
    assert 0 < hidden.sum() < prompt.sum()  # some prompt tokens, not all
    assert not hidden[:, 0].any() and torch.all(view[1, :3] == seq[1, :3])  # protected, padding kept
    assert torch.equal(masked_view(seq, prompt, completion, 99, 0.0, g, a2d)[prompt], seq[prompt])
    nearly_all = masked_view(seq, prompt, completion, 99, 0.99, g, a2d)
    assert torch.equal(nearly_all[1, :3], seq[1, :3]) and torch.equal(nearly_all[:, 0], seq[:, 0])
    assert (nearly_all[prompt] == 99).float().mean() > 0.8
    assert view[1, 3] == seq[1, 3] and nearly_all[1, 3] == seq[1, 3]  # a padded row's own first token


def test_masked_view_is_row_relative():
    """A row's prompt mask is the same whatever padding a longer row put before it: the draws run
    over the row's own tokens (a rollout's mask is keyed by step and rollout, not by its batch)."""
    a2d = get_objective("a2d")
    row = torch.arange(1, 17)
    prompt = torch.zeros(16, dtype=torch.bool)
    prompt[:10] = True
    masks = []
    for pad in (0, 5):
        seq = torch.cat([torch.zeros(pad, dtype=torch.long), row])[None]
        p = torch.cat([torch.zeros(pad, dtype=torch.bool), prompt])[None]
        c = torch.cat([torch.zeros(pad, dtype=torch.bool), ~prompt])[None]
        view = masked_view(seq, p, c, 99, 0.5, [torch.Generator().manual_seed(7)], a2d)
        masks.append(view[0, pad:])
    assert torch.equal(masks[0], masks[1]) and (masks[0][:10] == 99).any()


def test_completion_logprobs_read_the_a2d_shift():
    model = build_model(get_preset("debug"), seed=0).eval()
    model.set_attention_mode("bidirectional")
    a2d = get_objective("a2d")
    seq = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    completion = torch.zeros(2, 16, dtype=torch.bool)
    completion[:, 10:] = True
    view = torch.where(completion, torch.full_like(seq, model.config.mask_token_id), seq)
    with torch.no_grad():
        logp = completion_logprobs(model, a2d, view, seq, completion)
        ref = torch.log_softmax(model(view).float(), -1)
    assert torch.all(logp[~completion] == 0)
    # position 12 is predicted by output 11 (A2D: output i predicts token i + 1)
    assert torch.allclose(logp[0, 12], ref[0, 11, seq[0, 12]], atol=1e-6)


def test_policy_loss_on_policy_is_minus_the_mean_advantage_and_its_gradient_follows_a():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    completion = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(logp, logp.detach(), adv, completion)
    assert loss.item() == pytest.approx(0.0) and stats.clipped_fraction == 0.0 and stats.kl == 0.0
    loss.backward()
    # d loss / d logp = -A / |o_i| / B on completion tokens (ratio 1): up for A > 0, down for A < 0
    expected = torch.tensor([[-0.25, -0.25, 0.0], [1 / 6, 1 / 6, 1 / 6]])
    assert torch.allclose(logp.grad, expected)


def test_policy_loss_clips_and_adds_the_k3_kl():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    completion = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), completion, clip_eps=0.2)
    # A > 0: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5 -> loss = -(1.2 + 0.5) / 2
    assert loss.item() == pytest.approx(-0.85) and stats.clipped_fraction == 1.0
    ref = torch.zeros(1, 2)
    loss_kl, stats = policy_loss(logp, old, torch.tensor([1.0]), completion, beta=0.1, ref_logp=ref)
    kl = [1 / 1.5 + math.log(1.5) - 1, 1 / 0.5 + math.log(0.5) - 1]
    assert stats.kl == pytest.approx(sum(kl) / 2)
    assert loss_kl.item() == pytest.approx(-0.85 + 0.1 * sum(kl) / 2)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(logp, old, torch.tensor([1.0]), completion, beta=0.1)
