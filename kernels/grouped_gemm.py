"""Grouped GEMM for MoE experts: ``y[offs[g-1]:offs[g]] = x[offs[g-1]:offs[g]] @ w[g]``.

Semantics of ``torch.nn.functional.grouped_mm`` (x [N, K], w [G, K, M], offs [G] int32 cumulative
row ends), plus two guarantees the model relies on: rows past ``offs[-1]`` come out as zeros,
and a group with no rows gets an exactly-zero weight gradient.

Paths (``backend``):
- ``reference``: ``torch.nn.functional.grouped_mm`` (tail rows zeroed) when its layout rules
  allow, else one ``torch.mm`` per non-empty group. It is the CPU path; registered as a custom
  op, so it is one opaque node for ``torch.compile`` and one autograd node on every rank
  (under expert parallelism, identical backward graphs keep collectives in step).
- ``triton``: a persistent kernel. Programs walk the concatenated tile list of all groups
  (each group contributes ceil(rows/BM) x ceil(M/BN) tiles), so no host sync is needed to
  size the grid and empty groups cost nothing. fp32 accumulation on bf16/fp16/fp32 inputs. The
  backward reuses it for dx = dy @ w^T and uses a second kernel for dW[g] = x_g^T dy_g (one
  program per (group, K-tile, M-tile), looping over the group's rows).
"""

from __future__ import annotations

import os

import torch

from kernels.backend import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None


# --------------------------------------------------------------------------- reference
def _torch_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped_mm wants 16-byte-aligned strides and one of fp32/bf16/fp16."""
    return (x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[-1] * w.element_size()) % 16 == 0)


def _zero_tail(t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows past the last offset are left uninitialised by grouped_mm: zero them. (This is the
    CPU path, where reading offs[-1] costs nothing; usually there is no tail at all.)"""
    if not offs.numel():
        return torch.zeros_like(t)
    end = int(offs[-1])
    if end < t.shape[0]:
        t[end:] = 0
    return t


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.grouped_mm when its layout rules allow (measured faster than a loop
    of per-group matmuls on this project's CPU, at the debug and the 30B-A3B shapes:
    kernels/README.md), else one torch.mm per non-empty group."""
    if _torch_grouped_mm_ok(x, w):
        return _zero_tail(torch.nn.functional.grouped_mm(x, w, offs=offs), offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


def _is_transposed_layout(w: torch.Tensor) -> bool:
    """w [G, K, M] is the transpose of a contiguous [G, M, K] (how experts store weights)."""
    return w.stride(1) == 1 and w.stride(2) == w.shape[1] and w.stride(0) == w.shape[1] * w.shape[2]


def _like(dw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dW in w's memory layout (what the fake returns, and what the parameter's .grad wants:
    a mismatched layout costs autograd a copy of every expert weight gradient)."""
    if dw.stride() == torch.empty_like(w, device="meta").stride():
        return dw
    return torch.empty_like(w).copy_(dw)


def grouped_mm_backward_reference(grad, x, w, offs):
    grad = grad.contiguous()  # grouped_mm's backward rejects zero-stride gradients (from .sum())
    if _torch_grouped_mm_ok(x, w) and grad.dtype == x.dtype and (grad.shape[1] * grad.element_size()) % 16 == 0:
        grad = _zero_tail(grad, offs)
        dx = _zero_tail(torch.nn.functional.grouped_mm(grad, w.transpose(1, 2), offs=offs), offs)
        # dW[g] = x_g^T grad_g: the 2-D x 2-D form, groups along the reduction dimension.
        if _is_transposed_layout(w):  # the model passes weight.transpose(-2, -1): write dW^T
            dw = torch.nn.functional.grouped_mm(grad.t(), x, offs=offs).transpose(1, 2)
        else:
            dw = torch.nn.functional.grouped_mm(x.t(), grad, offs=offs)
        return dx, _like(dw.to(w.dtype), w)  # groups without rows get exactly zero (tested)
    dx = torch.zeros_like(x)
    dw = torch.zeros_like(w)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(grad[start:end], w[g].t(), out=dx[start:end])
            dw[g] = x[start:end].t() @ grad[start:end]
        start = end
    return dx, dw


