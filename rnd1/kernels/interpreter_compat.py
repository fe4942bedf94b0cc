"""Triton's CPU interpreter under NumPy 2.4+: a scalar kernel argument used as a loop bound.

Under ``TRITON_INTERPRET=1`` every scalar a kernel sees (``G``, ``K``, a loaded offset) is a
one-element NumPy array of shape ``(1,)``, and ``for g in range(G)`` asks it for ``__index__``.
Triton up to 3.6 answers with ``int(array)``; NumPy 2.4 made that an error for arrays that are
not 0-dimensional ("only 0-dimensional arrays can be converted to Python scalars"). So on the
GPU image (Triton 3.6) with a current NumPy, ``gpu_check --tiny`` died in the first kernel at
its first ``range``, while NumPy 1.26 passed. Later Triton releases read ``data.squeeze()``,
which this patch does too.

The patch is the smallest that fixes the cause: after the interpreter has installed its own
methods on ``tl.tensor`` for a launch, ``__index__`` is replaced by one that reads the single
element. It changes nothing when the interpreter is off (compiled kernels never call
``__index__``), nor on a Triton that already reads it this way (same result).
"""

from __future__ import annotations

import os


def _scalar_index(self) -> int:
    data = self.handle.data
    if getattr(data, "size", 1) != 1:
        raise TypeError(f"only a scalar can be used as an index, not a block of shape {data.shape}")
    return int(data.reshape(()) if hasattr(data, "reshape") else data)


def patch_interpreter_index(interpreter=None) -> bool:
    """Make the interpreter's ``tl.tensor.__index__`` read a one-element array. -> True when
    patched (once; a second call is a no-op). ``interpreter`` is for tests: a module with
    Triton's ``_patch_lang_tensor(tensor, scope)``; the default is Triton's own."""
    if interpreter is None:
        try:
            from triton.runtime import interpreter
        except ImportError:  # no Triton: nothing to interpret
            return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_rnd1_index_patched", False):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _scalar_index)

    patch_lang_tensor._rnd1_index_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def patch_if_interpreting() -> bool:
    """Apply the patch when ``TRITON_INTERPRET=1`` (how the kernels run on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and patch_interpreter_index()
