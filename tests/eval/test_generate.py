"""The diffusion sampler on a scripted toy model (commit order, blocks, thresholds, EOS, the A2D
shift, infilling), and ragged batching on the real debug model."""

import pytest
import torch
from torch import nn

from rnd1.generate import ar_generate, diffusion_generate, rnd1_keep_masked
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model

V, MASK, EOS = 32, 31, 30


class Scripted(nn.Module):
    """Predicts token targets[j] for position j with logit strength strengths[j] (absolute
    positions of a single unpadded row); an A2D model emits that prediction at output j - 1."""

    def __init__(self, targets, strengths, objective="a2d"):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.targets, self.strengths, self.objective = targets, strengths, objective
        self.calls = 0

    def forward(self, x, doc_ids=None, positions=None):
        self.calls += 1
        B, L = x.shape
        logits = torch.zeros(B, L, V)
        for j in range(L):
            out = j - 1 if self.objective == "a2d" else j
            if 0 <= out < L and j < len(self.targets):
                logits[:, out, self.targets[j]] = self.strengths[j]
        return logits


def test_commits_highest_confidence_first_one_per_step():
    prompt = [1, 2]
    targets = [1, 2, 10, 11, 12, 13]
    strengths = [0, 0, 1.0, 4.0, 2.0, 3.0]
    out = diffusion_generate(Scripted(targets, strengths), [prompt], gen_length=4, steps=4, mask_id=MASK)
    assert out.tokens == [[10, 11, 12, 13]]
    assert out.commit_order == [[1, 3, 2, 0]]  # by strength 4, 3, 2, 1
    assert out.nfe == 4


def test_a2d_reads_through_the_shift_and_mdlm_does_not():
    targets, strengths = [1, 10, 11], [0, 3.0, 2.0]
    a2d = diffusion_generate(Scripted(targets, strengths, "a2d"), [[1]], gen_length=2, steps=2, mask_id=MASK)
    mdlm = diffusion_generate(Scripted(targets, strengths, "mdlm"), [[1]], gen_length=2, steps=2, mask_id=MASK,
                              objective="mdlm")
    assert a2d.tokens == mdlm.tokens == [[10, 11]]
    # an MDLM model read as A2D sees the wrong positions' predictions
    wrong = diffusion_generate(Scripted(targets, strengths, "mdlm"), [[1]], gen_length=2, steps=2, mask_id=MASK)
    assert wrong.tokens != [[10, 11]]


def test_blocks_fill_in_order():
    targets = [1] + list(range(10, 16))
    strengths = [0, 1, 1, 1, 9, 9, 9]  # later block is more confident, but must wait
    out = diffusion_generate(Scripted(targets, strengths), [[1]], gen_length=6, steps=6, block_length=3,
                             mask_id=MASK)
    assert sorted(out.commit_order[0][:3]) == [0, 1, 2] and sorted(out.commit_order[0][3:]) == [3, 4, 5]


def test_threshold_decoding_commits_in_parallel():
    targets = [1] + list(range(10, 18))
    strengths = [0, 20, 20, 20, 20, 0.5, 0.5, 20, 20]
    model = Scripted(targets, strengths)
    out = diffusion_generate(model, [[1]], gen_length=8, steps=8, threshold=0.9, mask_id=MASK)
    assert out.tokens == [list(range(10, 18))]
    assert out.nfe < 8 and out.nfe == model.calls


def test_rnd1_rule_keeps_highest_entropy_masked_on_a_linear_schedule():
    targets = [1, 10, 11, 12, 13]
    strengths = [0, 5.0, 1.0, 8.0, 3.0]  # entropy lowest for the strongest
    out = diffusion_generate(Scripted(targets, strengths), [[1]], gen_length=4, steps=2, strategy="rnd1",
                             mask_id=MASK)
    assert out.tokens == [[10, 11, 12, 13]] and out.nfe == 2
    assert set(out.commit_order[0][:2]) == {2, 0}  # step 1: keep 4 * (1 - 1/2) = 2 masked: the uncertain ones


def test_eos_stops_the_row():
    targets = [1, 10, EOS, 12, 13]
    strengths = [0, 9, 8, 1, 1]
    out = diffusion_generate(Scripted(targets, strengths), [[1]], gen_length=4, steps=4, mask_id=MASK, eos_id=EOS)
    assert out.tokens == [[10, EOS]]
    assert out.sequences[0, -2:].tolist() == [EOS, EOS]


