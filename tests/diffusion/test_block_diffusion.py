"""Block diffusion (rnd1/diffusion/block.py): per-block noise, the [x_t | x0] stream's attention,
the worked example, and the two limits: one block is the full-sequence objective (same loss on
the same noise), blocks of one position are AR."""

import math

import pytest
import torch

from rnd1.diffusion.block import block_causal_mask, two_stream_mask
from rnd1.diffusion.corruption import Corruption
from rnd1.diffusion.loss import weighted_ce_sum
from rnd1.diffusion.objective import get_objective
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model
from rnd1.training.step import MicroBatch, run_step

M = 257  # the byte tokenizer's mask id (the debug preset's)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(get_preset("debug"), seed=3, attention_mode="bidirectional").eval()


def _x0(B, L, seed=0):
    return torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def test_two_stream_mask_table():
    m = two_stream_mask(4, 2)[0, 0]
    noisy_noisy, noisy_clean = m[:4, :4], m[:4, 4:]
    clean_noisy, clean_clean = m[4:, :4], m[4:, 4:]
    blk = torch.tensor([0, 0, 1, 1])
    assert torch.equal(noisy_noisy, blk[:, None] == blk[None, :])  # own block, both ways
    assert torch.equal(noisy_clean, blk[None, :] < blk[:, None])  # strictly earlier clean blocks
    assert not clean_noisy.any()  # the clean stream never sees noise
    assert torch.equal(clean_clean, blk[None, :] <= blk[:, None])  # block-causal
    assert m.dtype == torch.bool  # never a dense float mask
    docs = torch.tensor([[0, 0, 1, 1]])
    md = two_stream_mask(4, 4, docs)[0, 0]
    assert not md[0, 2] and not md[0, 6] and md[2, 3]  # documents stay apart in both streams


def test_inference_mask_is_block_causal():
    pos = torch.arange(6)[None]
    m = block_causal_mask(pos, pos, 2)[0, 0]
    assert m[0, 1] and m[1, 0] and m[2, 1] and not m[1, 2] and not m[3, 4]


def test_per_block_noise_and_one_block_equals_no_blocks():
    x0 = _x0(3, 12)
    ids = torch.tensor([5, 6, 7])
    blk = get_objective("block_mdlm", block_size=4)
    c = blk.corrupt(x0, M, seed=1, sample_ids=ids, samples_per_step=3)
    assert c.t.shape == (3, 3) and len(set(c.t.flatten().tolist())) == 9  # one t per block
    w = blk.position_weights(c)
    assert torch.allclose(w[:, 4:8], (1 / c.t[:, 1:2]).expand(3, 4))  # 1/t of the position's block
    whole = get_objective("block_mdlm", block_size=12).corrupt(x0, M, seed=1, sample_ids=ids, samples_per_step=3)
    plain = get_objective("mdlm").corrupt(x0, M, seed=1, sample_ids=ids, samples_per_step=3)
    assert torch.equal(whole.masked, plain.masked) and torch.equal(whole.t[:, 0], plain.t)


def test_a2d_worked_example_from_the_docstring():
    obj = get_objective("block_a2d", block_size=2)
    x0 = torch.tensor([[10, 11, 12, 13]])
    masked = torch.tensor([[False, True, True, False]])
    c = Corruption(torch.where(masked, M, x0), masked, torch.tensor([[0.5, 0.25]]), block_size=2)
    tg = obj.targets(x0, c)
    assert tg.select.tolist() == [[True, False, False, False, False, True, False, False]]
    assert tg.targets[tg.select].tolist() == [11, 12]  # noisy output 0 -> B; clean output 1 -> C
    assert tg.weights[tg.select].tolist() == [2.0, 4.0]  # 1/t of each target's block
    assert float(obj.normaliser_count(x0, tg)) == 3.0


def test_block_size_one_a2d_reads_only_clean_outputs():
    obj = get_objective("block_a2d", block_size=1)
    x0 = _x0(2, 8)
    c = obj.corrupt(x0, M, seed=0, sample_ids=torch.tensor([0, 1]), samples_per_step=2, fixed_t=1.0)
    tg = obj.targets(x0, c)
    assert not tg.select[:, :8].any()  # no noisy output predicts anything: AR from the clean prefix
    assert tg.select[:, 8:15].all() and torch.equal(tg.targets[:, 8:15], x0[:, 1:])


def _block_forward(model, obj, x0, c):
    inputs = obj.model_inputs(c, x0)
    return model(**inputs, return_hidden=True)


