"""What CPU this is, and whether it multiplies bf16 matrices in hardware.

A bf16 matmul is only fast on a CPU with bf16 matrix units: Intel AMX-BF16 tiles (Sapphire
Rapids and later), AVX512-BF16 dot products (Cooper Lake, Zen 4), or Arm's BF16 extension
(BFMMLA, Armv8.6). Without them oneDNN converts and computes in fp32 at a fraction of the fp32
rate (measured on one 2-core AVX2 machine: 1.2 GFLOP/s bf16 against 17 fp32 at 512^3), so the
precision a run should use on a CPU depends on this answer, and a benchmark's numbers mean little
without the CPU model and these flags printed next to them.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

# flags worth printing beside a CPU benchmark (the rest of /proc/cpuinfo changes nothing here)
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                "asimd", "sve", "bf16", "i8mm")


# The environment variables with which the libraries PyTorch computes in are told to use fewer
# instructions than the CPU has: ATen's own kernels, MKL's GEMMs, oneDNN's (which run every bf16
# matmul on CPU). Setting all three to AVX2 makes a Sapphire Rapids behave like an AVX2-only
# machine (fp32 matmuls at half rate, bf16 emulated), which is how this project measures what an
# AVX2 user gets on a machine that has more (``scripts/bench_train_step.py --isa avx2``).
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
# oneDNN's ISA names, lowest first (DNNL_MAX_CPU_ISA is the older spelling of ONEDNN_MAX_CPU_ISA)
_ONEDNN_ISAS = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni",
                "avx512_core_bf16", "avx10_1_512", "avx512_core_fp16", "avx512_core_amx",
                "avx10_1_512_amx", "avx512_core_amx_fp16", "avx10_1_512_amx_fp16", "avx10_2_512",
                "avx10_2_512_amx_2", "default", "all")
_LOWEST_WITH = {"AMX-BF16": "avx512_core_amx", "AVX512-BF16": "avx512_core_bf16"}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset
    bf16_units: str | None  # e.g. "AMX-BF16"; None: bf16 matmuls are emulated
    isa_caps: tuple = ()  # ("ONEDNN_MAX_CPU_ISA=AVX2", ...): instruction limits set in the environment

    def summary(self) -> str:
        shown = " ".join(f for f in VECTOR_FLAGS if f in self.flags) or "no vector flags found"
        units = f"bf16 matrix units: {self.bf16_units}" if self.bf16_units else "no bf16 matrix units"
        caps = f" limited by {' '.join(self.isa_caps)}" if self.isa_caps else ""
        return f"{self.model} [{shown}]{caps} ({units})"

    def key(self) -> str:
        """What a measurement on this CPU depends on: the model, its vector flags (a hypervisor
        may report one generic model name, "Intel(R) Xeon(R) Processor", for different chips)
        and any instruction limit."""
        shown = " ".join(f for f in VECTOR_FLAGS if f in self.flags)
        return " ".join((self.model, f"[{shown}]", *self.isa_caps))


def isa_caps(environ=None) -> tuple:
    """The instruction limits set in the environment (``ISA_CAP_VARIABLES``), as NAME=VALUE."""
    environ = os.environ if environ is None else environ
    names = (*ISA_CAP_VARIABLES, "DNNL_MAX_CPU_ISA")
    return tuple(f"{n}={environ[n]}" for n in names if environ.get(n))


def _onednn_allows(units: str, caps: tuple) -> bool:
    """Whether a oneDNN ISA limit in ``caps`` still lets oneDNN use ``units``. An unknown ISA name
    counts as a limit that allows them: only a limit we can read turns the hardware off."""
    for cap in caps:
        name, _, value = cap.partition("=")
        if name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") and value.lower() in _ONEDNN_ISAS:
            return _ONEDNN_ISAS.index(value.lower()) >= _ONEDNN_ISAS.index(_LOWEST_WITH[units])
    return True


def bf16_units(flags: frozenset, machine: str = "", caps: tuple = ()) -> str | None:
    """The CPU's bf16 matrix hardware that oneDNN may use, named; None when it has none, or when
    ``ONEDNN_MAX_CPU_ISA`` forbids it (PyTorch's CPU bf16 matmuls go through oneDNN)."""
    if "amx_bf16" in flags and _onednn_allows("AMX-BF16", caps):
        return "AMX-BF16"
    if "avx512_bf16" in flags and _onednn_allows("AVX512-BF16", caps):
        return "AVX512-BF16"
    if machine in ("aarch64", "arm64") and "bf16" in flags:
        return "Arm BF16 (BFMMLA)"
    return None


def parse_cpuinfo(text: str, machine: str = "", caps: tuple = ()) -> CpuInfo:
    """/proc/cpuinfo -> CpuInfo (x86: ``model name`` / ``flags``; Arm: ``Features``), under the
    instruction limits ``caps`` (see ``isa_caps``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    flags = frozenset(flags)
    return CpuInfo(model or platform.processor() or machine or "unknown CPU", flags,
                   bf16_units(flags, machine, caps), tuple(caps))


def cpu_info() -> CpuInfo:
    """This machine's CPU (read once per call; cheap)."""
    machine = platform.machine().lower()
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.is_file() else ""
    return parse_cpuinfo(text, machine, isa_caps())
