"""Objectives on hand-worked examples, and the loss normalisation across batch splits."""

import pytest
import torch

from rnd1.diffusion.corruption import corrupt, mask_tokens, sample_t
from rnd1.diffusion.loss import objective_loss
from rnd1.diffusion.objectives import build_targets

M = 99  # mask id


def test_a2d_worked_example():
    x0 = torch.tensor([[10, 11, 12, 13]])
    x_t = torch.tensor([[10, M, 12, M]])
    masked = x_t == M
    tg = build_targets("a2d", x0, x_t, masked, torch.tensor([0.5]))
    assert tg.select.tolist() == [[True, False, True, False]]  # output i predicts masked x0[i+1]
    assert tg.targets[tg.select].tolist() == [11, 13]
    assert tg.weights.tolist() == [[2.0, 0.0, 2.0, 0.0]]  # 1/t
    assert int(tg.num_targets) == 2


def test_mdlm_and_ar_worked_examples():
    x0 = torch.tensor([[10, 11, 12, 13]])
    x_t = torch.tensor([[M, 11, M, 13]])
    tg = build_targets("mdlm", x0, x_t, x_t == M, torch.tensor([0.25]))
    assert tg.select.tolist() == [[True, False, True, False]]
    assert tg.targets[tg.select].tolist() == [10, 12] and tg.weights[tg.select].tolist() == [4.0, 4.0]
    tg = build_targets("ar", x0, x0, torch.zeros_like(x0, dtype=torch.bool), torch.ones(1))
    assert tg.select.tolist() == [[True, True, True, False]]
    assert tg.targets[tg.select].tolist() == [11, 12, 13] and tg.weights[tg.select].tolist() == [1.0] * 3


def test_corruption_statistics_and_a2d_never_masks_position_0():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (4000, 32))
    c = corrupt(x0, "a2d", M, generator=g)
    assert not c.masked[:, 0].any()
    assert torch.equal(c.x_t[c.masked], torch.full_like(c.x_t[c.masked], M))
    assert torch.equal(c.x_t[~c.masked], x0[~c.masked])
    # masked fraction of a row follows its t: E[mask | t] = t
    frac = c.masked[:, 1:].float().mean(1)
    assert (frac - c.t).abs().mean() < 0.08
    assert c.t.min() >= 1e-3 and c.t.max() <= 1.0 and abs(c.t.mean().item() - 0.5) < 0.03


def test_low_discrepancy_t_is_stratified():
    t = sample_t(8, eps=0.0 + 1e-3, generator=torch.Generator().manual_seed(3), low_discrepancy=True)
    bins = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long().clamp(max=7)
    assert sorted(bins.tolist()) == list(range(8))  # one t in each eighth of the range


def test_corruption_is_deterministic_for_a_generator():
    x0 = torch.randint(0, 50, (3, 16))
    a = corrupt(x0, "mdlm", M, generator=torch.Generator().manual_seed(5))
    b = corrupt(x0, "mdlm", M, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t)
    x_t, masked = mask_tokens(x0, torch.ones(3), M, never_mask=torch.ones_like(x0, dtype=torch.bool))
    assert not masked.any()


def _full_loss_and_grads(hidden, W, targets, n_global):
    h = hidden.clone().requires_grad_(True)
    w = W.clone().requires_grad_(True)
    loss = objective_loss(h, w, targets, n_global).loss
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_normalisation_is_invariant_to_accumulation_and_dp_splits(splits):
    """Sum over micro-batches (or ranks, summed) of loss_i / N_global == full-batch loss; same grads."""
    torch.manual_seed(0)
    B, L, H, V = 8, 12, 16, 40
    hidden = torch.randn(B, L, H, dtype=torch.float64)
    W = torch.randn(V, H, dtype=torch.float64)
    x0 = torch.randint(0, V - 1, (B, L))
    c = corrupt(x0, "a2d", V - 1, generator=torch.Generator().manual_seed(1))
    tg = build_targets("a2d", x0, c.x_t, c.masked, c.t)
    n_global = tg.num_targets
    full, gh_full, gw_full = _full_loss_and_grads(hidden, W, tg, n_global)

    w = W.clone().requires_grad_(True)
    gh = torch.zeros_like(hidden)
    total = 0.0
    step = B // splits
    for s in range(0, B, step):
        part = build_targets("a2d", x0[s:s + step], c.x_t[s:s + step], c.masked[s:s + step], c.t[s:s + step])
        h = hidden[s:s + step].clone().requires_grad_(True)
        loss = objective_loss(h, w, part, n_global).loss
        loss.backward()
        gh[s:s + step] = h.grad
        total += loss.item()
    assert total == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(gh, gh_full, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(w.grad, gw_full, rtol=1e-5, atol=1e-9)  # gradient SUM over splits


def test_loss_only_sends_selected_rows_to_the_head(monkeypatch):
    import rnd1.diffusion.loss as loss_mod

    seen = {}

    def spy(h, W, t, w, **kw):
        seen["rows"] = h.shape[0]
        return (h.sum() * 0).float()

    monkeypatch.setattr(loss_mod, "masked_cross_entropy", spy)
    x0 = torch.tensor([[1, 2, 3, 4, 5, 6]])
    x_t = torch.tensor([[1, M, 3, M, M, 6]])
    tg = build_targets("a2d", x0, x_t, x_t == M, torch.tensor([0.5]))
    objective_loss(torch.randn(1, 6, 8), torch.randn(100, 8), tg, 3)
    assert seen["rows"] == 3