@pytest.mark.parametrize("name", ["block_a2d", "block_mdlm"])
def test_noisy_block_sees_its_block_and_earlier_clean_blocks_only(model, name):
    B, L, bs = 1, 12, 4
    obj = get_objective(name, block_size=bs)
    x0 = _x0(B, L, 1)
    c = obj.corrupt(x0, M, seed=2, sample_ids=torch.tensor([0]), samples_per_step=1, fixed_t=0.5)
    with torch.no_grad():
        base = _block_forward(model, obj, x0, c)
        later = x0.clone()
        later[:, 8:] = (later[:, 8:] + 1) % 256  # block 2, clean and noisy
        c_later = Corruption(torch.where(c.masked, M, later), c.masked, c.t, c.maskable, bs)
        out_later = _block_forward(model, obj, later, c_later)
        earlier = x0.clone()
        earlier[:, 0] = (earlier[:, 0] + 1) % 256  # clean block 0 (never masked in a2d)
        c_earlier = Corruption(torch.where(c.masked, M, earlier), c.masked, c.t, c.maskable, bs)
        out_earlier = _block_forward(model, obj, earlier, c_earlier)
    # noisy block 1 (outputs 4..7) and clean blocks 0..1 (outputs L..L+7) ignore block 2
    assert torch.allclose(base[:, 4:8], out_later[:, 4:8], atol=1e-6)
    assert torch.allclose(base[:, L:L + 8], out_later[:, L:L + 8], atol=1e-6)
    # ... and do see an earlier clean token
    assert (base[:, 4:8] - out_earlier[:, 4:8]).abs().max() > 1e-4


@pytest.mark.parametrize("name,plain", [("block_a2d", "a2d"), ("block_mdlm", "mdlm")])
def test_one_block_is_the_full_sequence_objective(model, name, plain):
    """B = L gives the plain objective's loss on the same noise, also through the two-stream
    forward (the clean half then has nothing to add)."""
    L = 16
    x0 = _x0(3, L, 4)
    ids = torch.tensor([0, 1, 2])
    blk, ref = get_objective(name, block_size=L), get_objective(plain)
    with torch.no_grad():
        mb = [MicroBatch(x0, ids, seed=9)]
        a = run_step(model, blk, mb, mask_id=M, samples_per_step=3, backward=False).loss
        b = run_step(model, ref, mb, mask_id=M, samples_per_step=3, backward=False).loss
        assert math.isclose(float(a), float(b), rel_tol=1e-6)
        # the same loss through [x_t | x0] with the 2L mask
        blk.two_streams = lambda length: True
        c = blk.corrupt(x0, M, seed=9, sample_ids=ids, samples_per_step=3)
        tg = blk.targets(x0, c)
        assert tg.select.shape == (3, 2 * L)
        hidden = blk.forward(model, c, x0, return_hidden=True)
        two = weighted_ce_sum(hidden, model.lm_head.weight, tg) / blk.normaliser_count(x0, tg)
    assert math.isclose(float(two), float(b), rel_tol=1e-5)


def test_block_objective_trains_through_run_step(model):
    obj = get_objective("block_a2d", block_size=4)
    m = build_model(get_preset("debug"), seed=5, attention_mode="bidirectional")
    x0 = _x0(2, 16, 7)
    out = run_step(m, obj, [MicroBatch(x0, torch.tensor([0, 1]))], mask_id=M, samples_per_step=2)
    assert math.isfinite(float(out.loss))
    assert m.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_elbo_and_heldout_tools_read_block_models(model, tmp_path):
    from rnd1.eval.likelihood import elbo_loglikelihood

    obj = get_objective("block_a2d", block_size=4)
    ctx, cont = list(range(40, 50)), list(range(60, 70))
    lp = elbo_loglikelihood(model, ctx, cont, mask_id=M, objective=obj, num_samples=8,
                            generator=torch.Generator().manual_seed(0))
    assert math.isfinite(lp) and lp < 0
    # per continuation token the bound is about log V for an untrained model (not 2x: one stream scored)
    assert 0.5 * math.log(256) < -lp / len(cont) < 2.0 * math.log(258)


def test_two_stream_fits_any_length_the_positions_fit():
    """The [x_t | x0] stream is 2L long but its positions stop at L - 1: an L up to
    max_position_embeddings must run, not just L / 2."""
    cfg = get_preset("debug").replace(max_position_embeddings=32)
    m = build_model(cfg, seed=0, attention_mode="bidirectional")
    obj = get_objective("block_a2d", block_size=8)
    x0 = _x0(1, 32)
    c = obj.corrupt(x0, M, seed=0, sample_ids=torch.tensor([0]), samples_per_step=1)
    assert obj.forward(m, c, x0, return_hidden=True).shape[1] == 64
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        m(_x0(1, 33))


def test_low_discrepancy_spreads_the_blocks_of_a_row():
    obj = get_objective("block_mdlm", block_size=4, low_discrepancy=True)
    c = obj.corrupt(_x0(8, 16), M, seed=0, sample_ids=torch.arange(8), samples_per_step=8)
    t = c.t  # [8 rows, 4 blocks]: 32 strata of width 1/32, one per (row, block)
    assert (t.max(1).values - t.min(1).values).min() > 0.5  # a row's blocks do not share a narrow range
    strata = torch.floor((t.flatten() - 1e-3) / (1 - 1e-3) * 32).long().sort().values
    assert len(set(strata.tolist())) >= 31  # (u + k) mod 1: every stratum once, up to the wrap