def test_infilling_keeps_the_suffix():
    targets = [1, 10, 11, 7, 8]
    strengths = [0, 2, 2, 0, 0]
    out = diffusion_generate(Scripted(targets, strengths), [[1]], gen_length=2, steps=2, mask_id=MASK,
                             suffixes=[[7, 8]])
    assert out.tokens == [[10, 11]] and out.sequences[0].tolist() == [1, 10, 11, 7, 8]


def test_sampling_is_reproducible_with_a_generator():
    model = build_model(get_preset("debug"), seed=0, attention_mode="bidirectional")
    kw = dict(gen_length=12, steps=6, mask_id=511, temperature=1.0, top_k=50, top_p=0.9)
    a = diffusion_generate(model, [[5, 6, 7]], generator=torch.Generator().manual_seed(3), **kw)
    b = diffusion_generate(model, [[5, 6, 7]], generator=torch.Generator().manual_seed(3), **kw)
    c = diffusion_generate(model, [[5, 6, 7]], generator=torch.Generator().manual_seed(4), **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


@pytest.mark.parametrize("strategy", ["confidence", "margin", "entropy", "rnd1"])
def test_ragged_batch_equals_rows_alone(strategy):
    model = build_model(get_preset("debug"), seed=0, attention_mode="bidirectional")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41]]
    kw = dict(gen_length=8, steps=4, block_length=4, mask_id=511, strategy=strategy, eos_id=256)
    both = diffusion_generate(model, prompts, **kw)
    alone = [diffusion_generate(model, [p], **kw).tokens[0] for p in prompts]
    assert both.tokens == alone


def test_ar_greedy_ragged_batch():
    model = build_model(get_preset("debug"), seed=1, attention_mode="causal")
    prompts = [[5, 6, 7, 8], [9]]
    both = ar_generate(model, prompts, max_new_tokens=5)
    alone = [ar_generate(model, [p], max_new_tokens=5).tokens[0] for p in prompts]
    assert both.tokens == alone and all(len(t) == 5 for t in alone)


def test_never_samples_the_mask_or_ids_past_the_vocabulary():
    targets, strengths = [1, MASK, 29], [0, 9.0, 9.0]  # the model "wants" the mask id and a too-large id
    out = diffusion_generate(Scripted(targets, strengths), [[1]], gen_length=2, steps=2, mask_id=MASK,
                             vocab_limit=29)
    assert all(t != MASK and t < 29 for t in out.tokens[0])


