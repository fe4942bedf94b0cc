"""Shared helpers for the microbenchmarks: timing, matmul peak, and peak memory of one call
measured in a fresh subprocess (so one method's allocations cannot hide another's)."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def median_time(fn, reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype=torch.bfloat16, n: int = 2048, device="cpu") -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / median_time(lambda: a @ b, reps=5)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Resident-set high-water mark (VmHWM) since the last reset_peak_rss()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident set (Linux: write 5 to /proc/self/clear_refs), so the
    peak of a call is not hidden by an earlier spike (e.g. creating the inputs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_isolated(module: str, args: list[str]) -> dict:
    """Run ``python -m module args --child`` and parse its last JSON line."""
    out = subprocess.run([sys.executable, "-m", module, *args, "--child"], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
