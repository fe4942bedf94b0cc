"""The attention backend switch (rnd1/model/attention.py) and the patterns it serves
(rnd1/model/attention_masks.py): FlexAttention with a BlockMask computes what SDPA with the dense
mask computes, for every mask kind, forward and backward, under autocast, activation
checkpointing, torch.compile and the KV cache; the flex path never builds a dense mask; ``auto``
says what it chose and why; a BlockMask that depends on the shape only is built once."""

from __future__ import annotations

import pytest
import torch
from flex_cpu import flex_gradients_on_cpu

from rnd1.model import attention, attention_masks
from rnd1.model.attention_masks import (BlockCausal, Documents, Explicit, TwoStream, block_causal_mask,
                                        two_stream_mask)
from rnd1.model.config import get_preset
from rnd1.model.kv_cache import KVCache
from rnd1.model.qwen3 import build_model

L = 40  # not a multiple of FlexAttention's 128-wide tiles, nor of the diffusion block sizes below


def _docs(B=2):
    rows = [[0] * 13 + [1] * 20 + [2] * 7, [0] * 25 + [1] * 15]
    return torch.tensor(rows[:B])


def _cases():
    """name -> (attention mode, forward kwargs): every masked pattern the project uses."""
    half = L // 2
    pos = torch.arange(L).expand(2, L)
    stream_pos = torch.cat([torch.arange(half)] * 2).expand(2, L)
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    return {
        "documents_causal": ("causal", dict(doc_ids=_docs())),
        "documents_bidirectional": ("bidirectional", dict(doc_ids=_docs())),
        "two_stream": ("bidirectional", dict(attn_mask=TwoStream(half, 7), positions=stream_pos)),
        "two_stream_documents": ("bidirectional", dict(attn_mask=TwoStream(half, 6, _docs()[:, :half]),
                                                       positions=stream_pos)),
        "block_causal_prefix": ("bidirectional", dict(attn_mask=BlockCausal.prefix(L, 6, 2))),
        "block_causal_padded": ("bidirectional", dict(attn_mask=BlockCausal(5, pos, pos, valid))),
        "explicit": ("bidirectional", dict(attn_mask=block_causal_mask(pos, pos, 3))),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("debug"), seed=0)


def _ids(B=2, n=L, seed=0):
    return torch.randint(0, 500, (B, n), generator=torch.Generator().manual_seed(seed))


