"""The expert matmul used by ``GroupedExperts``: one call site, the backend chosen at run time.

``grouped_mm(x [N, K], w [G, K, M], offs [G])`` multiplies rows ``offs[g-1]:offs[g]`` of x by
``w[g]`` (the semantics of ``torch.nn.functional.grouped_mm``); rows past ``offs[-1]`` are zero.

The backend is the ``grouped_mm`` entry of ``rnd1.kernels.backend`` (set from ``[kernels] grouped_mm``
by the trainer), in the vocabulary every kernel shares:
- ``reference``: ``rnd1.kernels.grouped_gemm``'s PyTorch path (``F.grouped_mm`` where its stride rule
  allows, else one ``torch.mm`` per group), a custom op: opaque to torch.compile and one autograd
  node whatever the group sizes, so every rank builds the same backward graph under expert
  parallelism and issues its collectives in the same order;
- ``triton``: the persistent Triton kernel (on CPU only under ``TRITON_INTERPRET=1``);
- ``auto`` (default): Triton for CUDA tensors, the reference otherwise.
The values of the earlier grouped_mm-only switch map as loop -> reference, kernels -> auto; its
``torch`` value (bare ``F.grouped_mm``, no custom op) is gone.
"""

from __future__ import annotations

import torch

from rnd1.kernels.backend import op_backend, set_op_backend


def set_grouped_mm_backend(name: str) -> None:
    """Choose the implementation: one of ``rnd1.kernels.backend.BACKENDS`` (ValueError otherwise)."""
    set_op_backend("grouped_mm", name)


def get_grouped_mm_backend() -> str:
    return op_backend("grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    from rnd1.kernels.grouped_gemm import grouped_mm as kernel_grouped_mm

    return kernel_grouped_mm(x, w, offs, backend=op_backend("grouped_mm"))
