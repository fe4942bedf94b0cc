"""Token dispatch and combine for MoE layers.

``dispatch(x [T, H], topk_ids [T, k], num_experts, align)`` builds the expert-sorted order of the
T*k (token, slot) pairs with a stable sort, counts rows per expert, optionally pads each expert's
group to a multiple of ``align`` (the grouped GEMM's tile alignment), and gathers the rows in
one pass. ``combine(y_sorted, info, topk_weights)`` returns out[t] = sum_j w[t, j] *
y_sorted[pos(t, j)]: each output row sums its own k contributions, so no atomics are needed.

No Python loop over experts. Host syncs: none with ``align == 1`` (the output has exactly
T*k rows); with padding, one ``.item()`` for the padded row count, which sizes the output.

Backward: dispatch's gradient is combine with unit weights (each token collects the gradient
of its k copies); combine's gradients are a gather (d y_sorted[pos(t, j)] = w[t, j] * g[t])
and a row dot product (d w[t, j] = <y_sorted[pos(t, j)], g[t]>).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.backend import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@dataclass
class DispatchInfo:
    src_token: torch.Tensor  # [N] token index of each sorted row (-1 for padding rows)
    pos: torch.Tensor  # [T, k] sorted row of each (token, slot)
    tokens_per_expert: torch.Tensor  # [E] real rows per expert
    offs: torch.Tensor  # [E] int32 cumulative group ends (padded coordinates)
    num_rows: int


def build_order(topk_ids: torch.Tensor, num_experts: int, align: int = 1) -> DispatchInfo:
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs sorted by expert
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    if align > 1:
        padded = (counts + align - 1) // align * align
        ends = torch.cumsum(padded, 0)
        starts_pad = ends - padded
        starts_real = torch.cumsum(counts, 0) - counts
        rank_in_group = torch.arange(T * k, device=flat.device) - starts_real[flat[order]]
        dest = starts_pad[flat[order]] + rank_in_group
        n_rows = int(ends[-1].item())  # the one host sync: size of the padded output
    else:
        ends = torch.cumsum(counts, 0)
        dest = torch.arange(T * k, device=flat.device)
        n_rows = T * k
    pos = torch.empty(T * k, dtype=torch.int64, device=flat.device)
    pos[order] = dest
    src = torch.full((n_rows,), -1, dtype=torch.int64, device=flat.device)
    src[dest] = order // k
    return DispatchInfo(src, pos.view(T, k), counts, ends.to(torch.int32), n_rows)


# --------------------------------------------------------------------------- reference
def gather_rows_reference(x, src):
    out = x.new_zeros(src.shape[0], x.shape[1])
    valid = src >= 0
    out[valid] = x[src[valid]]
    return out


def combine_reference(y, pos, w):
    """out[t] = sum_j w[t, j] * y[pos[t, j]]."""
    return torch.einsum("tkh,tk->th", y[pos], w.to(y.dtype))


# --------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _gather_kernel(x_ptr, src_ptr, out_ptr, H, BLOCK_H: tl.constexpr):
        row = tl.program_id(0)
        src = tl.load(src_ptr + row)
        valid = src >= 0  # padding rows (src -1) are written as zeros
        safe = tl.where(valid, src, 0)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            v = tl.load(x_ptr + safe * H + cols, mask=cols < H, other=0.0)
            tl.store(out_ptr + row * H + cols, tl.where(valid, v, tl.zeros_like(v)), mask=cols < H)

    @triton.jit
    def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for j in range(K):
                p = tl.load(pos_ptr + t * K + j)
                wt = tl.load(w_ptr + t * K + j).to(tl.float32)
                acc += wt * tl.load(y_ptr + p * H + cols, mask=cols < H, other=0.0).to(tl.float32)
            tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)

    @triton.jit
    def _combine_bwd_kernel(g_ptr, y_ptr, pos_ptr, w_ptr, dy_ptr, dw_ptr, H, K: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        for j in range(K):
            p = tl.load(pos_ptr + t * K + j)
            wt = tl.load(w_ptr + t * K + j).to(tl.float32)
            dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                g = tl.load(g_ptr + t * H + cols, mask=cols < H, other=0.0).to(tl.float32)
                yv = tl.load(y_ptr + p * H + cols, mask=cols < H, other=0.0).to(tl.float32)
                tl.store(dy_ptr + p * H + cols, (wt * g).to(dy_ptr.dtype.element_ty), mask=cols < H)
                dot += g * yv
            tl.store(dw_ptr + t * K + j, tl.sum(dot, axis=0))


BLOCK_H = 1024


def _block_h(H):
    return min(BLOCK_H, triton.next_power_of_2(H))


def gather_rows_triton(x, src):
    x = x.contiguous()
    out = torch.empty(src.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    if src.numel():
        _gather_kernel[(src.shape[0],)](x, src, out, x.shape[1], BLOCK_H=_block_h(x.shape[1]))
    return out


def combine_triton(y, pos, w):
    y, pos, w = y.contiguous(), pos.contiguous(), w.contiguous()
    T, K = pos.shape
    out = torch.empty(T, y.shape[1], dtype=y.dtype, device=y.device)
    if T:
        _combine_kernel[(T,)](y, pos, w, out, y.shape[1], K=K, BLOCK_H=_block_h(y.shape[1]))
    return out


def combine_backward_triton(g, y, pos, w):
    g, y = g.contiguous(), y.contiguous()
    T, K = pos.shape
    dy = torch.zeros_like(y)  # padding rows get no gradient
    dw = torch.empty(T, K, dtype=torch.float32, device=y.device)
    if T:
        _combine_bwd_kernel[(T,)](g, y, pos.contiguous(), w.contiguous(), dy, dw, y.shape[1], K=K,
                                  BLOCK_H=_block_h(y.shape[1]))
    return dy, dw.to(w.dtype)


# --------------------------------------------------------------------------- autograd
class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, pos, backend):
        ctx.save_for_backward(pos)
        ctx.backend, ctx.k = backend, pos.shape[1]
        return gather_rows_triton(x, src) if backend == "triton" else gather_rows_reference(x, src)

    @staticmethod
    def backward(ctx, g):
        (pos,) = ctx.saved_tensors
        ones = torch.ones(pos.shape, dtype=g.dtype, device=g.device)
        dx = combine_triton(g, pos, ones) if ctx.backend == "triton" else combine_reference(g, pos, ones)
        return dx, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, pos, w, backend):
        ctx.save_for_backward(y, pos, w)
        ctx.backend = backend
        return combine_triton(y, pos, w) if backend == "triton" else combine_reference(y, pos, w)

    @staticmethod
    def backward(ctx, g):
        y, pos, w = ctx.saved_tensors
        if ctx.backend == "triton":
            dy, dw = combine_backward_triton(g, y, pos, w)
        else:
            dy = torch.zeros_like(y)
            dy.index_put_((pos.reshape(-1),), (w.to(g.dtype)[..., None] * g[:, None, :]).reshape(-1, g.shape[1]))
            dw = torch.einsum("tkh,th->tk", y[pos].float(), g.float()).to(w.dtype)
        return dy, None, dw, None


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int = 1,
             backend: str = "auto") -> tuple[torch.Tensor, DispatchInfo]:
    """-> (x_sorted [N, H], info). Rows of a padded group beyond its tokens are zeros."""
    info = build_order(topk_ids, num_experts, align)
    b = resolve_backend(backend, x.device)
    return _Gather.apply(x, info.src_token, info.pos, b), info


def combine(y_sorted: torch.Tensor, info: DispatchInfo, topk_weights: torch.Tensor,
            backend: str = "auto") -> torch.Tensor:
    return _Combine.apply(y_sorted, info.pos, topk_weights, resolve_backend(backend, y_sorted.device))


def aot_specs(dtype: str = "bf16") -> list[tuple]:
    return [
        ("dispatch_gather", _gather_kernel, {"x_ptr": f"*{dtype}", "src_ptr": "*i64", "out_ptr": f"*{dtype}",
                                             "H": "i32", "BLOCK_H": "constexpr"}, {"BLOCK_H": 1024}, 4, 1),
        ("combine", _combine_kernel, {"y_ptr": f"*{dtype}", "pos_ptr": "*i64", "w_ptr": f"*{dtype}",
                                      "out_ptr": f"*{dtype}", "H": "i32", "K": "constexpr", "BLOCK_H": "constexpr"},
         {"K": 8, "BLOCK_H": 1024}, 4, 1),
        ("combine_backward", _combine_bwd_kernel, {"g_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "pos_ptr": "*i64",
                                                   "w_ptr": f"*{dtype}", "dy_ptr": f"*{dtype}", "dw_ptr": "*fp32",
                                                   "H": "i32", "K": "constexpr", "BLOCK_H": "constexpr"},
         {"K": 8, "BLOCK_H": 1024}, 4, 1),
    ]
