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

from rnd1.kernels.backend import autocast_operands, dot_precision, op_impl, resolve_backend
from rnd1.kernels.interpreter_compat import patch_if_interpreting

try:
    import triton
    import triton.language as tl

    patch_if_interpreting()  # Triton <= 3.6's interpreter under NumPy >= 2.4 (interpreter_compat.py)
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None


# --------------------------------------------------------------------------- reference
def _torch_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped_mm wants 16-byte-aligned strides and one of fp32/bf16/fp16."""
    return (x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[-1] * w.element_size()) % 16 == 0)


def _zero_tail(t: torch.Tensor, offs: torch.Tensor, on_host: bool | None = None) -> torch.Tensor:
    """Rows past the last offset are left uninitialised by grouped_mm: zero them. On the CPU the
    end row is read on the host (free; usually there is no tail at all). Elsewhere the rows are
    masked on the device: reading ``offs[-1]`` there would stop the host until the GPU catches up,
    nine times per MoE layer (three grouped GEMMs forward, six backward)."""
    if not offs.numel():
        return torch.zeros_like(t)
    if not (t.device.type == "cpu" if on_host is None else on_host):
        rows = torch.arange(t.shape[0], device=t.device)
        return t.masked_fill_((rows >= offs[-1]).unsqueeze(1), 0)
    end = int(offs[-1])
    if end < t.shape[0]:
        t[end:] = 0
    return t


IMPLS = ("grouped", "loop", "triton")  # what the op runs; "reference" means grouped where allowed


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
    """torch.nn.functional.grouped_mm when its layout rules allow (``impl="grouped"``; measured
    faster than a loop of per-group matmuls on this project's first CPU, at the debug and the
    30B-A3B shapes: rnd1/kernels/README.md), else (or with ``impl="loop"``) one torch.mm per
    non-empty group. The backend ``auto`` picks between them by measuring (``rnd1.kernels.autotune``)."""
    if impl == "grouped" and _torch_grouped_mm_ok(x, w):
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


def grouped_mm_backward_reference(grad, x, w, offs, impl: str = "grouped"):
    grad = grad.contiguous()  # grouped_mm's backward rejects zero-stride gradients (from .sum())
    if impl == "grouped" and _torch_grouped_mm_ok(x, w) and grad.dtype == x.dtype \
            and (grad.shape[1] * grad.element_size()) % 16 == 0:
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
    def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, offs_ptr, G, N, M, K,
                           sxn, sxk, swg, swk, swm, syn, sym,
                           NUM_PROGRAMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, PRECISION: tl.constexpr = "ieee"):
        # Element offsets are int64: rows x stride passes 2^31 at 30B-A3B-sized activations.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tile_base = 0
        start = 0
        for g in range(G):
            end = tl.load(offs_ptr + g)
            n_tiles = tl.cdiv(end - start, BLOCK_N) * tiles_m
            first = tile_base + (pid - tile_base % NUM_PROGRAMS + NUM_PROGRAMS) % NUM_PROGRAMS
            w_g = w_ptr + tl.cast(g, tl.int64) * swg
            for t in range(first, tile_base + n_tiles, NUM_PROGRAMS):
                local = t - tile_base
                rn = start + (local // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
                rm = (local % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
                rn64 = rn.to(tl.int64)
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(x_ptr + rn64[:, None] * sxn + rk[None, :] * sxk,
                                mask=(rn[:, None] < end) & (rk[None, :] < K), other=0.0)
                    b = tl.load(w_g + rk[:, None] * swk + rm[None, :] * swm,
                                mask=(rk[:, None] < K) & (rm[None, :] < M), other=0.0)
                    acc += tl.dot(a, b, input_precision=PRECISION)  # fp32: IEEE unless torch allows TF32
                tl.store(y_ptr + rn64[:, None] * syn + rm[None, :] * sym, acc.to(y_ptr.dtype.element_ty),
                         mask=(rn[:, None] < end) & (rm[None, :] < M))
            tile_base += n_tiles
            start = end
        # Rows past offs[-1] get zeros here (y is allocated uninitialised): only the tail is
        # written, and the host never reads offs.
        n_tiles = tl.cdiv(tl.maximum(N - start, 0), BLOCK_N) * tiles_m
        first = tile_base + (pid - tile_base % NUM_PROGRAMS + NUM_PROGRAMS) % NUM_PROGRAMS
        for t in range(first, tile_base + n_tiles, NUM_PROGRAMS):
            local = t - tile_base
            rn = start + (local // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
            rm = (local % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
            zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=y_ptr.dtype.element_ty)
            tl.store(y_ptr + rn.to(tl.int64)[:, None] * syn + rm[None, :] * sym, zero,
                     mask=(rn[:, None] < N) & (rm[None, :] < M))

    @triton.jit
    def _grouped_mm_dw_kernel(x_ptr, dy_ptr, dw_ptr, offs_ptr, M, K,
                              sxn, sxk, sdn, sdm, swg, swk, swm,
                              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                              PRECISION: tl.constexpr = "ieee"):
        g = tl.program_id(0)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        end = tl.load(offs_ptr + g)
        start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            rn64 = rn.to(tl.int64)
            a = tl.load(x_ptr + rn64[None, :] * sxn + rk[:, None] * sxk,
                        mask=(rn[None, :] < end) & (rk[:, None] < K), other=0.0)  # x_g^T tile [BK, BN]
            b = tl.load(dy_ptr + rn64[:, None] * sdn + rm[None, :] * sdm,
                        mask=(rn[:, None] < end) & (rm[None, :] < M), other=0.0)
            acc += tl.dot(a, b, input_precision=PRECISION)
        tl.store(dw_ptr + tl.cast(g, tl.int64) * swg + rk[:, None] * swk + rm[None, :] * swm,
                 acc.to(dw_ptr.dtype.element_ty), mask=(rk[:, None] < K) & (rm[None, :] < M))


# Tile configurations, from the JIT-specialised ahead-of-time report (`python -m rnd1.kernels.aot`,
# rnd1/kernels/README.md) at Qwen3-30B-A3B per-rank shapes: every candidate below compiles for sm_90
# with no spills, a multi-stage cp.async pipeline, wgmma, and shared memory under the 227 KiB a
# Hopper block may use. (128x256x64 with 4 warps spills; 128x128x128 with 4 stages needs 256 KiB.)
GPU_CONFIGS = [
    dict(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=4),  # many rows per group
    dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=4,  # few rows per group
         dtypes=("bfloat16", "float16")),  # in fp32 (IEEE, FMA path) it spills 8-87 stores
    # spills in the M-contiguous (dx) layout: 17 spill stores on sm_90, 24 on sm_100 (issue 27's audit)
    dict(BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, num_warps=8, num_stages=3, layouts=("k",)),
    dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=128, num_warps=8, num_stages=3),
    # fp32 operands (autocast off): IEEE dots on the FMA path want small K tiles; these three
    # compile for sm_90 without spills in both layouts (tests/kernels/test_aot_compile.py), using
    # 32-48 KiB of shared memory where the 16-bit tiles above would need 262-295 KB in fp32
    dict(BLOCK_N=128, BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3, dtypes=("float32",)),
    dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=32, num_warps=8, num_stages=3, dtypes=("float32",)),
    dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=3, dtypes=("float32",)),
]
DW_GPU_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_M=128, BLOCK_K=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=32, BLOCK_M=128, BLOCK_K=64, num_warps=4, num_stages=4),
]
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=16)


def config_name(kind: str, c: dict) -> str:
    return f"grouped_mm_{kind}_{c['BLOCK_N']}x{c['BLOCK_M']}x{c['BLOCK_K']}_w{c['num_warps']}s{c['num_stages']}"


# Largest dynamic shared memory one block may opt into on H100 and B200 (227 KiB); on a CUDA
# device its own figure is read (``shared_memory_limit``).
SHARED_MEMORY_LIMIT = 232448
LAYOUTS = ("k", "m")  # which dim of w [G, K, M] has unit stride: K (forward: the stored weight
#                       transposed) or M (dx: the forward's w transposed back)


def shape_key(N: int, G: int, K: int, M: int) -> tuple:
    """Bucket of a problem: mean rows per group rounded up to a power of two (capped at 1024),
    and K, M themselves (fixed per model projection)."""
    rows = max(1, -(-N // max(G, 1)))
    return (min(1 << (rows - 1).bit_length(), 1024), K, M)


def weight_layout(w: torch.Tensor) -> str:
    return "k" if w.stride(1) == 1 else "m"


def tile_key(kind: str, N: int, G: int, K: int, M: int, dtype: torch.dtype, layout: str) -> tuple:
    """What a tile choice depends on: the kernel, the shape bucket, the operand dtype (fp32 tiles
    need twice the shared memory of bf16 ones) and the weight layout (the same K, M in the two
    layouts are different problems: the down projection's forward and gate/up's dx share K, M,
    and a tile that is fine in one spills in the other)."""
    return (kind, *shape_key(N, G, K, M), str(dtype).removeprefix("torch."), layout)


def shared_bytes(kind: str, c: dict, itemsize: int) -> int:
    """Shared memory of a config's software pipeline: one A and one B tile per stage (forward:
    [BN, BK] and [BK, BM]; dW: [BK, BN] and [BN, BM])."""
    inner = c["BLOCK_K"] if kind == "fwd" else c["BLOCK_N"]
    return c["num_stages"] * (c["BLOCK_N"] * c["BLOCK_K"] + inner * c["BLOCK_M"]) * itemsize


def shared_memory_limit(device=None) -> int:
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", SHARED_MEMORY_LIMIT))
    return SHARED_MEMORY_LIMIT


def candidates(key: tuple, limit: int = SHARED_MEMORY_LIMIT) -> tuple[list[dict], dict[str, str]]:
    """The configs that can run ``key`` (a ``tile_key``), and why each other one cannot: its
    shared memory at this dtype exceeds ``limit``, it spills in this layout (``layouts``), or it
    is made for other dtypes (``dtypes``)."""
    kind, _rows, _K, _M, dtype, layout = key
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    ok, skipped = [], {}
    for c in (GPU_CONFIGS if kind == "fwd" else DW_GPU_CONFIGS):
        name = config_name(kind, c)
        need = shared_bytes(kind, c, itemsize)
        if need > limit:
            skipped[name] = f"needs {need:,} B of shared memory in {dtype}, the limit is {limit:,}"
        elif layout not in c.get("layouts", LAYOUTS):
            skipped[name] = f"spills in the {layout}-contiguous weight layout"
        elif dtype not in c.get("dtypes", (dtype,)):
            skipped[name] = f"made for {'/'.join(c['dtypes'])}, not {dtype}"
        else:
            ok.append(c)
    return ok, skipped


def _pick_config(key: tuple, configs) -> dict:
    """Deterministic choice by shape bucket (``shape_key``): the first candidate (in preference
    order) whose row tile is no taller than the mean rows per group (or is the shortest there is),
    and whose column and K tiles do not exceed M and K when a candidate that fits exists."""
    rows, K, M = key
    fits = [c for c in configs if c["BLOCK_M"] <= max(M, 16) and c["BLOCK_K"] <= max(K, 16)] or list(configs)
    shortest = min(c["BLOCK_N"] for c in fits)
    return next(c for c in fits if c["BLOCK_N"] <= max(rows, shortest))


# Tile choices measured at start-up (``tile_problems`` + ``rnd1.kernels.autotune``: rank 0 times,
# every rank takes its answer), by ``tile_key``. Nothing is timed during training: a key not
# measured gets the deterministic pick, the same on every rank.
_TUNED: dict[tuple, dict] = {}


def set_tuned_tile(key: tuple, name: str | None) -> None:
    """Record the measured config (by ``config_name``) for ``key``; None forgets it."""
    if name is None:
        _TUNED.pop(key, None)
        return
    configs = GPU_CONFIGS if key[0] == "fwd" else DW_GPU_CONFIGS
    _TUNED[key] = next(c for c in configs if config_name(key[0], c) == name)


def _choose(key: tuple, device=None) -> dict:
    """The config for this problem: the measured one, else the deterministic pick among those
    that fit (an fp32 problem never gets a tile that needs more shared memory than a block has)."""
    tuned = _TUNED.get(key)
    if tuned is not None:
        return tuned
    ok, skipped = candidates(key, shared_memory_limit(device))
    if not ok:
        raise RuntimeError(f"grouped_mm: no tile config fits {key}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return _pick_config(key[1:4], ok)


def tile_problems(rows: int, experts: int, hidden: int, inter: int, dtype: torch.dtype) -> list[tuple]:
    """Every grouped GEMM one SwiGLU expert layer runs, as ``tile_key``s: forward of gate/up
    (K = hidden, M = inter) and down (K = inter, M = hidden) with K-contiguous weights, their dx
    with M-contiguous weights, and the dW kernels."""
    return [tile_key("fwd", rows, experts, hidden, inter, dtype, "k"),
            tile_key("fwd", rows, experts, inter, hidden, dtype, "k"),
            tile_key("fwd", rows, experts, inter, hidden, dtype, "m"),  # gate/up dx
            tile_key("fwd", rows, experts, hidden, inter, dtype, "m"),  # down dx
            tile_key("dw", rows, experts, hidden, inter, dtype, "k"),
            tile_key("dw", rows, experts, inter, hidden, dtype, "k")]


def tile_candidates(key: tuple, rows: int, experts: int, device="cuda", seed: int = 0) -> dict:
    """{config name: a call running that config on ``key``'s problem}: what the start-up tuner
    times. A config that cannot fit raises ``CannotRun`` with the reason, and one that still fails
    to launch raises ``OutOfResources``: ``rnd1.kernels.autotune.measure`` drops both, and the
    run's log line names them with their reasons."""
    kind, _bucket, K, M, dtype, layout = key
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, K, generator=g) * 0.1).to(device, dt)
    stored = (torch.randn(experts, M, K, generator=g) * 0.02).to(device, dt)  # [G, M, K]
    w = stored.transpose(1, 2) if layout == "k" else stored.reshape(experts, K, M)
    offs = torch.linspace(0, rows, experts + 1)[1:].round().to(torch.int32).to(device)
    dy = (torch.randn(rows, M, generator=g) * 0.1).to(device, dt)
    from rnd1.kernels.autotune import CannotRun

    ok, skipped = candidates(key, shared_memory_limit(device))

    def cannot(why):
        def run():
            raise CannotRun(why)
        return run

    if kind == "fwd":
        runs = {config_name(kind, c): (lambda c=c: grouped_mm_triton(x, w, offs, config=c)) for c in ok}
    else:
        runs = {config_name(kind, c): (lambda c=c: grouped_mm_dw_triton(x, dy, offs, experts, config=c, like=w))
                for c in ok}
    return {**runs, **{name: cannot(why) for name, why in skipped.items()}}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    N, K = x.shape
    G, _, M = w.shape
    y = torch.empty(N, M, dtype=x.dtype, device=x.device)  # the kernel writes every row, tail included
    programs = 4 if _interpreting() else torch.cuda.get_device_properties(x.device).multi_processor_count
    offs = offs.to(torch.int32)
    if config is None:
        config = (INTERPRET_CONFIG if _interpreting()
                  else _choose(tile_key("fwd", N, G, K, M, x.dtype, weight_layout(w)), x.device))
    _grouped_mm_kernel[(programs,)](x, w, y, offs, G, N, M, K, x.stride(0), x.stride(1), w.stride(0),
                                    w.stride(1), w.stride(2), y.stride(0), y.stride(1), NUM_PROGRAMS=programs,
                                    PRECISION=dot_precision(x.dtype), **_launch(config))
    return y


