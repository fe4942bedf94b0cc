"""Byte sizes as people write them: "80GiB", "141GB", "512MiB", or a plain number of bytes."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
NOT_A_SIZE = "is not a size; expected a number with an optional unit, e.g. 80GiB or 141GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """Bytes from "80GiB" (2^30) or "80GB" (10^9), Hugging Face's convention; ValueError names
    what was expected."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} {NOT_A_SIZE}")
    return int(float(m[1]) * _UNITS[(m[2] or "").upper()])
