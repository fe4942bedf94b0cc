"""Every Triton kernel under TRITON_INTERPRET=1 against its reference (fp32 and fp16: the
interpreter's bf16 tl.dot is broken), gradients included, on random and edge shapes; the
references against float64 maths; the custom ops under torch.compile(fullgraph=True)."""

import os

import pytest
import torch

from rnd1.kernels.grouped_gemm import grouped_mm
from rnd1.kernels.masked_cross_entropy import masked_cross_entropy, masked_cross_entropy_reference_full
from rnd1.kernels.token_dispatch import build_order, combine, dispatch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}

GROUP_CASES = [
    # (rows per group, K, M): empty groups, one-row groups, sizes off the 16-tile
    ([3, 0, 17, 1, 12], 24, 20),
    ([0, 0, 5], 16, 16),
    ([33], 40, 7),
    ([1, 1, 1, 1], 8, 33),
]


def _offs(sizes, tail=0):
    return torch.tensor(sizes).cumsum(0).to(torch.int32), sum(sizes) + tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes,K,M", GROUP_CASES)
def test_grouped_mm_triton_matches_reference(dtype, sizes, K, M):
    torch.manual_seed(0)
    offs, N = _offs(sizes, tail=3)  # 3 rows past the last offset must come out as zeros
    x = torch.randn(N, K).to(dtype).requires_grad_()
    W = torch.randn(len(sizes), M, K).to(dtype).requires_grad_()  # stored [G, out, in] like the model
    y = grouped_mm(x, W.transpose(-2, -1), offs, backend="triton")
    yr = grouped_mm(x, W.transpose(-2, -1), offs, backend="reference")
    torch.testing.assert_close(y.float(), yr.float(), **TOL[dtype])
    assert torch.all(y[offs[-1]:] == 0)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, W), g)
    rx, rw = torch.autograd.grad(yr, (x, W), g)
    torch.testing.assert_close(gx.float(), rx.float(), **TOL[dtype])
    torch.testing.assert_close(gw.float(), rw.float(), **TOL[dtype])
    for gidx, n in enumerate(sizes):
        if n == 0:
            assert torch.all(gw[gidx] == 0)  # experts without tokens: exactly zero gradient


def test_grouped_mm_reference_vs_float64_and_torch_grouped_mm():
    torch.manual_seed(1)
    offs, N = _offs([4, 0, 9, 3])
    x = torch.randn(N, 12, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 12, 16, dtype=torch.float64, requires_grad=True)
    y = grouped_mm(x, W, offs, backend="reference")
    exact = torch.cat([x[a:b] @ W[g] for g, (a, b) in enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
    torch.testing.assert_close(y, exact)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offs, backend="reference"), (x, W))
    y32 = grouped_mm(x.float(), W.float(), offs, backend="reference")
    torch.testing.assert_close(y32, torch.nn.functional.grouped_mm(x.float(), W.float(), offs=offs),
                               rtol=1e-5, atol=1e-5)


def _grouped_float64(x, w, offs):
    y = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offs.tolist()):
        y[start:end] = x[start:end].double() @ w[g].double()
        start = end
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes,K,M,tail", [([3, 0, 17, 1, 12], 24, 20, 5), ([0, 0, 0], 16, 16, 0),
                                            ([0, 0, 0], 16, 16, 7), ([1], 8, 33, 40), ([0, 35], 40, 7, 0)])
def test_grouped_mm_kernel_writes_every_row_of_an_uninitialised_output(dtype, sizes, K, M, tail):
    """y is allocated empty: the kernel must write every group row and zero the tail rows past
    offs[-1] itself (on CUDA nothing else does). Poison y with NaN and launch the kernel directly;
    N = 0 (no rows at all) included."""
    from rnd1.kernels.grouped_gemm import INTERPRET_CONFIG, _grouped_mm_kernel

    torch.manual_seed(0)
    offs, N = _offs(sizes, tail=tail)
    x = torch.randn(N, K).to(dtype)
    w = torch.randn(len(sizes), M, K).to(dtype).transpose(-2, -1)
    y = torch.full((N, M), float("nan"), dtype=dtype)
    _grouped_mm_kernel[(3,)](x, w, y, offs, len(sizes), N, M, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                             w.stride(2), y.stride(0), y.stride(1), NUM_PROGRAMS=3, **INTERPRET_CONFIG)
    assert not torch.isnan(y).any()
    assert torch.all(y[int(offs[-1]):] == 0)
    torch.testing.assert_close(y.double(), _grouped_float64(x, w, offs), **TOL[dtype])