# --------------------------------------------------------------------------- triton
if triton is not None:

    @triton.jit
    def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, offs_ptr, G, M, K,
                           sxn, sxk, swg, swk, swm, syn, sym,
                           NUM_PROGRAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tile_base = 0
        start = 0
        for g in range(G):
            end = tl.load(offs_ptr + g)
            n_tiles = tl.cdiv(end - start, BLOCK_N) * tiles_m
            first = tile_base + (pid - tile_base % NUM_PROGRAMS + NUM_PROGRAMS) % NUM_PROGRAMS
            for t in range(first, tile_base + n_tiles, NUM_PROGRAMS):
                local = t - tile_base
                rn = start + (local // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
                rm = (local % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(x_ptr + rn[:, None] * sxn + rk[None, :] * sxk,
                                mask=(rn[:, None] < end) & (rk[None, :] < K), other=0.0)
                    b = tl.load(w_ptr + g * swg + rk[:, None] * swk + rm[None, :] * swm,
                                mask=(rk[:, None] < K) & (rm[None, :] < M), other=0.0)
                    acc += tl.dot(a, b)
                tl.store(y_ptr + rn[:, None] * syn + rm[None, :] * sym, acc.to(y_ptr.dtype.element_ty),
                         mask=(rn[:, None] < end) & (rm[None, :] < M))
            tile_base += n_tiles
            start = end

    @triton.jit
    def _grouped_mm_dw_kernel(x_ptr, dy_ptr, dw_ptr, offs_ptr, M, K,
                              sxn, sxk, sdn, sdm, swg, swk, swm,
                              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        g = tl.program_id(0)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        end = tl.load(offs_ptr + g)
        start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            a = tl.load(x_ptr + rn[None, :] * sxn + rk[:, None] * sxk,
                        mask=(rn[None, :] < end) & (rk[:, None] < K), other=0.0)  # x_g^T tile [BK, BN]
            b = tl.load(dy_ptr + rn[:, None] * sdn + rm[None, :] * sdm,
                        mask=(rn[:, None] < end) & (rm[None, :] < M), other=0.0)
            acc += tl.dot(a, b)
        tl.store(dw_ptr + g * swg + rk[:, None] * swk + rm[None, :] * swm, acc.to(dw_ptr.dtype.element_ty),
                 mask=(rk[:, None] < K) & (rm[None, :] < M))


# Tile configurations. GPU: aimed at Qwen3-30B-A3B per-rank shapes (hidden 2048, expert
# intermediate 768, 16 local experts, thousands of routed rows): 128-row tiles fill an H100
# wgmma warpgroup; 768 = 6 x 128 columns. The interpreter runs a small tile to stay fast.
# Ordered by preference: the first spills no registers on sm_90 (see kernels/README.md for the
# registers/spills of each, read from the ahead-of-time compiled cubins).
GPU_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
]
DW_GPU_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=32, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=4),
]
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=16)


