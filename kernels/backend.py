"""One switch for every kernel: which implementation runs.

``auto``: Triton for CUDA tensors, the PyTorch reference otherwise. ``triton`` on CPU is only
possible under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the kernels are
tested without a GPU. ``RND1_KERNEL_BACKEND`` sets the process-wide default."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton")
_default = os.environ.get("RND1_KERNEL_BACKEND", "auto")


def set_default_backend(name: str) -> None:
    global _default
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} unknown; expected one of {BACKENDS}")
    _default = name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device | str | None) -> str:
    """-> "triton" or "reference"."""
    if backend == "auto":
        backend = _default
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} unknown; expected one of {BACKENDS}")
    is_cuda = torch.device(device).type == "cuda" if device is not None else False
    if backend == "auto":
        return "triton" if is_cuda else "reference"
    if backend == "triton" and not is_cuda and not triton_interpreting():
        raise RuntimeError("kernel backend 'triton' on CPU tensors needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 (or use backend 'reference'/'auto')")
    return backend
