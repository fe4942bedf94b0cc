"""The model on its own: attention modes, document masking, meta-device build and init, parameter
and FLOP accounting, the MoE aux loss against transformers, empty experts, presets, step speed."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from rnd1.model.config import ModelConfig, get_preset
from rnd1.model.moe import GroupedExperts
from rnd1.model.qwen3 import Qwen3, build_model


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return build_model(get_preset("debug"), seed=0).eval()


def _ids(B, L, vocab=512, seed=0):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- attention modes
@torch.no_grad()
def test_causal_ignores_future_tokens_and_bidirectional_does_not(debug_model):
    x = _ids(2, 16)
    y = x.clone()
    j = 9
    y[:, j] = (y[:, j] + 1) % 512
    debug_model.set_attention_mode("causal")
    a, b = debug_model(x), debug_model(y)
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it
    debug_model.set_attention_mode("bidirectional")
    a, b = debug_model(x), debug_model(y)
    assert (a[:, :j] - b[:, :j]).abs().amax(dim=-1).min() > 1e-4  # every earlier position too
    debug_model.set_attention_mode("causal")
    with pytest.raises(ValueError, match="attention mode 'sideways' unknown"):
        debug_model.set_attention_mode("sideways")


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@torch.no_grad()
def test_document_masking_isolates_documents(debug_model, mode):
    debug_model.set_attention_mode(mode)
    lens = [7, 12, 5]
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lens)])[None]
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    x = _ids(1, sum(lens))
    packed = debug_model(x, doc_ids=doc_ids, positions=positions)

    y = x.clone()
    y[0, 7:19] = _ids(1, 12, seed=5)  # replace the middle document
    other = debug_model(y, doc_ids=doc_ids, positions=positions)
    keep = doc_ids[0] != 1
    assert torch.allclose(packed[0, keep], other[0, keep], atol=1e-6)
    assert (packed[0, ~keep] - other[0, ~keep]).abs().max() > 1e-3

    start = 0
    for n in lens:
        alone = debug_model(x[:, start:start + n])
        assert torch.allclose(packed[:, start:start + n], alone, atol=1e-5)
        start += n
    debug_model.set_attention_mode("causal")


# --------------------------------------------------------------------------- build and init
def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_meta_build_allocates_nothing():
    cfg = get_preset("qwen3_30b_a3b")
    before = _rss_bytes()
    with torch.device("meta"):
        model = Qwen3(cfg)
    grown = _rss_bytes() - before
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == cfg.param_counts()["total"]  # 30.5e9 params
    assert grown < 64 * 2**20, f"meta build of a 30B model grew RSS by {grown / 2**20:.0f} MiB"


def test_init_weights_reproducible_for_a_seed():
    cfg = get_preset("debug")
    a, b, c = build_model(cfg, seed=7), build_model(cfg, seed=7), build_model(cfg, seed=8)
    with torch.device("meta"):
        d = Qwen3(cfg)
    d.to_empty(device="cpu")
    d.init_weights(seed=7)
    for (name, pa), pb, pc, pd in zip(a.named_parameters(), b.parameters(), c.parameters(), d.parameters()):
        assert torch.equal(pa, pb) and torch.equal(pa, pd), name
        if name.endswith("norm.weight"):
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), name
            assert abs(pa.std().item() - 0.02) < 0.005, name
    tied = build_model(get_preset("debug_dense"))
    assert tied.lm_head.weight is tied.embed_tokens.weight  # survives to_empty


# --------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("preset,total,active,non_embedding", [
    # Published (Qwen3 technical report / model cards): 0.6B with 0.44B non-embedding, 4.0B with
    # 3.6B non-embedding, 30.5B total with 3.3B activated and 29.9B non-embedding.
    ("qwen3_0.6b", 0.6e9, 0.6e9, 0.44e9),
    ("qwen3_4b", 4.0e9, 4.0e9, 3.6e9),
    ("qwen3_30b_a3b", 30.5e9, 3.3e9, 29.9e9),
])
def test_param_counts_match_published(preset, total, active, non_embedding):
    cfg = get_preset(preset)
    pc = cfg.param_counts()
    with torch.device("meta"):
        model = Qwen3(cfg)
    assert sum(p.numel() for p in model.parameters()) == pc["total"]
    # Qwen's "non-embedding" count excludes both the input embedding and the LM head.
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    rel = lambda got, want: abs(got - want) / want  # noqa: E731  (published numbers have 2-3 digits)
    assert rel(pc["total"], total) < 0.02, pc
    assert rel(pc["active"], active) < 0.03, pc
    assert rel(pc["total_non_embedding"] - head, non_embedding) < 0.02, pc
    print(f"{preset}: total {pc['total'] / 1e9:.3f}B active {pc['active'] / 1e9:.3f}B "
          f"non-embedding {(pc['total_non_embedding'] - head) / 1e9:.3f}B")


def test_flops_per_token_hand_computed():
    cfg = ModelConfig(vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=2, intermediate_size=8, mask_token_id=9)
    # q 4x4 + k 4x2 + v 4x2 + o 4x4 = 48, q/k norms 2+2 = 4, two layer norms 2x4 = 8,
    # MLP 3x4x8 = 96 -> layer 156; final norm 4; head 10x4 = 40; embedding 10x4 = 40 + the
    # separate [MASK] row 4.
    assert cfg.param_counts()["total"] == 156 + 4 + 40 + 40 + 4
    assert cfg.param_counts()["flop_params_per_token"] == 156 + 4 + 40
    # 6 N + 12 * layers * seq * heads * head_dim = 6*200 + 12*1*16*2*2
    assert cfg.flops_per_token(16) == 1200 + 768
    assert sum(p.numel() for p in Qwen3(cfg).parameters()) == 244

    moe = cfg.replace(moe_intermediate_size=3, num_experts=4, num_experts_per_tok=2)
    # MoE layer: router 4x4 = 16, 2 active experts x 3x4x3 = 72 -> 52 + 8 + 16 + 72 = 148 active
    assert moe.param_counts()["flop_params_per_token"] == 148 + 4 + 40
    assert moe.param_counts()["total"] == 52 + 8 + 16 + 4 * 36 + 4 + 40 + 40 + 4


# --------------------------------------------------------------------------- MoE
def test_aux_loss_equals_transformers_load_balancing_loss(debug_model):
    lb = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe").load_balancing_loss_func
    cfg = debug_model.config
    captured = []
    routers = [layer.mlp.router for layer in debug_model.layers if layer.is_moe]
    hooks = [r.register_forward_hook(lambda mod, inp, out: captured.append(F.linear(inp[0], mod.weight)))
             for r in routers]
    try:
        debug_model(_ids(2, 24))
    finally:
        for h in hooks:
            h.remove()
    ours = debug_model.moe_aux_loss()
    ref = lb(tuple(captured), cfg.num_experts, cfg.num_experts_per_tok)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0), (ours, ref)
    assert ours.item() > 0.5  # ~1 for balanced routing, so this is not a trivial 0 == 0
    weights = [r.weight for r in routers]
    g_ours = torch.autograd.grad(ours, weights, retain_graph=True)
    g_ref = torch.autograd.grad(ref, weights)
    for a, b in zip(g_ours, g_ref):
        assert a.abs().max() > 1e-3
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()
    counts = debug_model.tokens_per_expert()
    assert counts.shape == (cfg.num_experts,)
    assert counts.sum().item() == 2 * 24 * cfg.num_experts_per_tok * len(cfg.moe_layer_ids)


def test_experts_without_tokens_get_exactly_zero_grads():
    model = build_model(get_preset("debug"), seed=1)
    k = model.config.num_experts_per_tok

    def only_first_experts(mod, inp, out):  # route every token to experts 0..k-1
        top_w, top_ids, probs = out
        return top_w, torch.arange(k).expand_as(top_ids).contiguous(), probs

    for layer in model.layers:
        layer.mlp.router.register_forward_hook(only_first_experts)
    out = model(_ids(2, 16))
    (out.square().mean() + model.moe_aux_loss()).backward()
    assert torch.isfinite(out).all()
    for layer in model.layers:
        ex = layer.mlp.experts
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            assert torch.isfinite(p.grad).all()
            assert torch.equal(p.grad[k:], torch.zeros_like(p.grad[k:]))
            assert p.grad[:k].abs().amax(dim=(1, 2)).min() > 0


def test_grouped_experts_with_empty_groups_match_a_loop():
    torch.manual_seed(0)
    ex = GroupedExperts(5, 8, 6)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = [0, 3, 0, 4, 0]  # empty first, middle and last groups
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(7, 8)
    got = ex(x, offs)
    rows, want = 0, []
    for e, n in enumerate(counts):
        xe = x[rows:rows + n]
        want.append((F.silu(xe @ ex.gate_proj[e].T) * (xe @ ex.up_proj[e].T)) @ ex.down_proj[e].T)
        rows += n
    assert torch.allclose(got, torch.cat(want), atol=1e-6)


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset,overrides", [
    ("debug", {}),
    ("debug_dense", {}),
    # Full-width layers of the real presets, shrunk in depth / vocab / expert count to stay small.
    ("qwen3_0.6b", dict(num_hidden_layers=2, vocab_size=1024, mask_token_id=1023)),
    ("qwen3_4b", dict(num_hidden_layers=1, vocab_size=1024, mask_token_id=1023)),
    ("qwen3_30b_a3b", dict(num_hidden_layers=1, vocab_size=1024, mask_token_id=1023, num_experts=16)),
])
@torch.no_grad()
def test_presets_build_and_forward(preset, overrides):
    model = build_model(get_preset(preset, **overrides), seed=0)
    V = model.config.vocab_size
    x = _ids(2, 8, vocab=V)
    logits = model(x)
    assert logits.shape == (2, 8, V) and torch.isfinite(logits).all()
    hidden = model(x, return_hidden=True)
    assert hidden.shape == (2, 8, model.config.hidden_size)
    assert torch.allclose(model.lm_head(hidden), logits, atol=1e-5)


def test_debug_preset_train_step_speed():
    """Not a timed assert (shared CPU): prints the measured fwd+bwd time at batch 8 x 256."""
    torch.manual_seed(0)
    model = build_model(get_preset("debug"), seed=0)
    model.set_attention_mode("bidirectional")
    x = _ids(8, 256)

    def step():
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten()) + 0.001 * model.moe_aux_loss()
        loss.backward()
        return loss

    step()  # warm-up
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    print(f"\ndebug preset fwd+bwd, batch 8 x 256: best {min(times) * 1e3:.0f} ms, "
          f"median {sorted(times)[1] * 1e3:.0f} ms (threads={torch.get_num_threads()})")