class NeverSure(nn.Module):
    """Near-uniform logits everywhere (tiny fixed perturbations, so argmax and ranking are still
    deterministic): no prediction's probability comes anywhere near a 0.9 threshold."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x, doc_ids=None, positions=None):
        self.calls += 1
        B, L = x.shape
        i = torch.arange(L, dtype=torch.float32)[:, None]
        v = torch.arange(V, dtype=torch.float32)[None, :]
        return (1e-3 * torch.sin(7.0 * i + 3.0 * v + 0.5 * i * v)).expand(B, L, V).clone()


@pytest.mark.parametrize("gen_length,block_length,steps", [(8, None, 2), (8, 4, 4), (10, 3, 5), (8, None, 1)])
def test_threshold_commits_the_rest_on_each_blocks_last_step(gen_length, block_length, steps):
    """Issue 14: with no confident prediction, threshold decoding commits one position per step;
    without the last-step rule 6 of 8 outputs (8 tokens, 2 steps) stayed the mask id."""
    model = NeverSure()
    out = diffusion_generate(model, [[1, 2]], gen_length=gen_length, steps=steps, block_length=block_length,
                             threshold=0.9, mask_id=MASK)
    assert len(out.tokens[0]) == gen_length and MASK not in out.tokens[0]
    assert MASK not in out.sequences[0].tolist()
    assert sorted(out.commit_order[0]) == list(range(gen_length))
    bl = block_length or gen_length
    n_blocks, expected_nfe, left = -(-gen_length // bl), 0, steps
    for b in range(n_blocks):  # one commit per step until the block's last step takes the rest
        blk_steps = left // (n_blocks - b)
        left -= blk_steps
        expected_nfe += min(blk_steps, min(bl, gen_length - b * bl))
    assert out.nfe == model.calls == expected_nfe
    blocks = [j // bl for j in out.commit_order[0]]
    assert blocks == sorted(blocks)  # block by block


def _rnd1_reference(n, N):
    """RND1's released loop (rnd/sampling.py), re-derived here with torch's own arithmetic: one
    forward, then for step = N-1..1 keep ``(int64 tensor n * (step / N)).long()`` masked and
    forward again while anything is masked; the rest is committed after the loop. Returns the
    keep count after each commit (last: 0) and the masked counts each forward pass sees."""
    total = torch.tensor([[n]], dtype=torch.long)
    keeps, seen, masked = [], [n], n
    for step in range(N - 1, 0, -1):
        masked = min(masked, int((total * (step / N)).long().clamp(min=0)))
        keeps.append(masked)
        if masked:
            seen.append(masked)
    return keeps + [0], seen


def test_rnd1_keep_rule_equals_rnd1s_float32_expression_for_all_small_sizes():
    """All (n, N) with n, N <= 64: the pure-Python rule equals torch's float32 evaluation of
    RND1's expression, and really differs from exact integer arithmetic where the docstring says."""
    differs, early = 0, []
    for N in range(1, 65):
        for n in range(1, 65):
            keeps, _ = _rnd1_reference(n, N)
            ours = [rnd1_keep_masked(n, N, k) for k in range(1, N + 1)]
            assert ours == keeps, (n, N)
            differs += sum(ours[k - 1] != n * (N - k) // N for k in range(1, N))
            if n == N and N > 1 and ours[N - 2] == 0:
                early.append(N)
    assert differs == 57 and early == [41, 47, 55, 61]
    assert [rnd1_keep_masked(5, 5, k) for k in range(1, 6)] == [4, 3, 2, 1, 0]  # the example
    assert rnd1_keep_masked(22, 22, 22 - 13) == 12  # exact arithmetic would keep 13
    with pytest.raises(ValueError):
        rnd1_keep_masked(4, 4, 0)


class CountsMasks(nn.Module):
    """Records how many mask ids each forward pass sees per block of the generated region;
    every output gets a distinct peak strength so the entropy ranking has no ties."""

    def __init__(self, region_start, gen_length, block_length):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.start, self.g, self.bl = region_start, gen_length, block_length
        self.seen: list[list[int]] = []

    def forward(self, x, doc_ids=None, positions=None):
        B, L = x.shape
        reg = x[0, self.start:self.start + self.g] == MASK
        self.seen.append([int(reg[i:i + self.bl].sum()) for i in range(0, self.g, self.bl)])
        logits = torch.zeros(B, L, V)
        idx = torch.arange(L)
        logits[:, idx, idx % 20 + 1] = 1.0 + 0.37 * ((idx * 13) % L).float()
        return logits


@pytest.mark.parametrize("n,N", [(5, 5), (10, 10), (22, 22), (41, 41), (64, 64), (1, 1), (1, 64), (3, 7),
                                 (7, 3), (64, 5), (17, 40), (40, 17), (63, 64)])
def test_rnd1_strategy_follows_rnd1s_keep_counts_and_forward_passes(n, N):
    """The real sampler, one block: the masked counts its forward passes see, and how many there
    are, equal RND1's loop (n = N = 5 keeps 4, 3, 2, 1; n = N = 10 takes 10 passes)."""
    model = CountsMasks(1, n, n)
    out = diffusion_generate(model, [[1]], gen_length=n, steps=N, strategy="rnd1", mask_id=MASK)
    _, seen = _rnd1_reference(n, N)
    assert [c[0] for c in model.seen] == seen and out.nfe == len(seen)
    assert MASK not in out.tokens[0] and sorted(out.commit_order[0]) == list(range(n))
    if n == N and n not in (41, 47, 55, 61):
        assert out.nfe == N


@pytest.mark.parametrize("gen_length,block_length,steps", [(10, 5, 10), (12, 4, 7), (9, 4, 8)])
def test_rnd1_strategy_applies_the_rule_per_block(gen_length, block_length, steps):
    """Steps split over blocks (earlier blocks get the floor); each block runs RND1's rule with
    n = its size and N = its steps, and the later blocks stay fully masked meanwhile."""
    model = CountsMasks(1, gen_length, block_length)
    out = diffusion_generate(model, [[1]], gen_length=gen_length, steps=steps, block_length=block_length,
                             strategy="rnd1", mask_id=MASK)
    n_blocks = -(-gen_length // block_length)
    expected, left = [], steps
    for b in range(n_blocks):
        blk_steps = left // (n_blocks - b)
        left -= blk_steps
        size = min(block_length, gen_length - b * block_length)
        _, seen = _rnd1_reference(size, blk_steps)
        sizes = [min(block_length, gen_length - c * block_length) for c in range(n_blocks)]
        for m in seen:
            expected.append([0] * b + [m] + sizes[b + 1:])
    assert model.seen == expected and out.nfe == len(expected)
    assert MASK not in out.tokens[0]
    if (gen_length, block_length, steps) == (10, 5, 10):
        assert [c[0] for c in model.seen[:5]] == [5, 4, 3, 2, 1] and out.nfe == 10