@pytest.mark.parametrize("N", [0, 9])
def test_grouped_mm_triton_zero_weights_and_no_rows(N):
    """All-zero weights give exactly zero outputs and input gradients; N = 0 runs forward and
    backward and gives zero weight gradients."""
    x = torch.randn(N, 24, requires_grad=True)
    W = torch.zeros(3, 20, 24, requires_grad=True)
    offs = torch.tensor([min(N, 4), min(N, 4), N], dtype=torch.int32)
    y = grouped_mm(x, W.transpose(-2, -1), offs, backend="triton")
    assert y.shape == (N, 20) and torch.all(y == 0)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, W), g)
    assert torch.all(gx == 0)
    ref = torch.zeros(3, 20, 24, dtype=torch.float64)
    ref[0] = g[:min(N, 4)].double().t() @ x[:min(N, 4)].double()
    ref[2] = g[min(N, 4):].double().t() @ x[min(N, 4):].double()
    torch.testing.assert_close(gw.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.all(gw[1] == 0)


@pytest.mark.parametrize("kind,configs", [("fwd", "GPU_CONFIGS"), ("dw", "DW_GPU_CONFIGS")])
def test_grouped_mm_config_choice_is_keyed_by_shape(kind, configs):
    """The deterministic GPU choice: tall row tiles for many rows per group, short ones for few,
    and a tile no wider than M / K when one fits; the same bucket gives the same config."""
    from rnd1.kernels import grouped_gemm as gg

    cands = getattr(gg, configs)
    big = gg._pick_config(gg.shape_key(32768, 16, 2048, 768), cands)
    small = gg._pick_config(gg.shape_key(200, 16, 2048, 768), cands)
    assert big["BLOCK_N"] > small["BLOCK_N"]
    assert small["BLOCK_N"] == min(c["BLOCK_N"] for c in cands)
    assert gg._pick_config(gg.shape_key(32000, 16, 2048, 768), cands) is big  # same bucket
    narrow = gg._pick_config(gg.shape_key(32768, 16, 2048, 64), cands)
    if any(c["BLOCK_M"] <= 64 for c in cands):
        assert narrow["BLOCK_M"] <= 64
    else:
        assert narrow is big


@pytest.mark.parametrize("stored", ["out_in", "in_out"])
def test_grouped_mm_weight_grad_comes_back_in_the_parameters_layout(stored):
    """The fp32 reference (torch.grouped_mm) path writes dW in w's own layout, so a parameter
    stored [G, out, in] and passed transposed gets a contiguous .grad with no copy."""
    torch.manual_seed(2)
    offs, N = _offs([5, 0, 11, 16])
    x = torch.randn(N, 16, requires_grad=True)
    W = torch.randn(4, 32, 16, requires_grad=True) if stored == "out_in" else torch.randn(4, 16, 32, requires_grad=True)
    w = W.transpose(-2, -1) if stored == "out_in" else W
    g = torch.randn(N, 32)
    dx, dw = torch.ops.rnd1_kernels.grouped_mm_backward(g, x, w, offs, "reference")
    assert dw.stride() == torch.empty_like(w).stride()
    grouped_mm(x, w, offs, backend="reference").backward(g)
    assert W.grad.is_contiguous() and torch.all(W.grad[1] == 0)
    x64, g64, starts = x.double(), g.double(), [0] + offs[:-1].tolist()
    exact = torch.stack([x64[a:b].t() @ g64[a:b] for a, b in zip(starts, offs.tolist())])
    torch.testing.assert_close(dw.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dispatch_combine_triton_matches_reference(align, dtype):
    torch.manual_seed(2)
    T, k, E, H = 19, 3, 6, 40
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[:, 0] = 0  # a popular expert, and (likely) an empty one
    x = torch.randn(T, H).to(dtype).requires_grad_()
    w = torch.rand(T, k).to(dtype).requires_grad_()
    res = {}
    for b in ("reference", "triton"):
        xs, info = dispatch(x, ids, E, align=align, backend=b)
        out = combine(torch.tanh(xs.float()).to(dtype), info, w, backend=b)
        grads = torch.autograd.grad(out.float().pow(2).sum(), (x, w))
        res[b] = (xs, out, grads, info)
    torch.testing.assert_close(res["triton"][0], res["reference"][0], **TOL[dtype])
    torch.testing.assert_close(res["triton"][1].float(), res["reference"][1].float(), **TOL[dtype])
    for a, b in zip(res["triton"][2], res["reference"][2]):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
    info = res["reference"][3]
    assert info.offs[-1].item() % align == 0 and info.tokens_per_expert.sum().item() == T * k


def test_dispatch_semantics_vs_float64():
    torch.manual_seed(3)
    T, k, E, H = 7, 2, 4, 5
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [1, 3], [2, 1], [0, 2], [3, 1]])
    x = torch.randn(T, H, dtype=torch.float64)
    w = torch.rand(T, k, dtype=torch.float64)
    xs, info = dispatch(x, ids, E, backend="reference")
    assert info.tokens_per_expert.tolist() == [3, 5, 3, 3]
    starts = [0] + info.offs[:-1].tolist()
    for e in range(E):  # every row in expert e's group comes from a token routed to e
        for r in range(starts[e], info.offs[e].item()):
            assert e in ids[info.src_token[r]].tolist()
    # identity experts: combine(dispatch(x)) = sum_j w_j * x
    torch.testing.assert_close(combine(xs, info, w, backend="reference"), x * w.sum(1, keepdim=True))
    info4 = build_order(ids, E, align=4)
    assert info4.offs.tolist() == [4, 12, 16, 20] and (info4.src_token[:20] == -1).sum().item() == 20 - T * k
    # statically sized (no host sync): T*k + E*(align-1) rows, all past offs[-1] padding
    assert info4.num_rows == T * k + E * 3 and (info4.src_token[20:] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,H,V", [(37, 40, 75), (16, 16, 16), (5, 24, 130)])
def test_masked_ce_triton_matches_float64(dtype, N, H, V):
    torch.manual_seed(4)
    h = (torch.randn(N, H) * 2).to(dtype).requires_grad_()
    W = torch.randn(V, H).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,))
    w = torch.rand(N) * 3
    sel = torch.rand(N) < 0.6
    a = masked_cross_entropy(h, W, t, w, sel, backend="triton")
    ga = torch.autograd.grad(a, (h, W))
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    b = masked_cross_entropy_reference_full(hd, Wd, t, w.double(), sel)
    gb = torch.autograd.grad(b, (hd, Wd))
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(a.double(), b, **tol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.double(), y, **tol)


