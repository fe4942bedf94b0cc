"""The expert matmul used by ``GroupedExperts``: one call site, backends chosen at run time.

``grouped_mm(x [N, K], w [G, K, M], offs [G])`` multiplies rows ``offs[g-1]:offs[g]`` of x by
``w[g]`` (the semantics of ``torch.nn.functional.grouped_mm``); rows past ``offs[-1]`` are zero.

Backends (``set_grouped_mm_backend``, from ``[kernels] grouped_mm``):
- ``loop``: one ``torch.mm`` per non-empty group. On this project's 2-core CPU it was as fast
  as ``F.grouped_mm`` at MoE shapes and it needs one host sync (the offsets) per call.
- ``torch``: ``torch.nn.functional.grouped_mm``.
- ``kernels``: ``kernels.grouped_gemm.grouped_mm`` (Triton on CUDA, its reference on CPU),
  registered as a custom op so compiled blocks keep a full graph.
- ``auto``: ``kernels`` when that module is available, else ``loop`` (resolved when set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "loop", "torch", "kernels")
_BACKEND = "loop"  # resolved name; set_grouped_mm_backend("auto") picks it


def set_grouped_mm_backend(name: str) -> None:
    """Choose the implementation (resolved here, once, outside any compiled region)."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"grouped_mm backend {name!r} unknown; choose one of {BACKENDS}")
    if name == "auto":
        name = "kernels" if _kernels_available() else "loop"
    _BACKEND = name


def get_grouped_mm_backend() -> str:
    return _BACKEND


# The loop is registered as a torch.library custom op: one opaque node for torch.compile (the
# host read of the offsets stays inside it, so compiled blocks keep a full graph) and one autograd
# node whatever the group sizes (the backward graph is then the same on every rank, which keeps
# the order of collectives identical across ranks under expert parallelism).
@torch.library.custom_op("rnd1::loop_grouped_mm", mutates_args=())
def _loop_fwd(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


@_loop_fwd.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("rnd1::loop_grouped_mm_backward", mutates_args=())
def _loop_bwd(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    dx = torch.zeros_like(x)
    dw = torch.zeros(w.shape, dtype=w.dtype, device=w.device)  # experts with no rows: exactly 0
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(grad[start:end], w[g].t(), out=dx[start:end])
            dw[g] = x[start:end].t() @ grad[start:end]
        start = end
    return dx, dw


@_loop_bwd.register_fake
def _(grad, x, w, offs):
    return torch.empty_like(x), x.new_empty(w.shape, dtype=w.dtype)


def _setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    dx, dw = _loop_bwd(grad, x, w, offs)
    return dx, dw, None


_loop_fwd.register_autograd(_backward, setup_context=_setup)


def loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _loop_fwd(x, w, offs)


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
    if backend == "loop":
        return loop_grouped_mm(x, w, offs)
    if backend == "torch":
        return _torch_grouped_mm(x, w, offs)
    from kernels.grouped_gemm import grouped_mm as kernel_grouped_mm

    return kernel_grouped_mm(x, w, offs)
