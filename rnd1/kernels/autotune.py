"""Choose between numerically equivalent implementations by timing them, once per machine.

The fastest way to run an op depends on the machine: on one CPU a loop of per-expert matmuls
beats ``F.grouped_mm``, on another the opposite; a chunk size that suits one cache hierarchy
thrashes another. A default tuned on the machine the code was written on is wrong somewhere
else. So an ``auto`` setting measures its candidates at the run's real shapes for a few
milliseconds each, picks the fastest, says so in one line, and remembers the answer in the run
folder (keyed by machine and shape) so a resumed run does not measure again, and in a
machine-wide cache so every run on the machine makes the same choice.

The machine-wide cache is shared by concurrent jobs, so it is written with care: under a lock,
re-read before writing (one job never drops another's entries), and first measurement wins (a
later job never rewrites an entry, so every run keeps choosing alike). Each entry records the
matmul peak its job measured at start-up (``rnd1.metrics.measure_matmul_peak``); a job whose own
peak is more than ``PLAUSIBLE_LOAD`` times the recorded one finds the entry implausible (it was
timed on a loaded machine), measures anew and replaces it, and says so.

Only candidates that compute the same function (within the tolerance the tests state) may
compete: the choice changes speed, never what is computed.

Timing: each candidate runs once to warm up (kernels are built per shape on CPU), then the
candidates are timed round-robin, so a background load slows them alike, until each has used
``budget_ms`` or run ``max_reps`` times; the median decides.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


PLAUSIBLE_LOAD = 2.0  # a shared entry timed at under 1/2 of this job's matmul peak is measured again


@dataclass
class Choice:
    op: str
    key: str
    chosen: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # candidates that could not run, and why
    stale: str = ""  # why a cached answer was measured again

    def line(self) -> str:
        """The one line a run logs for this choice."""
        gone = f"; skipped {', '.join(f'{k} ({v})' for k, v in self.skipped.items())}" if self.skipped else ""
        if not self.timings_ms:
            return f"autotune {self.op} [{self.key}]: {self.chosen} (the only candidate{gone})"
        times = ", ".join(f"{k} {v:.3g} ms" for k, v in self.timings_ms.items())
        how = "cached" if self.cached else "measured"
        why = f"; not the machine cache's answer: {self.stale}" if self.stale else ""
        return f"autotune {self.op} [{self.key}]: {self.chosen} ({how}: {times}{gone}{why})"


def machine_key() -> str:
    """What makes timings comparable: the device (with any instruction limit set in the
    environment), its threads and the torch build."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        from rnd1.kernels.cpu import cpu_info

        dev = cpu_info().key()
    return f"{dev} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class CannotRun(Exception):
    """Raised by a candidate that knows, before launching, that it cannot run here (a tile whose
    shared memory exceeds the device's at this dtype): skipped and logged like a failed launch."""


def _cannot_run() -> tuple[type[BaseException], ...]:
    """Errors that mean "this candidate does not fit this device", not "this code is wrong": a
    Triton config whose shared memory or registers exceed the GPU's (``OutOfResources``), or one
    that says so itself (``CannotRun``)."""
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - triton is a declared dependency
        return (CannotRun,)
    return (OutOfResources, CannotRun)


