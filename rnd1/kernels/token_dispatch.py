"""Token dispatch and combine for MoE layers.

``dispatch(x [T, H], topk_ids [T, k], num_experts, align)`` builds the expert-sorted order of the
T*k (token, slot) pairs with a stable sort, counts rows per expert, optionally pads each expert's
group to a multiple of ``align`` (the grouped GEMM's tile alignment), and gathers the rows in
one pass. ``combine(y_sorted, info, topk_weights)`` returns out[t] = sum_j w[t, j] *
y_sorted[pos(t, j)]: each output row sums its own k contributions, so no atomics are needed.

No Python loop over experts and no host sync: with ``align == 1`` the output has exactly T*k
rows; with padding it has the static bound T*k + E*(align-1) rows (the tail past ``offs[-1]``
is zeros), so no ``.item()`` sizes it. gather / combine / combine-backward are ``torch.library``
custom ops (``rnd1_kernels::dispatch_*``) with fake implementations, so compiled graphs hold.

Backward: dispatch's gradient is combine with unit weights (each token collects the gradient
of its k copies); combine's gradients are a gather (d y_sorted[pos(t, j)] = w[t, j] * g[t])
and a row dot product (d w[t, j] = <y_sorted[pos(t, j)], g[t]>).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnd1.kernels.backend import resolve_backend
from rnd1.kernels.interpreter_compat import patch_if_interpreting

try:
    import triton
    import triton.language as tl

    patch_if_interpreting()  # Triton <= 3.6's interpreter under NumPy >= 2.4 (interpreter_compat.py)
    from rnd1.kernels.offsets import row_offset
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
    """The expert-sorted order of the T*k (token, slot) pairs. No host sync and no data-dependent
    shape, so it traces into a compiled graph: with ``align > 1`` the output is sized for the worst
    case, T*k + E*(align-1) rows; rows past ``offs[-1]`` are padding (``src_token`` -1)."""
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
        n_rows = T * k + num_experts * (align - 1)  # static bound on ends[-1]: no .item()
    else:
        ends = torch.cumsum(counts, 0)
        dest = torch.arange(T * k, device=flat.device)
        n_rows = T * k
    pos = torch.empty(T * k, dtype=torch.int64, device=flat.device).scatter_(0, order, dest)
    src = torch.full((n_rows,), -1, dtype=torch.int64, device=flat.device).scatter_(0, dest, order // k)
    return DispatchInfo(src, pos.view(T, k), counts, ends.to(torch.int32), n_rows)


# --------------------------------------------------------------------------- reference
def gather_rows_reference(x, src):
    """out[r] = x[src[r]], zeros where src[r] < 0 (a select, not boolean indexing: no
    data-dependent shape)."""
    valid = (src >= 0).unsqueeze(1)
    return torch.where(valid, x.index_select(0, src.clamp(min=0)), x.new_zeros(()))


def combine_reference(y, pos, w):
    """out[t] = sum_j w[t, j] * y[pos[t, j]]."""
    return torch.einsum("tkh,tk->th", y[pos], w.to(y.dtype))


def combine_backward_reference(g, y, pos, w):
    """(d y, d w) of ``combine_reference``; rows no (token, slot) points at get zero gradient."""
    dy = torch.zeros_like(y)
    dy.index_put_((pos.reshape(-1),), (w.to(g.dtype)[..., None] * g[:, None, :]).reshape(-1, g.shape[1]))
    dw = torch.einsum("tkh,th->tk", y[pos].float(), g.float()).to(w.dtype)
    return dy, dw


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
            v = tl.load(x_ptr + row_offset(safe, H) + cols, mask=cols < H, other=0.0)
            tl.store(out_ptr + row_offset(row, H) + cols, tl.where(valid, v, tl.zeros_like(v)), mask=cols < H)

    @triton.jit
    def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for j in range(K):
                p = tl.load(pos_ptr + row_offset(t, K) + j)
                wt = tl.load(w_ptr + row_offset(t, K) + j).to(tl.float32)
                acc += wt * tl.load(y_ptr + row_offset(p, H) + cols, mask=cols < H, other=0.0).to(tl.float32)
            tl.store(out_ptr + row_offset(t, H) + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)

    @triton.jit
    def _combine_bwd_kernel(g_ptr, y_ptr, pos_ptr, w_ptr, dy_ptr, dw_ptr, H, K: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        for j in range(K):
            p = tl.load(pos_ptr + row_offset(t, K) + j)
            wt = tl.load(w_ptr + row_offset(t, K) + j).to(tl.float32)
            dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                g = tl.load(g_ptr + row_offset(t, H) + cols, mask=cols < H, other=0.0).to(tl.float32)
                yv = tl.load(y_ptr + row_offset(p, H) + cols, mask=cols < H, other=0.0).to(tl.float32)
                tl.store(dy_ptr + row_offset(p, H) + cols, (wt * g).to(dy_ptr.dtype.element_ty), mask=cols < H)
                dot += g * yv
            tl.store(dw_ptr + row_offset(t, K) + j, tl.sum(dot, axis=0))


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


# --------------------------------------------------------------------------- custom ops + autograd
# Custom ops with fake implementations, like grouped_gemm's: a compiled block that dispatches
# (the model's LocalDispatcher is traced into its block's graph) sees each op as one opaque node
# with a known output shape, so ``fullgraph=True`` holds whichever backend runs inside.
@torch.library.custom_op("rnd1_kernels::dispatch_gather", mutates_args=())
def _gather_op(x: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, backend: str) -> torch.Tensor:
    return gather_rows_triton(x, src) if backend == "triton" else gather_rows_reference(x, src)


@_gather_op.register_fake
def _(x, src, pos, backend):
    return x.new_empty(src.shape[0], x.shape[1])


@torch.library.custom_op("rnd1_kernels::dispatch_combine", mutates_args=())
def _combine_op(y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, backend: str) -> torch.Tensor:
    return combine_triton(y, pos, w) if backend == "triton" else combine_reference(y, pos, w)


@_combine_op.register_fake
def _(y, pos, w, backend):
    return y.new_empty(pos.shape[0], y.shape[1])


@torch.library.custom_op("rnd1_kernels::dispatch_combine_backward", mutates_args=())
def _combine_bwd_op(g: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return combine_backward_triton(g, y, pos, w)
    return combine_backward_reference(g, y, pos, w)


@_combine_bwd_op.register_fake
def _(g, y, pos, w, backend):
    return torch.empty_like(y), torch.empty_like(w)


def _gather_setup(ctx, inputs, output):
    x, src, pos, backend = inputs
    ctx.save_for_backward(pos)
    ctx.backend = backend


def _gather_backward(ctx, g):
    # each source row collects the gradient of every row gathered from it: combine, unit weights
    (pos,) = ctx.saved_tensors
    ones = torch.ones(pos.shape, dtype=g.dtype, device=g.device)
    return _combine_op(g, pos, ones, ctx.backend), None, None, None


def _combine_setup(ctx, inputs, output):
    y, pos, w, backend = inputs
    ctx.save_for_backward(y, pos, w)
    ctx.backend = backend


def _combine_backward(ctx, g):
    y, pos, w = ctx.saved_tensors
    dy, dw = _combine_bwd_op(g, y, pos, w, ctx.backend)
    return dy, None, dw, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def gather_rows(x: torch.Tensor, src: torch.Tensor, pos: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """out[r] = x[src[r]] (zeros where src[r] is -1), differentiable in x. ``pos`` [len(x), j] is
    the inverse map: the out rows each x row went to (each exactly once over all x rows), which
    the backward sums. A permutation ``perm`` has ``pos = argsort(perm)[:, None]``."""
    return _gather_op(x, src, pos, resolve_backend(backend, x.device))


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: int = 1,
             backend: str = "auto") -> tuple[torch.Tensor, DispatchInfo]:
    """-> (x_sorted [N, H], info). Rows of a padded group beyond its tokens are zeros. No host
    sync, no data-dependent shape: traceable with ``torch.compile(fullgraph=True)``."""
    info = build_order(topk_ids, num_experts, align)
    return gather_rows(x, info.src_token, info.pos, backend), info


def combine_rows(y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y[pos[t, j]], differentiable in y and w."""
    return _combine_op(y, pos, w, resolve_backend(backend, y.device))


