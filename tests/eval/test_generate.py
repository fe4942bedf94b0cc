"""The diffusion sampler on a scripted toy model (commit order, blocks, thresholds, EOS, the A2D
shift, infilling), and ragged batching on the real debug model."""

import pytest
import torch
from torch import nn

from rnd1.generate import ar_generate, diffusion_generate
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