def measure(candidates: dict[str, Callable[[], object]], *, budget_ms: float = 20.0, max_reps: int = 50,
            device: str = "cpu", skipped: dict[str, str] | None = None) -> dict[str, float]:
    """Median milliseconds per call of each candidate (warm-up first, then round-robin). A
    candidate that cannot run on this device (``_cannot_run``) is left out and its reason put in
    ``skipped``; if none can run, RuntimeError names them all."""
    unfit = _cannot_run()
    reasons: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            fn()
        except unfit as e:
            reasons[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if skipped is not None:
        skipped.update(reasons)
    candidates = {k: v for k, v in candidates.items() if k not in reasons}
    if not candidates:
        raise RuntimeError("autotune: no candidate can run here: " + "; ".join(f"{k} ({v})" for k, v in reasons.items()))
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    spent = {k: 0.0 for k in candidates}
    while any(spent[k] < budget_ms and len(samples[k]) < max_reps for k in candidates) or \
            any(len(s) < 3 for s in samples.values()):
        for k, fn in candidates.items():
            if len(samples[k]) >= 3 and (spent[k] >= budget_ms or len(samples[k]) >= max_reps):
                continue
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ms = (time.perf_counter() - t0) * 1e3
            samples[k].append(ms)
            spent[k] += ms
    return {k: statistics.median(v) for k, v in samples.items()}


def shared_cache_file() -> Path:
    """The machine-wide cache (``RND1_AUTOTUNE_CACHE``, else ~/.cache/rnd1/autotune.json): runs on
    one machine at one shape make one choice, so two runs compare bit for bit even where the
    candidates differ in the last bits (the cross-entropy's chunk size changes summation order)."""
    env = os.environ.get("RND1_AUTOTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rnd1" / "autotune.json"


def _read(path: Path | None) -> dict:
    if not path or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a new measurement
    return data if isinstance(data, dict) else {}


class Autotuner:
    """Choices for one run: read from ``cache_file`` (the run folder's, so a resume keeps them),
    else from ``shared_file`` (the machine's, unless implausible against ``peak_flops``, this
    job's measured matmul peak), else measured and written to both."""

    def __init__(self, cache_file: str | Path | None = None, *, shared_file: str | Path | None = None,
                 budget_ms: float = 20.0, peak_flops: float | None = None):
        self.cache_file = Path(cache_file) if cache_file else None
        self.shared_file = Path(shared_file) if shared_file else None
        self.budget_ms = budget_ms
        self.peak_flops = peak_flops
        self.machine = machine_key()
        self._cache = _read(self.cache_file)
        self._shared = _read(self.shared_file)

    def choose(self, op: str, key: str, candidates: dict[str, Callable[[], object]] | Callable[[], dict], *,
               device: str = "cpu", names: tuple = ()) -> Choice:
        """``candidates``: {name: a zero-argument call to time}, or a function making them (with
        their ``names``) when making them costs memory: it is called only when nothing is cached."""
        if callable(candidates):
            if not names:
                raise ValueError(f"autotune {op}: candidates given as a function need their names")
            make, candidates = candidates, dict.fromkeys(names)
        else:
            make = None
        if len(candidates) == 1:
            (only,) = candidates
            return Choice(op, key, only, {})
        name = f"{op}|{key}"
        stale = ""
        for store in (self._cache, self._shared):
            entry = store.get(self.machine, {}).get(name)
            if isinstance(entry, dict) and entry.get("chosen") in candidates:
                if store is self._shared:
                    stale = self._implausible(entry)
                    if stale:
                        continue
                    self._cache.setdefault(self.machine, {})[name] = entry  # the run folder records what it uses
                    _write(self.cache_file, self._cache, required=True)
                return Choice(op, key, entry["chosen"], entry.get("ms", {}), cached=True)
        if make is not None:
            candidates = make()
        skipped: dict[str, str] = {}
        ms = measure(candidates, budget_ms=self.budget_ms, device=device, skipped=skipped)
        chosen = min(ms, key=ms.get)
        entry = {"chosen": chosen, "ms": ms, **({"peak_flops": self.peak_flops} if self.peak_flops else {})}
        self._cache.setdefault(self.machine, {})[name] = entry
        _write(self.cache_file, self._cache, required=True)
        self._share(name, entry, replace=bool(stale))
        return Choice(op, key, chosen, ms, skipped=skipped, stale=stale)

    def _implausible(self, entry: dict) -> str:
        """Why a shared entry cannot be trusted here ('' when it can): it was timed when the
        machine's matmul peak was under 1/``PLAUSIBLE_LOAD`` of this job's, i.e. under load."""
        then = entry.get("peak_flops")
        if self.peak_flops and then and self.peak_flops > PLAUSIBLE_LOAD * then:
            return (f"it was timed at a matmul peak of {then / 1e12:.3g} TFLOP/s, this job's is "
                    f"{self.peak_flops / 1e12:.3g} (a loaded machine then)")
        return ""

    def _share(self, name: str, entry: dict, *, replace: bool) -> None:
        """Add ``entry`` to the machine cache under its lock, re-reading it first so concurrent jobs
        lose nothing; an existing entry stays (first measurement wins) unless ``replace``."""
        path = self.shared_file
        if not path:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                shared = _read(path)
                if replace or name not in shared.get(self.machine, {}):
                    shared.setdefault(self.machine, {})[name] = entry
                    _write(path, shared, required=False)
                self._shared = shared
        except OSError:
            pass  # an unwritable machine cache (a read-only home) only costs future measurements


def _write(path: Path | None, data: dict, required: bool) -> None:
    """Atomically (a reader never sees half a file). An unwritable shared cache (a read-only home)
    is skipped: it only saves future measurements; the run folder's must be written."""
    if not path:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        if required:
            raise