def combine(y_sorted: torch.Tensor, info: DispatchInfo, topk_weights: torch.Tensor,
            backend: str = "auto") -> torch.Tensor:
    return combine_rows(y_sorted, info.pos, topk_weights, backend)


def aot_specs(dtype: str = "bf16") -> list[tuple]:
    """The three kernels at 30B-A3B per-rank shapes (4,096 tokens x top-8 = 32,768 rows, hidden
    2048), with sample arguments so rnd1/kernels/aot.py compiles them as the JIT specialises a
    launch (aligned pointers, ints divisible by 16), not from bare pointer types."""
    from rnd1.kernels.aot import DTYPES, SampleTensor

    dt = DTYPES[dtype]
    T, k, H = 4096, 8, 2048
    x, rows = SampleTensor(dt, (T, H)), SampleTensor(dt, (T * k, H))
    idx, pos, w = SampleTensor(torch.int64, (T * k,)), SampleTensor(torch.int64, (T, k)), SampleTensor(dt, (T, k))
    block = {"BLOCK_H": 1024}
    return [
        ("dispatch_gather", _gather_kernel, dict(x_ptr=x, src_ptr=idx, out_ptr=rows, H=H), block, 4, 1),
        ("combine", _combine_kernel, dict(y_ptr=rows, pos_ptr=pos, w_ptr=w, out_ptr=x, H=H), {"K": k, **block}, 4, 1),
        ("combine_backward", _combine_bwd_kernel,
         dict(g_ptr=x, y_ptr=rows, pos_ptr=pos, w_ptr=w, dy_ptr=rows, dw_ptr=SampleTensor(torch.float32, (T, k)), H=H),
         {"K": k, **block}, 4, 1),
    ]
