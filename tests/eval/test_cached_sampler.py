"""The approximate prefix / dual KV caches of the A2D / MDLM sampler (Fast-dLLM's), and the
parallel decoding rules:

- a window forward against a just-refreshed cache computes what the full forward computes at
  those outputs (the splice of cached and fresh keys, their positions and the padding mask are
  right), for ragged batches too;
- refreshing at every step gives exactly the uncached tokens;
- cached windows forward fewer queries; stale caches are an approximation, so no exactness is
  claimed for them beyond finishing without a mask token left;
- the factor rule commits the prefix of confidences with (n + 1)(1 - c_n) < f, at least one;
- DPad's suffix window forwards W masked columns past the block, no more; a window past the
  sequence's end changes nothing, and under it too, refreshing every step is exact."""

import pytest
import torch
from torch import nn

from rnd1.diffusion.objective import get_objective
from rnd1.generate import _choose, _layout, diffusion_generate
from rnd1.model.attention_masks import Explicit
from rnd1.model.config import get_preset
from rnd1.model.kv_cache import SequenceKVCache
from rnd1.model.qwen3 import build_model

MASK, EOS = 511, 256


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("debug"), seed=0, attention_mode="bidirectional").eval()


class Recorder(nn.Module):
    """Delegates to the real model, recording each forward's number of query tokens."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.queries: list[int] = []

    def forward(self, ids, **kw):
        self.queries.append(ids.shape[1])
        return self.inner(ids, **kw)


@pytest.mark.parametrize("window_end", ["prefix", "dual"])
def test_a_window_against_a_fresh_cache_computes_the_full_forward(model, window_end):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # ragged: row 1 is left-padded
    x, doc_ids, positions, starts = _layout(prompts, None, 12, MASK, EOS)
    x[:, -12:-6] = torch.randint(0, 256, (2, 6))  # some committed tokens, the rest still masked
    with torch.no_grad():
        full = model(x, doc_ids=doc_ids, positions=positions)
        kv = SequenceKVCache()
        with kv.refreshing():
            again = model(x, doc_ids=doc_ids, positions=positions, kv_cache=kv)
        assert torch.equal(full, again)  # a refresh is the uncached forward
        a = starts[0] + 2
        b = x.shape[1] if window_end == "prefix" else a + 5
        keys = Explicit(doc_ids.bool()[:, None, None, :].expand(2, 1, b - a, x.shape[1]))
        with kv.window(a):
            win = model(x[:, a:b], positions=positions[:, a:b], attn_mask=keys, kv_cache=kv)
    torch.testing.assert_close(win, full[:, a:b], rtol=1e-5, atol=1e-5)


def test_a_window_that_reads_stale_keys_differs(model):
    """The test above can fail: a cache refreshed on other tokens gives other logits."""
    x, doc_ids, positions, _ = _layout([[5, 6, 7, 8]], None, 8, MASK, EOS)
    kv = SequenceKVCache()
    with torch.no_grad():
        with kv.refreshing():
            model(x, positions=positions, kv_cache=kv)
        x[:, 4:6] = torch.tensor([40, 41])
        full = model(x, positions=positions)
        with kv.window(8):
            win = model(x[:, 8:], positions=positions[:, 8:], kv_cache=kv)
    assert not torch.allclose(win, full[:, 8:], atol=1e-4)


KW = dict(gen_length=12, steps=12, block_length=4, mask_id=MASK, eos_id=EOS)


@pytest.mark.parametrize("objective", ["a2d", "mdlm"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.02}, {"factor": 1.5}])
def test_refreshing_every_step_gives_the_uncached_tokens(model, objective, cache, rule):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    ref = diffusion_generate(model, prompts, objective=objective, kv_cache="none", **rule, **KW)
    got = diffusion_generate(model, prompts, objective=objective, kv_cache=cache, cache_refresh=1, **rule, **KW)
    assert got.tokens == ref.tokens and got.commit_order == ref.commit_order
    assert torch.equal(got.sequences, ref.sequences)


@pytest.mark.parametrize("cache,window", [("prefix", lambda L, blk_end: L - (blk_end - 4) + 1),
                                          ("dual", lambda L, blk_end: 4 + 1)])
def test_cached_steps_forward_a_window(model, cache, window):
    """A2D: the window starts one column before the block (its first position is read from the
    output before it); prefix runs to the end, dual to the block's end. Block starts are full."""
    rec = Recorder(model)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    out = diffusion_generate(rec, [prompt], objective="a2d", kv_cache=cache, **KW)
    L = len(prompt) + 12
    assert MASK not in out.tokens[0] and out.nfe == len(rec.queries) == 12
    for blk in range(3):
        steps = rec.queries[blk * 4:(blk + 1) * 4]
        assert steps[0] == L  # the refresh
        assert steps[1:] == [window(L, len(prompt) + 4 * (blk + 1))] * 3


def test_refresh_interval(model):
    rec = Recorder(model)
    diffusion_generate(rec, [[5, 6, 7]], objective="mdlm", kv_cache="dual", cache_refresh=2, **KW)
    assert rec.queries == [15, 4, 15, 4] * 3


