"""The block-diffusion sampler: block-causal decoding with and without the KV cache of committed
blocks (same tokens at temperature 0), what each cached step forwards, that a block never sees
a later one, and the block-length contract. The non-block sampler's tests live in test_generate.py."""

import pytest
import torch
from torch import nn

from rnd1.diffusion.block import block_causal_mask
from rnd1.diffusion.objective import get_objective
from rnd1.generate import diffusion_generate
from rnd1.model.config import get_preset
from rnd1.model.kv_cache import KVCache
from rnd1.model.qwen3 import build_model

MASK, EOS = 511, 256


@pytest.fixture(scope="module")
def model():
    # the two paths' logits differ only by summation order (~4e-7), far below the ranking gaps here
    return build_model(get_preset("debug"), seed=0, attention_mode="bidirectional").eval()


class Recorder(nn.Module):
    """Delegates to the real model, recording each forward's query length and whether it read a cache."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, bool, bool]] = []  # (query tokens, cache passed, committing)

    def forward(self, ids, **kw):
        c = kw.get("kv_cache")
        self.calls.append((ids.shape[1], c is not None, bool(c is not None and c.commit)))
        return self.inner(ids, **kw)


def _both(model, prompts, obj, **kw):
    kw = dict(dict(gen_length=11, steps=11, mask_id=MASK, objective=obj), **kw)
    return (diffusion_generate(model, prompts, kv_cache=True, **kw),
            diffusion_generate(model, prompts, kv_cache=False, **kw))


@pytest.mark.parametrize("name", ["block_a2d", "block_mdlm"])
@pytest.mark.parametrize("bs", [1, 3, 4, 5])
@pytest.mark.parametrize("prompt", [[5, 6, 7, 8], [5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17]])
def test_cached_equals_uncached(model, name, bs, prompt):
    """Prompt lengths 4 / 3 / 9 end on a block boundary (bs 1, 3, 4) or mid-block; gen length 11
    divides none of the sizes."""
    obj = get_objective(name, block_size=bs)
    a, b = _both(model, [prompt], obj)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 11 and MASK not in a.tokens[0]
    assert a.commit_order == b.commit_order
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("name", ["block_a2d", "block_mdlm"])
def test_cached_equals_uncached_whatever_mode_the_model_was_left_in(name):
    """build_model's default is causal: the sampler must attend as its objective does (a cached
    block forward in causal mode would see only the first cached keys), and leave the mode as it
    found it."""
    causal = build_model(get_preset("debug"), seed=0).eval()
    assert causal.attention_mode == "causal"
    obj = get_objective(name, block_size=4)
    a, b = _both(causal, [[5, 6, 7, 8, 9]], obj)
    assert a.tokens == b.tokens and causal.attention_mode == "causal"
    c, _ = _both(build_model(get_preset("debug"), seed=0, attention_mode="bidirectional").eval(), [[5, 6, 7, 8, 9]],
                 obj)
    assert c.tokens == a.tokens  # the same tokens as from the model in its objective's mode


@pytest.mark.parametrize("name", ["block_a2d", "block_mdlm"])
@pytest.mark.parametrize("strategy,threshold", [("confidence", None), ("rnd1", None), ("margin", 0.01)])
def test_ragged_batch_cached_equals_uncached_and_rows_alone(model, name, strategy, threshold):
    obj = get_objective(name, block_size=4)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [1, 2, 3, 4], [50, 51]]
    kw = dict(gen_length=10, steps=6, strategy=strategy, threshold=threshold, eos_id=EOS)
    a, b = _both(model, prompts, obj, **kw)
    assert a.tokens == b.tokens and torch.equal(a.sequences, b.sequences)
    alone = [_both(model, [p], obj, **kw)[0].tokens[0] for p in prompts]
    assert a.tokens == alone
    L = a.sequences.shape[1]
    for p, row in zip(prompts, a.sequences.tolist()):  # left-padded, prompt kept
        assert row[L - 10 - len(p):L - 10] == p


def test_blocks_are_aligned_to_absolute_positions_and_steps_split_over_them(model):
    """Prompt 6, block 4, gen 7: the region touches blocks [4,8) (prompt tail 4..5 fixed) and
    [8,12) and [12,13): 3 blocks, 7 steps split 2 / 2 / 3 (the last block is done after one);
    with the cache: prefill [0,4), steps on 4 / 4 / 1 query tokens, commits of the first two."""
    rec = Recorder(model)
    obj = get_objective("block_mdlm", block_size=4)
    out = diffusion_generate(rec, [[1, 2, 3, 4, 5, 6]], gen_length=7, steps=7, mask_id=MASK, objective=obj)
    steps = [(q, c) for q, c, commit in rec.calls if not commit]
    commits = [q for q, c, commit in rec.calls if commit]
    assert commits == [4, 4, 4]  # prefill, block [4,8), block [8,12)
    assert all(c for _, c in steps) and [q for q, _ in steps] == [4, 4, 4, 4, 1]
    assert out.nfe == len(rec.calls) == 8
    offs = out.commit_order[0]  # region offsets: block 1 = 0..1, block 2 = 2..5, block 3 = 6
    assert sorted(offs[:2]) == [0, 1] and sorted(offs[2:6]) == [2, 3, 4, 5] and offs[6:] == [6]


@pytest.mark.parametrize("name", ["block_a2d", "block_mdlm"])
def test_cached_steps_forward_one_block_uncached_the_prefix(model, name):
    bs, P, G = 4, 8, 12
    obj = get_objective(name, block_size=bs)
    rec = Recorder(model)
    cached = diffusion_generate(rec, [list(range(1, P + 1))], gen_length=G, steps=G, mask_id=MASK, objective=obj)
    assert rec.calls[0] == (P, True, True)  # the prompt's two complete blocks, once
    assert all(q == bs and c for q, c, _ in rec.calls[1:])  # every later forward: one block
    assert sum(commit for *_, commit in rec.calls) == 1 + G // bs - 1  # prefill + every block but the last
    assert cached.nfe == len(rec.calls)
    rec2 = Recorder(model)
    plain = diffusion_generate(rec2, [list(range(1, P + 1))], gen_length=G, steps=G, mask_id=MASK, objective=obj,
                               kv_cache=False)
    assert [q for q, *_ in rec2.calls] == [P + bs] * 4 + [P + 2 * bs] * 4 + [P + 3 * bs] * 4
    assert not any(c for _, c, _ in rec2.calls) and plain.nfe == G
    assert cached.tokens == plain.tokens


def test_a2d_block_size_one_is_one_forward_per_token(model):
    """Block 1 under A2D is AR: each position is read from the kept clean output of the one before,
    so the cached sampler runs only the commit forwards (plus the prefill)."""
    rec = Recorder(model)
    obj = get_objective("block_a2d", block_size=1)
    out = diffusion_generate(rec, [[3, 4, 5]], gen_length=6, steps=6, mask_id=MASK, objective=obj)
    assert [q for q, *_ in rec.calls] == [3, 1, 1, 1, 1, 1] and all(c for _, _, c in rec.calls)
    assert out.nfe == 6
    # equals greedy AR decoding of the same model under causal attention (block-causal with size 1)
    seq = [3, 4, 5]
    for _ in range(6):
        pos = torch.arange(len(seq))[None]
        lg = model(torch.tensor([seq]), positions=pos, attn_mask=block_causal_mask(pos, pos, 1))[0, -1]
        lg[MASK] = float("-inf")
        seq.append(int(lg.argmax()))
    assert out.tokens[0] == seq[3:]


@pytest.mark.parametrize("bs", [1, 3, 4])
def test_a_block_never_attends_to_a_later_block(model, bs):
    """Model level: under block_causal_mask, the outputs up to the end of block b do not change when
    every later token does (and do change when a token inside block b does)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 13), generator=g)
    pos = torch.arange(13).expand(2, 13)
    mask = block_causal_mask(pos, pos, bs)
    out = model(ids, positions=pos, attn_mask=mask)
    end = (5 // bs + 1) * bs  # the end of position 5's block
    later = ids.clone()
    later[:, end:] = torch.randint(0, 500, (2, 13 - end), generator=g)
    out2 = model(later, positions=pos, attn_mask=mask)
    # equal up to the MoE's regrouping of tokens (~1e-7); a leak would move them by ~1e-1
    torch.testing.assert_close(out[:, :end], out2[:, :end], rtol=0, atol=1e-5)
    assert (out[:, end:] - out2[:, end:]).abs().max() > 1e-2
    inside = ids.clone()
    inside[:, end - 1] = (inside[:, end - 1] + 1) % 500
    out3 = model(inside, positions=pos, attn_mask=mask)
    diff = (out[:, end - bs:end] - out3[:, end - bs:end]).abs().amax(dim=(0, 2))
    assert bool((diff > 1e-2).all())  # every position of the block sees it
    torch.testing.assert_close(out[:, :end - bs], out3[:, :end - bs], rtol=0, atol=1e-5)  # earlier blocks do not


def test_cached_block_forward_equals_block_causal_full_forward(model):
    """What the cached path relies on: a block run against the cache of the clean blocks before it
    gives the outputs of the block-causal forward over the whole prefix."""
    ids = torch.randint(0, 500, (1, 11), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(11)[None]
    full = model(ids, positions=pos, attn_mask=block_causal_mask(pos, pos, 4))
    cache = KVCache()
    with cache.committing():
        model(ids[:, :8], positions=pos[:, :8], attn_mask=block_causal_mask(pos[:, :8], pos[:, :8], 4),
              kv_cache=cache)
    step = model(ids[:, 8:], kv_cache=cache)
    assert cache.length == 8
    torch.testing.assert_close(step, full[:, 8:], rtol=0, atol=1e-5)


def test_eos_stops_the_same_way_with_and_without_the_cache():
    class WantsEos(nn.Module):
        """MDLM-style scripted model: position 6 is EOS, everything else token 7+j%3; sees no cache."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x, positions=None, attn_mask=None, kv_cache=None):
            B, L = x.shape
            start = kv_cache.length if kv_cache is not None else 0
            if kv_cache is not None and kv_cache.commit:  # stand-in for appending keys/values
                kv_cache.keys[0] = torch.zeros(1, 1, start + L, 1)
            logits = torch.zeros(B, L, 300)
            for i in range(L):
                j = start + i
                logits[:, i, EOS if j == 6 else 7 + j % 3] = 5.0 + j
            return logits

    obj = get_objective("block_mdlm", block_size=2)
    kw = dict(gen_length=8, steps=8, mask_id=MASK, objective=obj, eos_id=EOS)
    a = diffusion_generate(WantsEos(), [[1, 2, 3]], kv_cache=True, **kw)
    b = diffusion_generate(WantsEos(), [[1, 2, 3]], kv_cache=False, **kw)
    assert a.tokens == b.tokens == [[7 + 3 % 3, 7 + 4 % 3, 7 + 5 % 3, EOS]]
    assert a.sequences[0, -4:].tolist() == [EOS] * 4
    assert a.nfe < b.nfe + 4  # stopped: no forwards for the blocks after EOS


def test_block_length_must_match_the_models_block_size(model):
    obj = get_objective("block_a2d", block_size=4)
    with pytest.raises(ValueError, match="block size 4"):
        diffusion_generate(model, [[1, 2]], gen_length=8, steps=8, mask_id=MASK, objective=obj, block_length=8)
    out = diffusion_generate(model, [[1, 2]], gen_length=8, steps=8, mask_id=MASK, objective=obj, block_length=4)
    assert len(out.tokens[0]) == 8
    with pytest.raises(ValueError, match="number of blocks"):
        diffusion_generate(model, [[1, 2]], gen_length=8, steps=2, mask_id=MASK, objective=obj)


def test_block_sampler_time_and_output_contract(model):
    obj = get_objective("block_a2d", block_size=4)
    out = diffusion_generate(model, [[1, 2, 3], [4]], gen_length=6, steps=6, mask_id=MASK, objective=obj)
    assert out.seconds > 0 and out.tokens_per_s > 0 and len(out.tokens) == 2
    assert out.sequences.shape == (2, 9) and out.sequences.dtype == torch.long
    assert all(sorted(o) == list(range(6)) for o in out.commit_order)
