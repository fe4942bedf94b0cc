"""The expert matmul used by ``GroupedExperts``: one call site, backends chosen at run time.

``grouped_mm(x [N, K], w [G, K, M], offs [G])`` multiplies rows ``offs[g-1]:offs[g]`` of x by
``w[g]`` (the semantics of ``torch.nn.functional.grouped_mm``). The implementation is whatever
``set_grouped_mm_backend`` selected (the trainer sets it from ``[kernels] grouped_mm``).
"""

from __future__ import annotations

import torch

_BACKEND = "loop"
BACKENDS = ("loop",)


def set_grouped_mm_backend(name: str) -> None:
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"grouped_mm backend {name!r} unknown; choose one of {BACKENDS}")
    _BACKEND = name


def get_grouped_mm_backend() -> str:
    return _BACKEND


def _loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _loop_grouped_mm(x, w, offs)