def test_the_suffix_window_forwards_only_w_masked_positions_past_the_block(model):
    """DPad's sliding window: uncached, block k's forwards see the prompt, blocks 0..k and W more
    columns (never past the sequence); with the dual cache the block starts (refreshes) do."""
    prompt = [5, 6, 7, 8, 9, 10, 11]
    for cache, per_step in (("none", None), ("dual", 4 + 1)):
        rec = Recorder(model)
        out = diffusion_generate(rec, [prompt], objective="a2d", kv_cache=cache, suffix_window=3, **KW)
        assert MASK not in out.tokens[0] and len(rec.queries) == 12
        for blk in range(3):
            steps = rec.queries[blk * 4:(blk + 1) * 4]
            assert steps[0] == min(len(prompt) + 12, len(prompt) + 4 * (blk + 1) + 3)
            assert steps[1:] == [per_step or steps[0]] * 3


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_a_suffix_window_past_the_end_changes_nothing_and_a_short_one_changes_the_tokens(model, cache):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    ref = diffusion_generate(model, prompts, objective="a2d", kv_cache=cache, **KW)
    wide = diffusion_generate(model, prompts, objective="a2d", kv_cache=cache, suffix_window=8, **KW)
    assert wide.tokens == ref.tokens and torch.equal(wide.sequences, ref.sequences)
    short = diffusion_generate(model, prompts, objective="a2d", kv_cache=cache, suffix_window=1, **KW)
    assert short.commit_order != ref.commit_order or short.tokens != ref.tokens  # the window is an approximation


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_with_a_suffix_window_refreshing_every_step_gives_the_uncached_tokens(model, cache):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    ref = diffusion_generate(model, prompts, objective="a2d", kv_cache="none", suffix_window=2, threshold=0.02, **KW)
    got = diffusion_generate(model, prompts, objective="a2d", kv_cache=cache, cache_refresh=1, suffix_window=2,
                             threshold=0.02, **KW)
    assert got.tokens == ref.tokens and got.commit_order == ref.commit_order


def test_the_suffix_window_refusals(model):
    with pytest.raises(ValueError, match="suffix_window must be >= 0"):
        diffusion_generate(model, [[5, 6]], suffix_window=-1, **KW)
    with pytest.raises(ValueError, match="suffixes"):
        diffusion_generate(model, [[5, 6]], suffixes=[[1]], suffix_window=4, **KW)
    with pytest.raises(ValueError, match="no suffix to window"):
        diffusion_generate(model, [[5, 6]], objective=get_objective("block_a2d", block_size=4), suffix_window=4,
                           **KW)


def test_cache_refuses_ragged_generated_regions(model):
    with pytest.raises(ValueError, match="same columns"):
        diffusion_generate(model, [[5, 6], [7, 8]], suffixes=[[1], []], kv_cache="prefix", **KW)


def test_unknown_cache_mode_and_both_rules_are_refused(model):
    with pytest.raises(ValueError, match="kv_cache 'full' unknown"):
        diffusion_generate(model, [[5, 6]], kv_cache="full", **KW)
    with pytest.raises(ValueError, match="threshold or factor"):
        diffusion_generate(model, [[5, 6]], threshold=0.9, factor=1.0, **KW)
    with pytest.raises(ValueError, match="no suffix to cache"):
        diffusion_generate(model, [[5, 6]], objective=get_objective("block_a2d", block_size=4), kv_cache="dual",
                           **KW)


def _pick(conf_rows, still_rows, factor):
    """_choose on logits whose softmax puts ``conf`` on token 0 at each position (greedy)."""
    conf = torch.tensor(conf_rows)
    V = 8
    rest = (1 - conf) / (V - 1)
    probs = torch.cat([conf[..., None], rest[..., None].expand(*conf.shape, V - 1)], -1)
    _, pick = _choose(probs.log(), torch.tensor(still_rows), 0, 8, conf.shape[1], mask_id=None, vocab_limit=None,
                      strategy="confidence", threshold=None, temperature=0.0, top_k=0, top_p=1.0, generator=None,
                      factor=factor)
    return pick.tolist()


def test_factor_rule():
    # sorted: 0.99 (2*0.01=0.02), 0.95 (3*0.05=0.15), 0.8 (4*0.2=0.8), 0.5 (5*0.5=2.5)
    conf = [[0.8, 0.99, 0.5, 0.95]]
    assert _pick(conf, [[True] * 4], 1.0) == [[True, True, False, True]]
    assert _pick(conf, [[True] * 4], 0.1) == [[False, True, False, False]]
    assert _pick(conf, [[True] * 4], 3.0) == [[True] * 4]
    # nothing passes: still one (the most confident); committed positions are never picked again
    assert _pick([[0.3, 0.4, 0.35, 0.2]], [[True] * 4], 0.5) == [[False, True, False, False]]
    assert _pick(conf, [[True, False, True, True]], 1.0) == [[True, False, False, True]]


def test_parallel_rules_take_fewer_forwards_on_a_confident_model():
    """A model sure of every position: the factor rule and the threshold commit a block in one
    forward; the fixed schedule takes one forward per token."""

    class Sure(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, ids, **kw):
            out = torch.full((*ids.shape, 512), -10.0)
            out[..., 42] = 10.0
            return out

    kw = dict(KW, eos_id=None, objective="mdlm")
    assert diffusion_generate(Sure(), [[1, 2]], **kw).nfe == 12
    assert diffusion_generate(Sure(), [[1, 2]], factor=1.0, **kw).nfe == 3
    out = diffusion_generate(Sure(), [[1, 2]], threshold=0.9, kv_cache="dual", **kw)
    assert out.nfe == 3 and out.tokens == [[42] * 12] and out.tokens_per_forward == 4.0
