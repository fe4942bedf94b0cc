"""Diffusion SFT through the objective interface: a data ``loss_mask`` (response tokens) decides
what may be masked, supervised and counted, for every objective; complementary masking
partitions the response; the loss is the per-token NELBO of the responses."""

import math

import pytest
import torch

from rnd1.diffusion.corruption import pair_rows
from rnd1.diffusion.objective import get_objective
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model
from rnd1.training.step import MicroBatch, run_step

M = 257
NAMES = ["a2d", "mdlm", "ar", "block_a2d", "block_mdlm"]


def _obj(name, **kw):
    return get_objective(name, **({"block_size": 3} if name.startswith("block_") else {}), **kw)


def _supervised_positions(obj, tg, L):
    """Positions whose token some selected output predicts (read back through the output grid)."""
    pos = torch.zeros(tg.select.shape[0], L, dtype=torch.bool)
    rows, outs = torch.nonzero(tg.select, as_tuple=True)
    if tg.select.shape[1] == 2 * L:  # block diffusion's [noisy | clean] outputs
        outs = outs % L
    pos[rows, outs + obj.shift] = True
    return pos


def test_hand_worked_example():
    """prompt P P P | response R R R | EOS pad: a2d at t = 1 masks exactly the response."""
    x0 = torch.tensor([[1, 2, 3, 10, 11, 12, 256]])
    loss = torch.tensor([[False, False, False, True, True, True, False]])
    a2d = get_objective("a2d")
    c = a2d.corrupt(x0, M, seed=0, sample_ids=torch.tensor([0]), samples_per_step=1, fixed_t=1.0, loss_mask=loss)
    assert c.x_t.tolist() == [[1, 2, 3, M, M, M, 256]]  # the prompt and the padding stay clean
    tg = a2d.targets(x0, c)
    assert tg.select.tolist() == [[False, False, True, True, True, False, False]]  # outputs 2..4 -> 10, 11, 12
    assert tg.targets[tg.select].tolist() == [10, 11, 12]
    assert float(a2d.normaliser_count(x0, tg, loss)) == 3.0  # per response token


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tokens_are_never_masked_nor_supervised(name):
    """Property over random conversations: random prompt/response segments, noise levels, seeds."""
    gen = torch.Generator().manual_seed(0)
    obj = _obj(name)
    for trial in range(40):
        B, L = 3, int(torch.randint(4, 24, (), generator=gen))
        x0 = torch.randint(0, 256, (B, L), generator=gen)
        # each row alternates prompt / response segments of random lengths
        loss = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            i, resp = 0, bool(torch.rand((), generator=gen) < 0.5)
            while i < L:
                n = int(torch.randint(1, 6, (), generator=gen))
                loss[b, i:i + n] = resp
                i, resp = i + n, not resp
        fixed = [None, 1.0, 0.5][trial % 3]
        c = obj.corrupt(x0, M, seed=trial, sample_ids=torch.arange(B) + 7 * trial, samples_per_step=B,
                        fixed_t=fixed, loss_mask=loss)
        assert not (c.masked & ~loss).any()
        assert torch.equal(c.x_t[~loss], x0[~loss])
        tg = obj.targets(x0, c)
        sup = _supervised_positions(obj, tg, L)
        assert not (sup & ~loss).any(), f"{name}: a prompt position is supervised"
        if obj.masks:
            assert torch.equal(sup, c.masked)  # every masked response token is supervised
        assert float(obj.normaliser_count(x0, tg, loss)) == float((loss & obj.scored(L)).sum())


@pytest.mark.parametrize("name", ["a2d", "mdlm", "block_a2d"])
def test_complementary_masks_partition_the_response(name):
    obj = _obj(name, complementary=True)
    x0 = torch.randint(0, 256, (4, 20), generator=torch.Generator().manual_seed(1))
    loss = torch.rand(4, 20, generator=torch.Generator().manual_seed(2)) < 0.6
    x2, ids, loss2 = pair_rows(x0, torch.arange(4), loss)
    c = obj.corrupt(x2, M, seed=3, sample_ids=ids, samples_per_step=4, loss_mask=loss2, complementary=True)
    first, second = c.masked[0::2], c.masked[1::2]
    maskable = obj.maskable(x0, loss)
    assert not (first & second).any()  # disjoint
    assert torch.equal(first | second, maskable)  # together: the whole maskable response
    t1, t2 = c.t[0::2], c.t[1::2]
    assert torch.allclose(t1 + t2, torch.ones_like(t1))  # the second row's t is 1 - t
    big = obj.corrupt(*pair_rows(torch.zeros(2000, 4, dtype=torch.long)), M, seed=0,
                      sample_ids=torch.arange(2000).repeat_interleave(2), samples_per_step=2000, complementary=True)
    assert float(big.t.min()) >= obj.eps  # both rows keep the eps floor: no weight above 1/eps
    with pytest.raises(ValueError, match="pairs"):
        obj.corrupt(x0, M, seed=3, sample_ids=torch.arange(4), samples_per_step=4, complementary=True)


def test_uniform_model_reads_log_v_per_response_token():
    """A zero LM head predicts uniformly over V: the per-response-token NELBO is log V whichever
    way the loss is estimated (complementary pairs or not), with prompts excluded from the count."""
    m = build_model(get_preset("debug"), seed=0, attention_mode="bidirectional")
    with torch.no_grad():
        m.lm_head.weight.zero_()
    V = m.config.vocab_size
    B, L = 1024, 32  # the 1/t estimator is heavy-tailed: many rows, eps 0.05 (relative sd ~1%)
    x0 = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(4))
    loss = torch.zeros(B, L, dtype=torch.bool)
    loss[:, 12:] = True  # a 12-token prompt, a 20-token response
    for comp in (False, True):
        obj = get_objective("a2d", complementary=comp, low_discrepancy=True, eps=0.05)
        with torch.no_grad():
            out = run_step(m, obj, [MicroBatch(x0, torch.arange(B), seed=5, loss_mask=loss)], mask_id=M,
                           samples_per_step=B, backward=False)
        assert float(out.normaliser) == (2 if comp else 1) * B * 20
        assert abs(float(out.loss) / math.log(V) - 1) < 0.03, (comp, float(out.loss), math.log(V))
