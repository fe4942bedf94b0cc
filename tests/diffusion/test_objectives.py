"""Objectives through the one interface (rnd1/diffusion/objective.py), on hand-worked examples;
corruption keyed by sample index; the normaliser's invariance across batch splits."""

import math

import pytest
import torch

from rnd1.diffusion.corruption import Corruption, corrupt_rows, mask_tokens, sample_t
from rnd1.diffusion.loss import weighted_ce_sum
from rnd1.diffusion.objective import OBJECTIVES, Objective, get_objective

M = 99  # mask id


def _c(x_t, t):
    return Corruption(x_t, x_t == M, torch.tensor(t))


def test_registry_and_interface():
    assert set(OBJECTIVES) == {"ar", "mdlm", "a2d", "block_a2d", "block_mdlm"}
    for name in OBJECTIVES:
        obj = get_objective(name, **({"block_size": 4} if name.startswith("block_") else {}))
        assert isinstance(obj, Objective) and obj.name == name and get_objective(obj) is obj
    assert (get_objective("ar").masks, get_objective("ar").attention) == (False, "causal")
    assert (get_objective("a2d").shift, get_objective("mdlm").shift) == (1, 0)
    with pytest.raises(ValueError, match="objective 'bd3' unknown"):
        get_objective("bd3")


def test_a2d_worked_example():
    a2d = get_objective("a2d")
    x0 = torch.tensor([[10, 11, 12, 13]])
    tg = a2d.targets(x0, _c(torch.tensor([[10, M, 12, M]]), [0.5]))
    assert tg.select.tolist() == [[True, False, True, False]]  # output i predicts masked x0[i+1]
    assert tg.targets[tg.select].tolist() == [11, 13]
    assert tg.weights.tolist() == [[2.0, 0.0, 2.0, 0.0]]  # 1/t
    assert a2d.scored(4).tolist() == [False, True, True, True]  # positions 1..L-1
    assert float(a2d.normaliser_count(x0, tg)) == 3.0  # per-token: divide by the scored positions
    assert float(get_objective("a2d", normaliser="supervised").normaliser_count(x0, tg)) == 2.0


def test_mdlm_and_ar_worked_examples():
    x0 = torch.tensor([[10, 11, 12, 13]])
    mdlm = get_objective("mdlm")
    tg = mdlm.targets(x0, _c(torch.tensor([[M, 11, M, 13]]), [0.25]))
    assert tg.select.tolist() == [[True, False, True, False]]
    assert tg.targets[tg.select].tolist() == [10, 12] and tg.weights[tg.select].tolist() == [4.0, 4.0]
    assert float(mdlm.normaliser_count(x0, tg)) == 4.0
    ar = get_objective("ar")
    c = ar.corrupt(x0, M, seed=0, sample_ids=torch.tensor([0]), samples_per_step=1)
    assert torch.equal(c.x_t, x0) and not c.masked.any()
    tg = ar.targets(x0, c)
    assert tg.select.tolist() == [[True, True, True, False]]
    assert tg.targets[tg.select].tolist() == [11, 12, 13] and tg.weights[tg.select].tolist() == [1.0] * 3
    assert float(ar.normaliser_count(x0, tg)) == 3.0  # the same positions a2d scores


def test_predictions_apply_the_shift_in_one_place():
    out = torch.arange(4.0).view(1, 4, 1)  # output i holds value i
    a2d, mdlm = get_objective("a2d"), get_objective("mdlm")
    pred = a2d.predictions(out)[0, :, 0]
    assert math.isnan(pred[0]) and pred[1:].tolist() == [0.0, 1.0, 2.0]  # position j read from output j-1
    assert torch.equal(mdlm.predictions(out), out)
    assert a2d.output_index(torch.tensor([3])).item() == 2 and mdlm.output_index(torch.tensor([3])).item() == 3


