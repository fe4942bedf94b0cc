"""What CPU this is, and whether it multiplies bf16 matrices in hardware.

A bf16 matmul is only fast on a CPU with bf16 matrix units: Intel AMX-BF16 tiles (Sapphire
Rapids and later), AVX512-BF16 dot products (Cooper Lake, Zen 4), or Arm's BF16 extension
(BFMMLA, Armv8.6). Without them oneDNN converts and computes in fp32 at a fraction of the fp32
rate (measured on one 2-core AVX2 machine: 1.2 GFLOP/s bf16 against 17 fp32 at 512^3), so the
precision a run should use on a CPU depends on this answer, and a benchmark's numbers mean little
without the CPU model and these flags printed next to them.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

# flags worth printing beside a CPU benchmark (the rest of /proc/cpuinfo changes nothing here)
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "asimd", "sve", "bf16", "i8mm")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset
    bf16_units: str | None  # e.g. "AMX-BF16"; None: bf16 matmuls are emulated

    def summary(self) -> str:
        shown = " ".join(f for f in VECTOR_FLAGS if f in self.flags) or "no vector flags found"
        units = f"bf16 matrix units: {self.bf16_units}" if self.bf16_units else "no bf16 matrix units"
        return f"{self.model} [{shown}] ({units})"


def bf16_units(flags: frozenset, machine: str = "") -> str | None:
    """The CPU's bf16 matrix hardware, named; None when it has none."""
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if machine in ("aarch64", "arm64") and "bf16" in flags:
        return "Arm BF16 (BFMMLA)"
    return None


def parse_cpuinfo(text: str, machine: str = "") -> CpuInfo:
    """/proc/cpuinfo -> CpuInfo (x86: ``model name`` / ``flags``; Arm: ``Features``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    flags = frozenset(flags)
    return CpuInfo(model or platform.processor() or machine or "unknown CPU", flags, bf16_units(flags, machine))


def cpu_info() -> CpuInfo:
    """This machine's CPU (read once per call; cheap)."""
    machine = platform.machine().lower()
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.is_file() else ""
    return parse_cpuinfo(text, machine)