def test_custom_ops_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 8, 6))
            self.head = torch.nn.Parameter(torch.randn(11, 6))

        def forward(self, x, offs, t, wt):
            y = grouped_mm(x, self.w, offs, backend="reference")
            return masked_cross_entropy(y, self.head, t, wt, backend="reference")

    torch.manual_seed(5)
    m = Block()
    x, offs = torch.randn(10, 8), torch.tensor([2, 2, 10], dtype=torch.int32)
    t, wt = torch.randint(0, 11, (10,)), torch.rand(10)
    eager = m(x, offs, t, wt)
    compiled = torch.compile(m, fullgraph=True)(x, offs, t, wt)
    torch.testing.assert_close(compiled, eager)


CE_EDGE_CASES = [
    # (N, H, V, weights): no rows, one row, sizes off the 16-tile, V off the tile, all weights zero
    (0, 16, 40, "rand"),
    (1, 24, 37, "rand"),
    (33, 40, 75, "rand"),
    (17, 16, 130, "rand"),
    (20, 24, 50, "zero"),
]


def _ce_inputs(N, H, V, wkind, dtype, seed=6):
    torch.manual_seed(seed)
    h = (torch.randn(N, H) * 2).to(dtype).requires_grad_()
    W = torch.randn(V, H).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,))
    w = torch.rand(N) * 3 if wkind == "rand" else torch.zeros(N)
    return h, W, t, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,H,V,wkind", CE_EDGE_CASES)
