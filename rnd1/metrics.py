"""Training metrics: throughput, FLOPs and MFU, memory, and where they are written.

Throughput is counted in tokens fed to the model (B x L per micro-batch, summed over data-parallel
ranks); model FLOPs per token come from ``ModelConfig.flops_per_token`` (6 N_active + attention).
MFU divides achieved FLOP/s per process by a peak per process: configured, or measured here with a
matmul of the training dtype (on CPU there is no datasheet number to quote).
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch


PEAK_REPS = 7


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = PEAK_REPS,
                        device: str | torch.device = "cpu", budget_s: float = 2.0) -> float:
    """FLOP/s of a square matmul of ``dtype``: the MEDIAN of ``reps`` timed runs after two
    warm-ups (MFU divides by it; ``MATMUL_PEAK_HOW`` says so in the start-up line).

    Why the median: the best of a few runs swung 0.21-2.20 TFLOP/s between runs of one model on a
    shared machine (issue 32), and MFU with it; a single lucky or unlucky run moves a median
    little. The size starts at 256 and doubles up to ``n`` only while the next size's runs are
    expected to fit in ``budget_s`` (one size up costs about 8x); the decision uses the fastest run,
    so a burst of load does not shrink the matmul. Where a matmul is slow (bf16 on a CPU without
    bf16 units takes about a minute at n=2048) start-up then spends seconds here, not minutes,
    and the peak comes from a smaller matmul: a device that slow is nowhere near a datasheet
    number anyway."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(size: int) -> list[float]:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        for _ in range(2):
            a @ b
        runs = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            runs.append(time.perf_counter() - t0)
        return runs

    size = min(256, n)
    runs = timed(size)
    while size * 2 <= n and 8 * min(runs) * (reps + 2) <= budget_s:
        size *= 2
        runs = timed(size)
    return 2 * size**3 / statistics.median(runs)


MATMUL_PEAK_HOW = f"measured at start-up: the median of {PEAK_REPS} square matmuls after two warm-ups"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, resident-set high-water on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb * (1 if sys.platform == "darwin" else 1024)


class Throughput:
    """Tokens/s, TFLOP/s and MFU over the steps since the last report.

    An MFU above 100% is a measurement error: the peak was measured low (a matmul timed while
    other work shared the device or cores) or configured low. The first time it happens the peak
    is measured again with ``remeasure_peak`` (when given) and the larger of the two kept; if MFU
    is still above 100% it is reported as None with ``mfu_peak_too_low`` set, never as a number."""

    def __init__(self, flops_per_token: float, peak_flops: float, world_size: int,
                 remeasure_peak: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self._remeasure, self._clock = remeasure_peak, clock
        self.reset()

    def reset(self):
        self._t0, self._tokens, self._steps = self._clock(), 0, 0

    def update(self, tokens: int):
        self._tokens += tokens
        self._steps += 1

    def report(self) -> dict[str, float]:
        dt = max(self._clock() - self._t0, 1e-9)
        tps = self._tokens / dt
        flops_per_proc = tps * self.flops_per_token / self.world_size
        out = {
            "tokens_per_s": tps,
            "step_time_s": dt / max(self._steps, 1),
            "tflops_per_proc": flops_per_proc / 1e12,
            **self._mfu(flops_per_proc),
        }
        self.reset()
        return out

    def _mfu(self, flops_per_proc: float) -> dict:
        if self.peak_flops <= 0:
            return {"mfu": float("nan")}
        out = {}
        if flops_per_proc > self.peak_flops and self._remeasure is not None:
            remeasure, self._remeasure = self._remeasure, None  # once: a second timing would be as noisy
            self.peak_flops = max(self.peak_flops, remeasure())
            out["peak_tflops_remeasured"] = self.peak_flops / 1e12
        if flops_per_proc > self.peak_flops:
            return {**out, "mfu": None, "mfu_peak_too_low": True}
        return {**out, "mfu": flops_per_proc / self.peak_flops}


def router_balance(tokens_per_expert: torch.Tensor | None) -> dict[str, float]:
    """Load balance of the last step: max/mean routed tokens over experts (1.0 is perfect) and the
    number of experts that got no tokens."""
    if tokens_per_expert is None or tokens_per_expert.numel() == 0:
        return {}
    t = tokens_per_expert.float()
    return {"moe_max_over_mean": (t.max() / t.mean().clamp_min(1e-9)).item(),
            "moe_dead_experts": float((t == 0).sum().item())}


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriteError(RuntimeError):
    """The metrics log could not be written (the disk is full): one line, exit 2, like a full disk
    during a checkpoint save."""


class MetricsLogger:
    """Writes one JSON line per logged step (rank 0), echoes a compact console line, and mirrors
    scalars to TensorBoard when it is installed and enabled. ``save_jsonl=False``
    (``metrics.save_jsonl``) keeps the console line and TensorBoard but writes no metrics.jsonl, for
    runs whose folder must not grow or that log elsewhere; the run-reading tools then have nothing
    to read."""

    CONSOLE_KEYS = (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("val_ppl_bound", "ppl <= {:,.2f}"),
                    ("val_ppl", "ppl {:,.2f}"), ("grad_norm", "gnorm {:.2f}"),
                    ("lr/attention", "lr_attn {:.2e}"), ("lr/non_attention", "lr {:.2e}"),
                    ("lr/mask_embedding", "lr_mask {:.2e}"),
                    ("masked_frac", "masked {:.2f}"),
                    # RL runs (rnd1/rl/trainer.py)
                    ("reward_mean", "reward {:.3f}"), ("reward_std", "+- {:.3f}"), ("zero_adv_frac", "zero-adv {:.2f}"),
                    ("completion_len", "len {:.1f}"), ("rollout_tokens_per_s", "rollout {:,.0f} tok/s"),
                    ("rollout_share", "({:.0%} of step)"), ("val_accuracy", "val acc {:.3f}"),
                    ("val_accuracy_stderr", "+- {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                    ("mfu", "mfu {:.1%}"), ("memory_gib", "mem {:.2f}GiB"))

    def __init__(self, folder: str | Path | None, enabled: bool = True, tensorboard: bool = False,
                 save_jsonl: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled or folder is None:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if save_jsonl:
            path = folder / "metrics.jsonl"
            _drop_partial_last_line(path)
            self._file = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("[rnd1] metrics.enable_tensorboard: tensorboard is not installed; writing JSONL only",
                      flush=True)
            else:
                self._tb = SummaryWriter(str(folder / "tb"))

    def log(self, step: int, metrics: dict, *, prefix: str = "", eta_s: float | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._file:
            try:
                self._file.write(json.dumps(record) + "\n")
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise MetricsWriteError(
                    f"no space left on device while writing {self._file.name} at step {step}; free space, then "
                    f"run the same command: the run resumes from its newest complete checkpoint") from e
        if self._tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        parts = [f"{prefix}step {step:>6}"]
        for key, fmt in self.CONSOLE_KEYS:
            if key in metrics and metrics[key] is not None and not _isnan(metrics[key]):
                parts.append(fmt.format(metrics[key]))
            elif key == "mfu" and metrics.get("mfu_peak_too_low"):
                parts.append("mfu n/a (>100%: peak FLOP/s measured too low)")
        if eta_s is not None:
            parts.append(f"eta {format_eta(eta_s)}")
        print("  ".join(parts), flush=True)

    def close(self):
        if self._file:
            try:
                self._file.close()
            except OSError:  # the buffered tail could not be written (disk full): already reported
                pass
        if self._tb:
            self._tb.close()


def _drop_partial_last_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline: cut it before appending."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