def test_corruption_statistics_and_a2d_never_masks_position_0():
    x0 = torch.randint(0, 50, (4000, 32))
    c = get_objective("a2d").corrupt(x0, M, seed=0, sample_ids=torch.arange(4000), samples_per_step=4000)
    assert not c.masked[:, 0].any()
    assert torch.equal(c.x_t[c.masked], torch.full_like(c.x_t[c.masked], M))
    assert torch.equal(c.x_t[~c.masked], x0[~c.masked])
    frac = c.masked[:, 1:].float().mean(1)  # E[mask | t] = t
    assert (frac - c.t).abs().mean() < 0.08
    assert c.t.min() >= 1e-3 and c.t.max() <= 1.0 and abs(c.t.mean().item() - 0.5) < 0.03


def test_noise_is_keyed_by_sample_index_not_by_position_in_the_batch():
    x0 = torch.randint(0, 50, (6, 16))
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    whole = corrupt_rows(x0, M, seed=3, sample_ids=ids, samples_per_step=6, low_discrepancy=True)
    part = corrupt_rows(x0[3:], M, seed=3, sample_ids=ids[3:], samples_per_step=6, low_discrepancy=True)
    assert torch.equal(whole.x_t[3:], part.x_t) and torch.equal(whole.t[3:], part.t)
    fixed = corrupt_rows(x0, M, seed=3, sample_ids=ids, samples_per_step=6, fixed_t=0.3)
    assert torch.equal(fixed.t, torch.full((6,), 0.3))


def test_low_discrepancy_t_is_stratified():
    t = sample_t(8, eps=1e-3, generator=torch.Generator().manual_seed(3), low_discrepancy=True)
    bins = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long().clamp(max=7)
    assert sorted(bins.tolist()) == list(range(8))  # one t in each eighth of the range
    x_t, masked = mask_tokens(torch.zeros(3, 4, dtype=torch.long), torch.ones(3), M,
                              never_mask=torch.ones(3, 4, dtype=torch.bool))
    assert not masked.any()


def test_the_weighted_loss_is_a_per_token_bound_for_a_uniform_model():
    """With weights 1/t the expected weighted count of masked positions is the number of scored
    positions: a model that is uniform over V reads log V (MDLM's per-token NELBO)."""
    V, B, L = 64, 4096, 64  # 258k scored positions: the estimate's spread is ~0.5%
    x0 = torch.randint(0, V - 1, (B, L))
    for name in ("a2d", "mdlm"):
        obj = get_objective(name, low_discrepancy=True)
        c = obj.corrupt(x0, V - 1, seed=1, sample_ids=torch.arange(B), samples_per_step=B)
        tg = obj.targets(x0, c)
        ce = weighted_ce_sum(torch.randn(B, L, 8), torch.zeros(V, 8), tg)  # zero head: uniform
        per_token = ce / obj.normaliser_count(x0, tg)
        assert per_token.item() == pytest.approx(math.log(V), rel=0.01), name


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_normalisation_is_invariant_to_accumulation_and_dp_splits(splits):
    """Sum over micro-batches (or ranks, summed) of part / N_global == full-batch loss; same grads."""
    torch.manual_seed(0)
    B, L, H, V = 8, 12, 16, 40
    hidden = torch.randn(B, L, H, dtype=torch.float64)
    W = torch.randn(V, H, dtype=torch.float64)
    x0 = torch.randint(0, V - 1, (B, L))
    a2d = get_objective("a2d")
    c = a2d.corrupt(x0, V - 1, seed=1, sample_ids=torch.arange(B), samples_per_step=B)
    tg = a2d.targets(x0, c)
    n_global = a2d.normaliser_count(x0, tg)
    h, w = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
    full = weighted_ce_sum(h, w, tg) / n_global
    full.backward()
    gh_full, gw_full = h.grad, w.grad

    w = W.clone().requires_grad_(True)
    gh = torch.zeros_like(hidden)
    total, step = 0.0, B // splits
    for s in range(0, B, step):
        part_c = Corruption(c.x_t[s:s + step], c.masked[s:s + step], c.t[s:s + step])
        part = a2d.targets(x0[s:s + step], part_c)
        h = hidden[s:s + step].clone().requires_grad_(True)
        loss = weighted_ce_sum(h, w, part) / n_global
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
    tg = get_objective("a2d").targets(x0, _c(torch.tensor([[1, M, 3, M, M, 6]]), [0.5]))
    weighted_ce_sum(torch.randn(1, 6, 8), torch.randn(100, 8), tg)
    assert seen["rows"] == 3