def test_masked_ce_triton_backward_edge_shapes_vs_float64(dtype, N, H, V, wkind, monkeypatch):
    """Several row chunks (d hidden pass) and vocabulary chunks (d weight pass), each off the tile."""
    import rnd1.kernels.masked_cross_entropy_triton as mct

    monkeypatch.setattr(mct, "GRAD_BLOCK_ELEMS", 24 * 48)
    h, W, t, w = _ce_inputs(N, H, V, wkind, dtype)
    a = masked_cross_entropy(h, W, t, w, backend="triton")
    gh, gW = torch.autograd.grad(a, (h, W))
    assert gh.dtype == dtype and gW.dtype == dtype and gh.shape == h.shape and gW.shape == W.shape
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    b = masked_cross_entropy_reference_full(hd, Wd, t, w.double())
    rh, rW = torch.autograd.grad(b, (hd, Wd)) if b.requires_grad else (torch.zeros_like(hd), torch.zeros_like(Wd))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.double(), b, **tol)
    torch.testing.assert_close(gh.double(), rh, **tol)
    torch.testing.assert_close(gW.double(), rW, **tol)
    if wkind == "zero" or N == 0:
        assert torch.all(gh == 0) and torch.all(gW == 0)


def test_masked_ce_triton_grad_block_covers_every_element_once():
    """The gradient block kernel on a block off both tiles: g = w (softmax - onehot) vs float64,
    and nothing written outside the block (the buffer's tail keeps its sentinel)."""
    import rnd1.kernels.masked_cross_entropy_triton as mct

    h, W, t, w = _ce_inputs(23, 24, 45, "rand", torch.float32)
    h, W = h.detach(), W.detach()
    lse = torch.logsumexp(h.double() @ W.double().t(), 1).float()
    r0, nr, c0, nc = 5, 17, 7, 35
    g = torch.full((nr * nc + 9,), 7.0)
    cfg = mct.INTERPRET_CONFIG
    mct._grad_block_kernel[(-(-nr // cfg["BLOCK_N"]), -(-nc // cfg["BLOCK_V"]))](
        h, W, t, w, lse, g, r0, nr, c0, nc, 24, PRECISION="ieee", **cfg)
    p = torch.softmax(h.double() @ W.double().t(), 1)
    ref = (w.double()[:, None] * (p - torch.nn.functional.one_hot(t, 45).double()))[r0:r0 + nr, c0:c0 + nc]
    torch.testing.assert_close(g[:nr * nc].view(nr, nc).double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(g[nr * nc:] == 7.0)


def test_masked_ce_triton_backward_is_bit_reproducible(monkeypatch):
    import rnd1.kernels.masked_cross_entropy_triton as mct

    monkeypatch.setattr(mct, "GRAD_BLOCK_ELEMS", 32 * 32)
    h, W, t, w = _ce_inputs(37, 40, 75, "rand", torch.float32)
    runs = [torch.autograd.grad(masked_cross_entropy(h, W, t, w, backend="triton"), (h, W)) for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_masked_ce_triton_without_grad_runs_no_gradient_kernel(mode, monkeypatch):
    import rnd1.kernels.masked_cross_entropy_triton as mct

    h, W, t, w = _ce_inputs(9, 16, 30, "rand", torch.float32)
    expected = masked_cross_entropy(h, W, t, w, backend="triton").detach()

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("gradient kernel launched without grad")

    def no_grads(*a, **k):
        raise AssertionError("gradient pass run without grad")

    monkeypatch.setattr(mct, "_grad_block_kernel", Forbidden())
    monkeypatch.setattr(mct, "grads_triton", no_grads)
    if mode == "no_grad":
        with torch.no_grad():
            out = masked_cross_entropy(h, W, t, w, backend="triton")
    elif mode == "inference_mode":
        with torch.inference_mode():
            out = masked_cross_entropy(h, W, t, w, backend="triton")
    else:
        out = masked_cross_entropy(h.detach(), W.detach(), t, w, backend="triton")
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_fp32_dot_precision_follows_torch_tf32_flag():
    from rnd1.kernels.backend import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert dot_precision(torch.float16) == "tf32" and dot_precision(torch.float64) == "ieee"
