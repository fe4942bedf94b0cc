"""Triton <= 3.6's interpreter under NumPy >= 2.4 (rnd1/kernels/interpreter_compat.py).

The GPU image pairs Triton 3.6 with a current NumPy; there ``gpu_check --tiny`` died at the first
``for g in range(G)``. CI's Triton already reads the scalar correctly, so the patch is tested
against a stand-in with Triton 3.6's exact ``__index__`` (``int(self.handle.data)``), and then on
the installed Triton with a real kernel whose loop bounds are runtime scalars."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from rnd1.kernels.interpreter_compat import patch_interpreter_index


class _Scope:
    """Triton's _LangPatchScope: set_attr on a class."""

    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


def _triton36_like():
    class Tensor:  # the interpreter's view of a scalar: a TensorHandle over a (1,)-shaped array
        def __init__(self, value):
            self.handle = types.SimpleNamespace(data=np.array([value], dtype=np.int32))

    def _patch_lang_tensor(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))  # Triton 3.6

    return types.SimpleNamespace(_patch_lang_tensor=_patch_lang_tensor), Tensor


def test_scalar_loop_bound_after_patch():
    interp, Tensor = _triton36_like()
    interp._patch_lang_tensor(Tensor, _Scope())
    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):  # the failure being fixed
        with pytest.raises(TypeError, match="0-dimensional"):
            list(range(Tensor(3)))
    assert patch_interpreter_index(interp) is True
    assert patch_interpreter_index(interp) is False  # once
    interp._patch_lang_tensor(Tensor, _Scope())
    assert list(range(Tensor(3))) == [0, 1, 2]
    block = Tensor(0)
    block.handle.data = np.arange(4)
    with pytest.raises(TypeError, match="block of shape"):  # a block is still no index
        range(block)


def test_without_triton_interpreter_module_nothing_happens():
    assert patch_interpreter_index(types.SimpleNamespace()) is False


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it) or CUDA")
def test_grouped_mm_triton_with_runtime_loop_bounds():
    """The kernel that failed on the GPU image (``range(G)``, ``range(0, K, BLOCK_K)``) runs and
    matches the reference on the installed Triton."""
    from rnd1.kernels.grouped_gemm import grouped_mm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 8, generator=g)
    w = torch.randn(3, 8, 16, generator=g)
    offs = torch.tensor([5, 5, 17], dtype=torch.int32)
    y = grouped_mm(x, w, offs, backend="triton")
    ref = grouped_mm(x, w, offs, backend="reference")
    torch.testing.assert_close(y, ref)
