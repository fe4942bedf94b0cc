"""Triton kernels of the masked cross-entropy (see ``kernels/masked_cross_entropy.py``).

One program owns BLOCK_N rows (already gathered: only supervised positions reach the head).

1. ``_lse_kernel``: stream over the vocabulary in BLOCK_V tiles; each logits tile [BN, BV] is
   built over BLOCK_H slices of the hidden size with ``tl.dot`` (fp32 accumulation) and folded
   into an online max / sum-of-exponentials; the target's logit is picked up when its tile
   passes. Out: lse [N] and the weighted loss per row. The [N, V] logits never exist.
2. ``_grad_kernel``: stream over the vocabulary again, recompute the tile, form
   g = w * (softmax - onehot) in registers, then for every BLOCK_H slice accumulate
   d_hidden[rows] += g @ W[tile] (rows are owned by this program: plain read-modify-write) and
   d_weight[tile] += g^T @ hidden[rows] (shared across programs: fp32 atomic adds).

FLOPs: 2NVH for the forward pass plus 6NVH for the gradient pass (tile recompute, d_hidden,
d_weight) versus 6NVH for an unfused implementation that stores the logits.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """hidden[rows] @ weight[cols]^T as an fp32 [BLOCK_N, BLOCK_V] tile, over BLOCK_H slices."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        a = tl.load(h_ptr + rows[:, None] * H + hk[None, :], mask=rmask[:, None] & (hk[None, :] < H), other=0.0)
        b = tl.load(w_ptr + cols[None, :] * H + hk[:, None], mask=cmask[None, :] & (hk[:, None] < H), other=0.0)
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _lse_kernel(h_ptr, w_ptr, t_ptr, wt_ptr, lse_ptr, loss_ptr, N, V, H,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tlogit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        acc = _logits_tile(h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_N, BLOCK_V, BLOCK_H)
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
def _grad_kernel(h_ptr, w_ptr, t_ptr, wt_ptr, lse_ptr, dh_ptr, dw_ptr, N, V, H,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    wt = tl.load(wt_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        acc = _logits_tile(h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_N, BLOCK_V, BLOCK_H)
        p = tl.exp(acc - lse[:, None])
        g = wt[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))
        g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
        gc = g.to(h_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + tl.arange(0, BLOCK_H)
            hmask = hk < H
            wtile = tl.load(w_ptr + cols[:, None] * H + hk[None, :], mask=cmask[:, None] & hmask[None, :], other=0.0)
            dh_ptrs = dh_ptr + rows[:, None] * H + hk[None, :]
            dmask = rmask[:, None] & hmask[None, :]
            tl.store(dh_ptrs, tl.load(dh_ptrs, mask=dmask, other=0.0) + tl.dot(gc, wtile), mask=dmask)
            htile = tl.load(h_ptr + rows[:, None] * H + hk[None, :], mask=dmask, other=0.0)
            tl.atomic_add(dw_ptr + cols[:, None] * H + hk[None, :], tl.dot(tl.trans(gc), htile),
                          mask=cmask[:, None] & hmask[None, :])


# Chosen from the AOT register report: the largest tile with no spills on sm_90 (kernels/README.md).
GPU_CONFIG = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2)
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)


def fused_forward_triton(hidden, weight, targets, weights, need_grads: bool, config: dict | None = None):
    """-> (loss fp32 scalar, d_hidden fp32 [N, H] or None, d_weight fp32 [V, H] or None)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = dict(config or (INTERPRET_CONFIG if os.environ.get("TRITON_INTERPRET") == "1" else GPU_CONFIG))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    targets = targets.contiguous()
    weights = weights.contiguous()
    _lse_kernel[grid](hidden, weight, targets, weights, lse, loss, N, V, H, **cfg)
    if not need_grads:
        return loss.sum(), None, None
    dh = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    _grad_kernel[grid](hidden, weight, targets, weights, lse, dh, dw, N, V, H, **cfg)
    return loss.sum(), dh, dw


def aot_specs(dtype: str = "bf16") -> list[tuple]:
    c = GPU_CONFIG
    ce = {k: v for k, v in c.items() if k.startswith("BLOCK")}
    sig = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "t_ptr": "*i64", "wt_ptr": "*fp32", "lse_ptr": "*fp32",
           "loss_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", **{k: "constexpr" for k in ce}}
    gsig = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "t_ptr": "*i64", "wt_ptr": "*fp32", "lse_ptr": "*fp32",
            "dh_ptr": "*fp32", "dw_ptr": "*fp32", "N": "i32", "V": "i32", "H": "i32", **{k: "constexpr" for k in ce}}
    return [("masked_ce_lse", _lse_kernel, sig, ce, c["num_warps"], c["num_stages"]),
            ("masked_ce_grad", _grad_kernel, gsig, ce, c["num_warps"], c["num_stages"])]
