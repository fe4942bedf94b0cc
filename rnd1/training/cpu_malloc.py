"""Keep freed memory in the process on CPU (glibc malloc), so big activations stop page-faulting.

PyTorch's CPU allocator is plain ``malloc``. glibc serves blocks above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and returns them with ``munmap`` on free, so every step touches
new pages again. The kernel zero-fills them one 4 KiB fault at a time. At hidden 1024, an
elementwise op on a [8192, 1024] activation spent most of its time in those faults.
``mallopt(M_MMAP_MAX, 0)`` serves every block from the heap instead, and ``M_TRIM_THRESHOLD``
-1 (never trim) keeps freed heap memory for the next step: what a caching allocator does.
Cost: resident memory stays near the step's high-water mark (peak RSS +7-10% at hidden 1024,
unchanged at 256; docs/performance.md). The settings are process-wide and only take effect for blocks
allocated afterwards, so call this first thing in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Apply the settings; True when glibc accepted both (False elsewhere, e.g. musl or macOS)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok_mmap = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, -1) == 1  # -1: never trim (mallopt(3))
    return ok_mmap and ok_trim