def grouped_mm_dw_triton(x, dy, offs, G, config: dict | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
    """dW [G, K, M]; written in ``like``'s memory layout when given (the kernel takes strides)."""
    K, M = x.shape[1], dy.shape[1]
    dw = torch.empty_like(like) if like is not None else torch.empty(G, K, M, dtype=x.dtype, device=x.device)
    offs = offs.to(torch.int32)
    if config is None:
        config = (INTERPRET_CONFIG if _interpreting()
                  else _choose(tile_key("dw", x.shape[0], G, K, M, x.dtype, weight_layout(dw)), x.device))
    grid = (G, triton.cdiv(K, config["BLOCK_K"]), triton.cdiv(M, config["BLOCK_M"]))
    _grouped_mm_dw_kernel[grid](x, dy, dw, offs, M, K, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                                dw.stride(0), dw.stride(1), dw.stride(2), PRECISION=dot_precision(x.dtype),
                                **_launch(config))
    return dw


def _launch(config: dict) -> dict:
    """A config's launch arguments (its ``layouts`` and ``dtypes`` notes are for the chooser)."""
    return {k: v for k, v in config.items() if k not in ("layouts", "dtypes")}


# --------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("rnd1_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return grouped_mm_triton(x, w, offs)
    return grouped_mm_reference(x, w, offs, "loop" if backend == "loop" else "grouped")


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
    return grouped_mm_backward_reference(grad, x, w, offs, "loop" if backend == "loop" else "grouped")


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
    impl = _implementation(backend, x.device)
    if impl == "triton":
        x, w = autocast_operands(x, w)
    return _grouped_mm_op(x, w, offs, impl)


def _implementation(backend: str, device) -> str:
    """The op's argument: ``triton``, ``reference`` (grouped where allowed), or ``loop``. An
    ``auto`` backend with a measured choice (``rnd1.kernels.backend.op_impl``) takes that choice."""
    if backend == "auto":
        chosen = op_impl("grouped_mm")
        if chosen is not None and (chosen != "triton" or torch.device(device).type == "cuda"):
            return {"grouped": "reference"}.get(chosen, chosen)
    return resolve_backend(backend, device)


def tuning_candidates(tokens: int, experts: int, hidden: int, inter: int, *, dtype=torch.float32,
                      device="cpu", seed: int = 0) -> dict:
    """Closures running one SwiGLU expert layer (gate, up, down; forward + backward) at these
    shapes with each implementation available here: what ``auto`` measures before choosing.
    Rows are spread evenly over the experts (what a balanced router sends)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 0.1).to(device, dtype).requires_grad_()
    ws = [(torch.randn(experts, o, i, generator=g) * 0.02).to(device, dtype).requires_grad_()
          for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
    offs = torch.linspace(0, tokens, experts + 1)[1:].round().to(torch.int32).to(device)
    impls = ["grouped", "loop"] + (["triton"] if torch.device(device).type == "cuda" and triton else [])

    def layer(impl):
        def run():
            gate = _grouped_mm_op(x, ws[0].transpose(-2, -1), offs, {"grouped": "reference"}.get(impl, impl))
            up = _grouped_mm_op(x, ws[1].transpose(-2, -1), offs, {"grouped": "reference"}.get(impl, impl))
            h = torch.nn.functional.silu(gate) * up
            out = _grouped_mm_op(h, ws[2].transpose(-2, -1), offs, {"grouped": "reference"}.get(impl, impl))
            out.sum().backward()
            for t in (x, *ws):
                t.grad = None
        return run

    return {impl: layer(impl) for impl in impls}


# --------------------------------------------------------------------------- ahead-of-time compile specs
# Qwen3-30B-A3B per rank at EP 8: 16 local experts, hidden 2048 -> expert intermediate 768,
# 32,768 routed rows (what one EP rank receives per layer at the shipped micro-batch 1 x 4096 tokens x top-8,
# balanced routing). Weights are the model's
# [E, out, in] parameters passed transposed, so w [G, K, M] has unit stride along K.
AOT_SHAPE = dict(G=16, N=32768, K=2048, M=768, programs=132)


def aot_specs(dtype: str = "bf16") -> list[tuple]:
    """(name, kernel, sample args, constexprs, num_warps, num_stages) for every kernel/config;
    rnd1/kernels/aot.py derives the JIT's specialisation from the sample args."""
    from rnd1.kernels.aot import DTYPES, SampleTensor

    dt = DTYPES[dtype]
    G, N, K, M = (AOT_SHAPE[k] for k in "GNKM")
    x = SampleTensor(dt, (N, K))
    y = SampleTensor(dt, (N, M))
    w_t = SampleTensor(dt, (G, M, K))  # stored [G, out, in]; the kernel sees its transpose
    offs = SampleTensor(torch.int32, (G,))
    fwd = dict(x_ptr=x, w_ptr=w_t, y_ptr=y, offs_ptr=offs, G=G, N=N, M=M, K=K, sxn=x.stride(0), sxk=x.stride(1),
               swg=w_t.stride(0), swk=w_t.stride(2), swm=w_t.stride(1), syn=y.stride(0), sym=y.stride(1))
    dw = dict(x_ptr=x, dy_ptr=y, dw_ptr=w_t, offs_ptr=offs, M=M, K=K, sxn=x.stride(0), sxk=x.stride(1),
              sdn=y.stride(0), sdm=y.stride(1), swg=w_t.stride(0), swk=w_t.stride(2), swm=w_t.stride(1))
    out = []
    for c in candidates(tile_key("fwd", N, G, K, M, dt, "k"))[0]:
        ce = {"NUM_PROGRAMS": AOT_SHAPE["programs"], **{k: v for k, v in c.items() if k.startswith("BLOCK")},
              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        out.append((config_name("fwd", c), _grouped_mm_kernel, fwd, ce, c["num_warps"], c["num_stages"]))
    # dx: the forward kernel on a weight as stored, M-contiguous: the down projection's dx
    # (grad [N, 2048] times down.weight [G, 2048, 768]) at the same K, M
    w_m = SampleTensor(dt, (G, K, M))
    dx = dict(x_ptr=x, w_ptr=w_m, y_ptr=y, offs_ptr=offs, G=G, N=N, M=M, K=K, sxn=x.stride(0), sxk=x.stride(1),
              swg=w_m.stride(0), swk=w_m.stride(1), swm=w_m.stride(2), syn=y.stride(0), sym=y.stride(1))
    for c in candidates(tile_key("fwd", N, G, K, M, dt, "m"))[0]:
        ce = {"NUM_PROGRAMS": AOT_SHAPE["programs"], **{k: v for k, v in c.items() if k.startswith("BLOCK")},
              "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        out.append((config_name("fwd", c).replace("_fwd_", "_dx_"), _grouped_mm_kernel, dx, ce, c["num_warps"],
                    c["num_stages"]))
    for c in DW_GPU_CONFIGS:
        ce = {**{k: v for k, v in c.items() if k.startswith("BLOCK")}, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        out.append((config_name("dw", c), _grouped_mm_dw_kernel, dw, ce, c["num_warps"], c["num_stages"]))
    return out