def _run(model, backend, mode, kw, *, grad=False):
    model.set_attention_backend(backend)
    model.set_attention_mode(mode)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = model(_ids(), **kw)
        if not grad:
            return out, None
        (out.float().square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- the two forms agree
@pytest.mark.parametrize("name", ["documents_causal", "two_stream_documents", "block_causal_padded", "explicit"])
def test_mask_mod_is_the_dense_mask(name):
    """Each pattern's mask_mod, evaluated at every (b, q, kv), is its dense mask."""
    kw = CASES[name][1]
    if "attn_mask" in kw:
        pattern = attention.as_pattern(kw["attn_mask"])
    else:
        pattern = Documents(kw["doc_ids"], CASES[name][0] == "causal")
    dense = pattern.dense()
    B, Lq, Lk = dense.shape[0], dense.shape[2], dense.shape[3]
    b, q, kv = torch.meshgrid(torch.arange(B), torch.arange(Lq), torch.arange(Lk), indexing="ij")
    got = pattern.mask_mod()(b, torch.zeros_like(b), q, kv)
    assert torch.equal(got, dense[:, 0])


def test_two_stream_table_from_the_module_docstring():
    m = two_stream_mask(4, 2)[0, 0].int().tolist()
    assert m == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
                 [0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0],
                 [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]


# --------------------------------------------------------------------------- flex == sdpa
@pytest.mark.parametrize("name", list(CASES))
def test_flex_equals_sdpa_forward(model, name):
    mode, kw = CASES[name]
    ref, _ = _run(model, "sdpa", mode, kw)
    out, _ = _run(model, "flex", mode, kw)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_flex_equals_sdpa_backward(model, name):
    """Gradients of every parameter within 1e-5 (torch's eager FlexAttention on the CPU; see
    tests/flex_cpu.py)."""
    mode, kw = CASES[name]
    ref, gref = _run(model, "sdpa", mode, kw, grad=True)
    with flex_gradients_on_cpu():
        out, g = _run(model, "flex", mode, kw, grad=True)
    assert (out - ref).abs().max() < 1e-5
    assert g.keys() == gref.keys()
    worst = max(((g[n] - gref[n]).abs().max() / gref[n].abs().max().clamp_min(1e-12)).item() for n in g)
    assert worst < 1e-5, worst


def test_flex_under_bf16_autocast(model):
    """Under bf16 autocast flex runs in bf16 like SDPA (q and k cast as autocast casts them for
    SDPA), and lands as close to the fp32 result as SDPA does (measured: 4.8% vs 5.4% of the
    largest logit at most, both bf16 rounding)."""
    mode, kw = CASES["two_stream_documents"]
    fp32, _ = _run(model, "sdpa", mode, kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = _run(model, "sdpa", mode, kw)
        out, _ = _run(model, "flex", mode, kw)
    assert out.dtype == ref.dtype == torch.bfloat16
    err_sdpa, err_flex = (ref.float() - fp32).abs(), (out.float() - fp32).abs()
    assert err_flex.max() < 1.5 * err_sdpa.max() and err_flex.mean() < 1.5 * err_sdpa.mean()


def test_flex_cannot_train_on_the_cpu(model):
    """torch's own refusal, turned into one line that says what to do instead."""
    model.set_attention_backend("flex")
    with pytest.raises(ValueError, match="'flex' cannot train on cpu.*use 'auto' or 'sdpa'"):
        model(_ids(), doc_ids=_docs())
    with pytest.raises(ValueError, match="attention backend 'fast' unknown"):
        model.set_attention_backend("fast")


# --------------------------------------------------------------------------- no dense mask on flex
def test_flex_path_builds_no_dense_mask(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dense mask was built on the flex path")

    for name in ("document_mask", "two_stream_mask", "block_causal_mask"):
        monkeypatch.setattr(attention_masks, name, refuse)
    for name, (mode, kw) in CASES.items():
        if name == "explicit":
            continue  # the caller built that one
        _run(model, "flex", mode, kw)
    with pytest.raises(AssertionError, match="dense mask"):  # the patch bites on the SDPA path
        _run(model, "sdpa", *CASES["documents_causal"])


def test_block_mask_is_reused_for_fixed_shapes(model):
    """Built once per forward for all layers, and once per shape when it depends on the shape only."""
    attention._CACHE.clear()
    calls = []
    real = attention.create_block_mask

    def counting(*args, **kwargs):
        calls.append(args[3:5])
        return real(*args, **kwargs)

    attention.create_block_mask = counting
    try:
        for _ in range(2):
            _run(model, "flex", *CASES["two_stream"])
        assert len(calls) == 1  # four layers, two forwards: one BlockMask
        _run(model, "flex", *CASES["documents_causal"])
        _run(model, "flex", *CASES["documents_causal"])
        assert len(calls) == 3  # documents differ per batch: one per forward, not per layer
    finally:
        attention.create_block_mask = real
    bm = attention.block_mask(TwoStream(2048, 32), "cpu")
    dense = two_stream_mask(2048, 32)
    assert attention.block_mask_bytes(bm) * 100 < dense.numel()  # O((L/128)^2), not O(L^2)


# --------------------------------------------------------------------------- auto
def test_auto_says_what_it_chose_and_why(model, monkeypatch):
    attention.reset_choices()
    _run(model, "auto", *CASES["documents_causal"], grad=True)
    _run(model, "auto", *CASES["documents_causal"])
    lines = attention.choice_lines()
    assert len(lines) == 2
    assert "fwd+bwd]: sdpa (FlexAttention has no backward" in lines[0]
    assert "fwd]: sdpa (CPU mask of 3200 entries" in lines[1]
    monkeypatch.setattr(attention, "CPU_MEASURE_MIN", 0)  # measure even this small shape
    mode, kw = CASES["two_stream"]
    ref, _ = _run(model, "sdpa", mode, kw)
    out, _ = _run(model, "auto", mode, kw)
    line = attention.choice_lines()[-1]
    assert "two_stream B 1 q 40 k 40" in line and "measured: sdpa" in line and " ms, flex " in line
    assert (out - ref).abs().max() < 1e-5
    _run(model, "auto", mode, kw)
    assert len(attention.choice_lines()) == 3  # measured once per key
    attention.reset_choices()


# --------------------------------------------------------------------------- composes
@pytest.mark.parametrize("ac", ["full", "selective"])
def test_flex_with_activation_checkpointing(ac):
    from rnd1.parallel.activation_checkpoint import apply_activation_checkpointing

    plain = build_model(get_preset("debug"), seed=0)
    wrapped = build_model(get_preset("debug"), seed=0)
    apply_activation_checkpointing(wrapped, ac)
    mode, kw = CASES["two_stream_documents"]
    ref, gref = _run(plain, "sdpa", mode, kw, grad=True)
    with flex_gradients_on_cpu():
        out, g = _run(wrapped, "flex", mode, kw, grad=True)
    g = {n.replace("._checkpoint_wrapped_module", ""): v for n, v in g.items()}
    assert (out - ref).abs().max() < 1e-5
    assert max((g[n] - gref[n]).abs().max().item() for n in gref) < 1e-5


def test_flex_inside_compiled_blocks(model):
    """Every block compiled whole (apply_compile's path without EP), BlockMask as a block input."""
    from rnd1.parallel.compile import apply_compile

    compiled = build_model(get_preset("debug"), seed=0)
    apply_compile(compiled)
    for name in ("documents_bidirectional", "two_stream_documents"):
        mode, kw = CASES[name]
        ref, _ = _run(model, "sdpa", mode, kw)
        out, _ = _run(compiled, "flex", mode, kw)
        assert (out - ref).abs().max() < 1e-5, name


@torch.no_grad()
def test_flex_with_the_kv_cache(model):
    """Prefill under the block-causal pattern, then a block against the cache: as with SDPA."""
    model.set_attention_mode("bidirectional")
    ids = _ids(2, 24)
    outs = {}
    for backend in ("sdpa", "flex"):
        model.set_attention_backend(backend)
        cache = KVCache()
        with cache.committing():
            model(ids[:, :16], kv_cache=cache, attn_mask=BlockCausal.prefix(16, 8, 2))
        outs[backend] = model(ids[:, 16:], kv_cache=cache,
                              attn_mask=Explicit(torch.ones(1, 1, 8, 24, dtype=torch.bool)))
    assert (outs["flex"] - outs["sdpa"]).abs().max() < 1e-5


def test_auto_stops_measuring_a_kind_after_a_few_shapes(monkeypatch):
    """A decoding loop has a new shape per forward: past MEASURED_SHAPES_MAX measured shapes of
    a kind, `auto` takes SDPA unmeasured (no compile per step, no Dynamo recompile-limit fallback)."""
    attention.reset_choices()
    monkeypatch.setattr(attention, "CPU_MEASURE_MIN", 0)
    monkeypatch.setattr(attention, "MEASURED_SHAPES_MAX", 2)
    measured = []
    monkeypatch.setattr(attention, "measure_choice", lambda p, *a: (measured.append(p.shape), ("flex", {"flex": 1.0}))[1])
    picks = [attention.choose(TwoStream(L, 8), 4, 2, 16, torch.float32, "cpu", False) for L in (16, 24, 32, 40)]
    assert picks == ["flex", "flex", "sdpa", "sdpa"] and len(measured) == 2
    assert "2 shapes of this kind measured already" in attention.choice_lines()[-1]
    assert attention.choose(TwoStream(16, 8), 4, 2, 16, torch.float32, "cpu", False) == "flex"  # a known shape
    attention.reset_choices()