def _pick_config(M: int, K: int, configs) -> dict:
    """Largest tiles that do not exceed the problem (a static stand-in for autotuning, which
    needs a GPU to time candidates; `kernels/bench/bench_grouped_gemm.py` times them all)."""
    fits = [c for c in configs if c["BLOCK_M"] <= max(M, 16) and c["BLOCK_K"] <= max(K, 16)]
    return (fits or configs)[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    N, K = x.shape
    G, _, M = w.shape
    y = torch.zeros(N, M, dtype=x.dtype, device=x.device)
    cfg = dict(config or (INTERPRET_CONFIG if _interpreting() else _pick_config(M, K, GPU_CONFIGS)))
    programs = 4 if _interpreting() else torch.cuda.get_device_properties(x.device).multi_processor_count
    offs = offs.to(torch.int32)
    _grouped_mm_kernel[(programs,)](x, w, y, offs, G, M, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                    w.stride(2), y.stride(0), y.stride(1), NUM_PROGRAMS=programs, **cfg)
    return y


def grouped_mm_dw_triton(x, dy, offs, G, config: dict | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
    """dW [G, K, M]; written in ``like``'s memory layout when given (the kernel takes strides)."""
    K, M = x.shape[1], dy.shape[1]
    dw = torch.empty_like(like) if like is not None else torch.empty(G, K, M, dtype=x.dtype, device=x.device)
    cfg = dict(config or (INTERPRET_CONFIG if _interpreting() else DW_GPU_CONFIGS[0]))
    grid = (G, triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(M, cfg["BLOCK_M"]))
    _grouped_mm_dw_kernel[grid](x, dy, dw, offs.to(torch.int32), M, K, x.stride(0), x.stride(1), dy.stride(0),
                                dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2), **cfg)
    return dw


# --------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("rnd1_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return grouped_mm_triton(x, w, offs)
    return grouped_mm_reference(x, w, offs)


@_grouped_mm_op.register_fake
def _(x, w, offs, backend):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("rnd1_kernels::grouped_mm_backward", mutates_args=())
def _grouped_mm_bwd_op(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        grad = grad.contiguous()
        dx = grouped_mm_triton(grad, w.transpose(1, 2), offs)
        return dx, grouped_mm_dw_triton(x, grad, offs, w.shape[0], like=w)
    return grouped_mm_backward_reference(grad, x, w, offs)


@_grouped_mm_bwd_op.register_fake
def _(grad, x, w, offs, backend):
    return torch.empty_like(x), torch.empty_like(w)


def _setup(ctx, inputs, output):
    x, w, offs, backend = inputs
    ctx.save_for_backward(x, w, offs)
    ctx.backend = backend


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    dx, dw = _grouped_mm_bwd_op(grad, x, w, offs, ctx.backend)
    return dx, dw, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y = grouped x @ w[g] over row groups ending at ``offs``; differentiable in x and w."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or offs.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: expected x [N, K], w [G, K, M], offs [G]; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(offs.shape)}")
    return _grouped_mm_op(x, w, offs, resolve_backend(backend, x.device))


# --------------------------------------------------------------------------- ahead-of-time compile specs
def aot_specs(dtype: str = "bf16") -> list[tuple]:
    """(name, kernel, signature, constexprs, num_warps, num_stages) for every kernel/config."""
    sig = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "offs_ptr": "*i32", "G": "i32",
           "M": "i32", "K": "i32", "sxn": "i32", "sxk": "i32", "swg": "i32", "swk": "i32", "swm": "i32",
           "syn": "i32", "sym": "i32"}
    dw_sig = {"x_ptr": f"*{dtype}", "dy_ptr": f"*{dtype}", "dw_ptr": f"*{dtype}", "offs_ptr": "*i32", "M": "i32",
              "K": "i32", "sxn": "i32", "sxk": "i32", "sdn": "i32", "sdm": "i32", "swg": "i32", "swk": "i32",
              "swm": "i32"}
    out = []
    for c in GPU_CONFIGS:
        ce = {"NUM_PROGRAMS": 132, **{k: v for k, v in c.items() if k.startswith("BLOCK")}}
        out.append((f"grouped_mm_fwd_{c['BLOCK_N']}x{c['BLOCK_M']}x{c['BLOCK_K']}", _grouped_mm_kernel,
                    {**sig, **{k: "constexpr" for k in ce}}, ce, c["num_warps"], c["num_stages"]))
    for c in DW_GPU_CONFIGS:
        ce = {k: v for k, v in c.items() if k.startswith("BLOCK")}
        out.append((f"grouped_mm_dw_{c['BLOCK_N']}x{c['BLOCK_M']}x{c['BLOCK_K']}", _grouped_mm_dw_kernel,
                    {**dw_sig, **{k: "constexpr" for k in ce}}, ce, c["num_warps"], c["num_stages"]))
    return out
