"""The chunked masked cross-entropy reference against float64 full-logits maths."""

import pytest
import torch

from rnd1.kernels.backend import resolve_backend
from rnd1.kernels.masked_cross_entropy import masked_cross_entropy, masked_cross_entropy_reference_full


@pytest.mark.parametrize("select_kind", ["none", "random", "all_false"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_values_and_grads_match_float64(select_kind, chunk):
    torch.manual_seed(0)
    N, H, V = 37, 24, 101
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[3] = -100  # ignore_index
    w = torch.rand(N, dtype=torch.float64) * 5
    sel = {"none": None, "random": torch.rand(N) < 0.5, "all_false": torch.zeros(N, dtype=torch.bool)}[select_kind]
    a = masked_cross_entropy(h, W, t, w, sel, chunk_tokens=chunk)
    (gh, gW) = torch.autograd.grad(a, (h, W))
    b = masked_cross_entropy_reference_full(h, W, t, w, sel)
    (rh, rW) = torch.autograd.grad(b, (h, W)) if b.requires_grad else (torch.zeros_like(h), torch.zeros_like(W))
    torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gW, rW, rtol=1e-10, atol=1e-10)


def test_bf16_inputs_fp32_accumulation_and_large_logits():
    torch.manual_seed(1)
    h = (torch.randn(64, 32) * 30).bfloat16()
    W = torch.randn(300, 32).bfloat16()
    t = torch.randint(0, 300, (64,))
    w = torch.ones(64)
    a = masked_cross_entropy(h, W, t, w)
    b = masked_cross_entropy_reference_full(h.double(), W.double(), t, w.double())
    assert a.dtype == torch.float32 and torch.isfinite(a)
    assert abs(a.item() - b.item()) / b.item() < 2e-2


def test_backend_switch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("reference", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("cuda-magic", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"


@pytest.mark.parametrize("select_kind", ["none", "random"])
def test_vocab_chunked_low_memory_path_matches_float64(select_kind, monkeypatch):
    import rnd1.kernels.masked_cross_entropy as mce

    monkeypatch.setattr(mce, "VOCAB_CHUNK_ELEMS", 37 * 128)  # several vocabulary chunks
    torch.manual_seed(0)
    N, H, V = 37, 24, 301
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    w = torch.rand(N, dtype=torch.float64) * 5
    sel = None if select_kind == "none" else torch.rand(N) < 0.5
    a = masked_cross_entropy(h, W, t, w, sel, chunk_tokens=0)
    ga = torch.autograd.grad(a, (h, W))
    b = masked_cross_entropy_reference_full(h, W, t, w, sel)
    gb = torch.autograd.grad(b, (h, W))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    # bf16 weights: dW is written in the weight's dtype (no fp32 [V, H] buffer)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    gw = torch.autograd.grad(masked_cross_entropy(hb, Wb, t, w.float(), sel, chunk_tokens=0), Wb)[0]
    assert gw.dtype == torch.bfloat16
    hr, Wr = hb.detach().double().requires_grad_(), Wb.detach().double().requires_grad_()  # same rounded inputs
    ref = torch.autograd.grad(masked_cross_entropy_reference_full(hr, Wr, t, w, sel), Wr)[0]
    assert (gw.double() - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 rounding of the gradient block


@pytest.mark.parametrize("chunk", [7, 0])
def test_no_grad_asks_for_no_gradients(chunk, monkeypatch):
    """Under no_grad (validation) the op is asked for the loss only: no dW buffer, no gradient
    matmuls, whatever requires_grad says (ctx.needs_input_grad ignores grad mode)."""
    import rnd1.kernels.masked_cross_entropy as mce

    calls = []
    real = mce._fused_op

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(mce, "_fused_op", spy)
    torch.manual_seed(2)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(19, 8, dtype=torch.float64, requires_grad=True)
    t, w = torch.randint(0, 19, (11,)), torch.rand(11, dtype=torch.float64)
    with torch.no_grad():
        a = masked_cross_entropy(h, W, t, w, chunk_tokens=chunk)
    assert calls == [False] and not a.requires_grad
    b = masked_cross_entropy(h, W, t, w, chunk_tokens=chunk)
    assert calls == [False, True] and b.requires_grad
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
