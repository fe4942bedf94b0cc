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


def loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


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
