"""The expert matmul used by ``GroupedExperts``: one call site, backends chosen at run time.

``grouped_mm(x [N, K], w [G, K, M], offs [G])`` multiplies rows ``offs[g-1]:offs[g]`` of x by
``w[g]`` (the semantics of ``torch.nn.functional.grouped_mm``); rows past ``offs[-1]`` are zero.

Backends (``set_grouped_mm_backend``, from ``[kernels] grouped_mm``):
- ``loop``: one ``torch.mm`` per non-empty group. On this project's 2-core CPU it was as fast
  as ``F.grouped_mm`` at MoE shapes and it needs one host sync (the offsets) per call.
- ``torch``: ``torch.nn.functional.grouped_mm``.
- ``kernels``: ``kernels.grouped_gemm.grouped_mm`` (Triton on CUDA, its reference on CPU),
  registered as a custom op so compiled blocks keep a full graph.
- ``auto``: ``kernels`` when that module is available, else ``loop``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "loop", "torch", "kernels")
_BACKEND = "auto"


def set_grouped_mm_backend(name: str) -> None:
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"grouped_mm backend {name!r} unknown; choose one of {BACKENDS}")
    _BACKEND = name


def get_grouped_mm_backend() -> str:
    return _BACKEND


class _LoopGroupedMM(torch.autograd.Function):
    """One autograd node whatever the group sizes: the backward graph is then the same on every
    rank, which keeps the order of collectives identical across ranks under expert parallelism
    (a per-group Python graph that skips empty experts would not be)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ends = offs.tolist()
        out = x.new_zeros(x.shape[0], w.shape[-1])
        start = 0
        for g, end in enumerate(ends):
            if end > start:
                torch.mm(x[start:end], w[g], out=out[start:end])
            start = end
        ctx.save_for_backward(x, w)
        ctx.ends = ends
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None  # empty experts: exactly 0
        start = 0
        for g, end in enumerate(ctx.ends):
            if end > start:
                if dx is not None:
                    torch.mm(grad[start:end], w[g].t(), out=dx[start:end])
                if dw is not None:
                    dw[g] = x[start:end].t() @ grad[start:end]
            start = end
        return dx, dw, None


def loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _LoopGroupedMM.apply(x, w, offs)


def _torch_grouped_mm(x, w, offs):
    out = F.grouped_mm(x, w, offs=offs)
    n = int(offs[-1]) if offs.numel() else 0
    if n < x.shape[0]:  # rows past the last offset are left uninitialised by grouped_mm
        out = torch.cat([out[:n], out.new_zeros(x.shape[0] - n, out.shape[1])])
    return out


def _kernels_available() -> bool:
    try:
        import kernels.grouped_gemm  # noqa: F401
    except ImportError:
        return False
    return True


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    backend = _BACKEND
    if backend == "auto":
        backend = "kernels" if _kernels_available() else "loop"
    if backend == "loop":
        return loop_grouped_mm(x, w, offs)
    if backend == "torch":
        return _torch_grouped_mm(x, w, offs)
    from kernels.grouped_gemm import grouped_mm as kernel_grouped_mm

    return kernel_grouped_mm(x, w, offs)
