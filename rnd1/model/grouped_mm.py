"""The expert matmul used by ``GroupedExperts``: one call site, backends chosen at run time.

``grouped_mm(x [N, K], w [G, K, M], offs [G])`` multiplies rows ``offs[g-1]:offs[g]`` of x by
``w[g]`` (the semantics of ``torch.nn.functional.grouped_mm``); rows past ``offs[-1]`` are zero.

Backends (``set_grouped_mm_backend``, from ``[kernels] grouped_mm``):
- ``loop``: one ``torch.mm`` per non-empty group (the kernels' reference path). On this
  project's 2-core CPU it was as fast as ``F.grouped_mm`` at MoE shapes; one host read of the
  offsets per call, inside the custom op.
- ``torch``: ``torch.nn.functional.grouped_mm`` (no host sync: rows past the last group are masked).
- ``kernels``: ``kernels.grouped_gemm.grouped_mm`` with backend ``auto`` (Triton on CUDA, the
  reference on CPU), registered as a custom op so compiled blocks keep a full graph.
- ``auto``: ``kernels``.
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
    _BACKEND = "kernels" if name == "auto" else name


def get_grouped_mm_backend() -> str:
    return _BACKEND


def loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """kernels.grouped_gemm's reference path: a custom op (opaque to torch.compile, one autograd
    node whatever the group sizes, so every rank builds the same backward graph under expert
    parallelism and issues its collectives in the same order)."""
    from kernels.grouped_gemm import grouped_mm as kernel_grouped_mm

    return kernel_grouped_mm(x, w, offs, backend="reference")


def _torch_grouped_mm(x, w, offs):
    out = F.grouped_mm(x, w, offs=offs)
    # Rows past the last offset are left uninitialised by grouped_mm: zero them with a mask
    # rather than a host read of offs[-1], so the op stays sync-free and traceable.
    rows = torch.arange(x.shape[0], device=x.device)
    return torch.where((rows < offs[-1]).unsqueeze(1), out, out.new_zeros(()))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    backend = _BACKEND
    if backend == "loop":
        return loop_grouped_mm(x, w, offs)
    if backend == "torch":
        return _torch_grouped_mm(x, w, offs)
    from kernels.grouped_gemm import grouped_mm as kernel_grouped_mm

    return kernel_grouped_mm(x, w, offs)
