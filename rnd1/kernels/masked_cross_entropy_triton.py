"""Triton kernels of the masked cross-entropy (see ``rnd1/kernels/masked_cross_entropy.py``).

Rows are already gathered: only supervised positions reach the head.

Forward, ``_lse_kernel``: one program owns BLOCK_N rows and streams the vocabulary in BLOCK_V
tiles; each logits tile [BN, BV] is built over BLOCK_H slices of the hidden size with ``tl.dot``
(fp32 accumulation) and folded into an online max / sum-of-exponentials; the target's logit is
picked up when its tile passes. Out: lse [N] and the weighted loss per row.

Gradients (``grads_triton``): no atomics, no read-modify-write of an output, deterministic.
``_grad_block_kernel`` recomputes one logits tile per program from the saved lse and writes
g = w (softmax - onehot) into a bounded block buffer (input dtype); cuBLAS / torch GEMMs then
write each output slice exactly once:

1. d hidden, over row chunks of C rows: g[C, V] (grid C/BN x V/BV), dh[rows] = g @ W.
2. d weight, over vocabulary chunks of cv columns: g[N, cv], dW[cols] = g^T @ hidden.

FLOPs: 2NVH forward + 8NVH for the gradients (two logits recomputes, dh, dW); the extra 2NVH
over a single-pass design buys the absence of atomics and of a [N, H] or [V, H] accumulator that
is re-read per vocabulary tile (rnd1/kernels/README.md argues the choice).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rnd1.kernels.backend import dot_precision
from rnd1.kernels.interpreter_compat import patch_if_interpreting
from rnd1.kernels.offsets import row_offset

patch_if_interpreting()  # Triton <= 3.6's interpreter under NumPy >= 2.4 (interpreter_compat.py)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """hidden[rows] @ weight[cols]^T as an fp32 [BLOCK_N, BLOCK_V] tile, over BLOCK_H slices."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        a = tl.load(h_ptr + row_offset(rows[:, None], H) + hk[None, :], mask=rmask[:, None] & (hk[None, :] < H), other=0.0)
        b = tl.load(w_ptr + row_offset(cols[None, :], H) + hk[:, None], mask=cmask[None, :] & (hk[:, None] < H), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_kernel(h_ptr, w_ptr, t_ptr, wt_ptr, lse_ptr, loss_ptr, N, V, H,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tlogit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        acc = _logits_tile(h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        acc = tl.where(cmask[None, :], acc, float("-inf"))
        new_m = tl.maximum(m, tl.max(acc, axis=1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(acc - new_m[:, None]), axis=1)
        m = new_m
        hit = cols[None, :] == tgt[:, None]
        tlogit += tl.sum(tl.where(hit, acc, 0.0), axis=1)
    lse = m + tl.log(s)
    wt = tl.load(wt_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, wt * (lse - tlogit), mask=rmask)


@triton.jit
def _grad_block_kernel(h_ptr, w_ptr, t_ptr, wt_ptr, lse_ptr, g_ptr, row0, n_rows, col0, n_cols, H,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                       PRECISION: tl.constexpr):
    """g[r, c] = w[row0 + r] * (softmax - onehot)[row0 + r, col0 + c] for the block of n_rows x n_cols
    (g row-major with leading dimension n_cols). One program per [BLOCK_N, BLOCK_V] tile; every
    element of g is written exactly once."""
    lr = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lc = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = lr < n_rows
    cmask = lc < n_cols
    rows = row0 + lr
    cols = col0 + lc
    acc = _logits_tile(h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    wt = tl.load(wt_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    p = tl.exp(acc - lse[:, None])
    g = wt[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))
    omask = rmask[:, None] & cmask[None, :]
    g = tl.where(omask, g, 0.0)
    tl.store(g_ptr + row_offset(lr[:, None], n_cols) + lc[None, :], g.to(g_ptr.dtype.element_ty), mask=omask)


# Chosen from the AOT register report: the largest tile with no spills on sm_90 (rnd1/kernels/README.md).
GPU_CONFIG = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2)
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
# Elements of the gradient block buffer g (input dtype): 2^25 = 64 MiB in bf16 at most, whatever N and V.
GRAD_BLOCK_ELEMS = 1 << 25


def _cfg(config):
    cfg = dict(config or (INTERPRET_CONFIG if os.environ.get("TRITON_INTERPRET") == "1" else GPU_CONFIG))
    return cfg


def grads_triton(hidden, weight, targets, weights, lse, config: dict | None = None,
                 block_elems: int | None = None):
    """-> (d_hidden [N, H] in hidden's dtype, d_weight [V, H] in weight's dtype) for an incoming
    gradient of 1. Inputs contiguous; lse fp32 [N] from the forward kernel."""
    cfg = _cfg(config)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    N, H = hidden.shape
    V = weight.shape[0]
    budget = GRAD_BLOCK_ELEMS if block_elems is None else block_elems
    prec = dot_precision(hidden.dtype)
    dh = torch.empty(N, H, dtype=hidden.dtype, device=hidden.device)
    dw = torch.empty(V, H, dtype=hidden.dtype, device=hidden.device)  # weight.dtype == hidden.dtype (tl.dot)
    if N == 0:
        return dh.zero_(), dw.zero_()
    # 1. d hidden: row chunks (a multiple of BLOCK_N rows), the whole vocabulary per chunk
    c_rows = min(N, max(bn, budget // max(V, 1) // bn * bn))
    c_cols = min(V, max(bv, budget // N // bv * bv))
    g = torch.empty(max(c_rows * V, N * c_cols), dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, N, c_rows):
        nr = min(c_rows, N - r0)
        gb = g[:nr * V].view(nr, V)
        _grad_block_kernel[(triton.cdiv(nr, bn), triton.cdiv(V, bv))](
            hidden, weight, targets, weights, lse, gb, r0, nr, 0, V, H, PRECISION=prec, **cfg)
        torch.mm(gb, weight, out=dh[r0:r0 + nr])
    # 2. d weight: vocabulary chunks (a multiple of BLOCK_V columns), all rows per chunk
    for v0 in range(0, V, c_cols):
        nc = min(c_cols, V - v0)
        gb = g[:N * nc].view(N, nc)
        _grad_block_kernel[(triton.cdiv(N, bn), triton.cdiv(nc, bv))](
            hidden, weight, targets, weights, lse, gb, 0, N, v0, nc, H, PRECISION=prec, **cfg)
        torch.mm(gb.t(), hidden, out=dw[v0:v0 + nc])
    return dh, dw


def fused_forward_triton(hidden, weight, targets, weights, need_grads: bool, config: dict | None = None):
    """-> (loss fp32 scalar, d_hidden [N, H] or None, d_weight [V, H] or None); the gradients in
    the inputs' dtype (fp32 accumulation inside every GEMM, each element rounded once)."""
    if hidden.dtype != weight.dtype:
        raise TypeError(f"masked CE (triton): hidden {hidden.dtype} and weight {weight.dtype} must share a dtype")
    hidden, weight = hidden.contiguous(), weight.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _cfg(config)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    loss = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    targets = targets.contiguous()
    weights = weights.contiguous()
    if N > 0:
        _lse_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](hidden, weight, targets, weights, lse, loss, N, V, H,
                                                       PRECISION=dot_precision(hidden.dtype), **cfg)
    if not need_grads:
        return loss.sum(), None, None
    dh, dw = grads_triton(hidden, weight, targets, weights, lse, cfg)
    return loss.sum(), dh, dw


def aot_specs(dtype: str = "bf16") -> list[tuple]:
    """The LSE kernel and both launches of the gradient kernel (d hidden: row chunks over the
    whole vocabulary; d weight: vocabulary chunks over all rows) at the issue's shapes, 16,384
    supervised rows x hidden 2048 against Qwen3's 151,936-token vocabulary, with sample
    arguments so rnd1/kernels/aot.py compiles them as the JIT specialises each launch."""
    from rnd1.kernels.aot import DTYPES, SampleTensor

    dt = DTYPES[dtype]
    c = GPU_CONFIG
    ce = {k: v for k, v in c.items() if k.startswith("BLOCK")}
    ce["PRECISION"] = "ieee" if dtype == "fp32" else "tf32"
    N, V, H = 16384, 151936, 2048
    h, w = SampleTensor(dt, (N, H)), SampleTensor(dt, (V, H))
    per_row = dict(t_ptr=SampleTensor(torch.int64, (N,)), wt_ptr=SampleTensor(torch.float32, (N,)),
                   lse_ptr=SampleTensor(torch.float32, (N,)))
    c_rows = min(N, max(c["BLOCK_N"], GRAD_BLOCK_ELEMS // V // c["BLOCK_N"] * c["BLOCK_N"]))
    c_cols = min(V, max(c["BLOCK_V"], GRAD_BLOCK_ELEMS // N // c["BLOCK_V"] * c["BLOCK_V"]))
    g = SampleTensor(dt, (max(c_rows * V, N * c_cols),))
    lse = dict(h_ptr=h, w_ptr=w, **per_row, loss_ptr=SampleTensor(torch.float32, (N,)), N=N, V=V, H=H)
    dh = dict(h_ptr=h, w_ptr=w, **per_row, g_ptr=g, row0=c_rows, n_rows=c_rows, col0=0, n_cols=V, H=H)
    dw = dict(h_ptr=h, w_ptr=w, **per_row, g_ptr=g, row0=0, n_rows=N, col0=c_cols, n_cols=c_cols, H=H)
    return [("masked_ce_lse", _lse_kernel, lse, ce, c["num_warps"], c["num_stages"]),
            ("masked_ce_grad_dh", _grad_block_kernel, dh, ce, c["num_warps"], c["num_stages"]),
            ("masked_ce_grad_dw", _grad_block_kernel, dw, ce, c["num_warps"], c["num_stages"])]
