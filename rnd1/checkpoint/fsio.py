"""Durability helpers shared by the checkpoint writers: a rename is only crash-safe once the
files and their directories have reached the disk."""

from __future__ import annotations

import os
import zlib
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file below ``path`` and every directory on the way."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def file_checksum(path: str | Path, chunk: int = 1 << 22) -> str:
    """crc32 of a file, streamed (zlib.crc32 runs at several GB/s, so verifying a checkpoint
    costs about what reading it costs)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def tree_size(path: str | Path) -> int:
    """Bytes of the files below ``path`` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total
