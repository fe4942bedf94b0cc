"""One switch for every kernel: which implementation runs.

``auto``: Triton for CUDA tensors, the PyTorch reference otherwise. ``triton`` on CPU is only
possible under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the kernels are
tested without a GPU. ``RND1_KERNEL_BACKEND`` sets the process-wide default.

Per-op settings (``set_op_backend`` / ``op_backend``) are the one mechanism by which callers that
do not pass a backend themselves pick one: the trainer sets ``grouped_mm``, ``dispatch`` and
``cross_entropy`` from ``[kernels]`` once at start-up, and the model's expert matmul and token
dispatcher read theirs at call time. One vocabulary for all of them: ``BACKENDS``."""

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


OPS = ("grouped_mm", "dispatch", "cross_entropy")
_op_backend = {op: "auto" for op in OPS}


def check_backend(name: str) -> str | None:
    """None when ``name`` is a backend, else a one-line reason (for config validation)."""
    return None if name in BACKENDS else f"is not a kernel backend; expected one of {', '.join(BACKENDS)}"


def set_op_backend(op: str, name: str) -> None:
    """Set the backend ``op`` uses when its caller does not choose (``auto`` follows the device)."""
    if op not in OPS:
        raise ValueError(f"kernel op {op!r} unknown; expected one of {OPS}")
    err = check_backend(name)
    if err:
        raise ValueError(f"kernel backend {name!r} {err}")
    _op_backend[op] = name


# Implementations an ``auto`` op chose by measuring them on this machine (``rnd1.kernels.autotune``; the
# trainer measures at start-up). Consulted only while the op's backend is ``auto``.
_op_impl: dict[str, str] = {}


def set_op_impl(op: str, impl: str | None) -> None:
    """Record the measured choice for ``op`` (None forgets it)."""
    if op not in OPS:
        raise ValueError(f"kernel op {op!r} unknown; expected one of {OPS}")
    if impl is None:
        _op_impl.pop(op, None)
    else:
        _op_impl[op] = impl


def op_impl(op: str) -> str | None:
    """The measured implementation of ``op`` when its backend is ``auto``; None otherwise."""
    return _op_impl.get(op) if _op_backend[op] == "auto" else None


def op_backend(op: str) -> str:
    """The configured (unresolved) backend of ``op``; pass it to ``resolve_backend``."""
    return _op_backend[op]


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


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 stays IEEE unless torch itself allows TF32 for fp32 matmuls."""
    if dtype != torch.float32:
        return "ieee" if dtype == torch.float64 else "tf32"  # 16-bit inputs: the flag is ignored
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The matmul operands a Triton kernel should see under autocast: cast to the active autocast
    dtype, as autocast casts a plain matmul's. Autocast never reaches into a custom op's Triton
    kernel (torch ops inside the op's Python body are still autocast), so without this an fp32
    parameter under bf16 autocast reached the kernel as fp32: IEEE fp32 on the FMA path, no tensor
    cores. The cast is differentiable, so the gradient returns in the parameter's dtype."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
