"""Graceful preemption: on SIGTERM, SIGUSR1, SIGHUP, SIGQUIT or SIGINT (Ctrl-C) the current step
finishes, a checkpoint is saved and the run exits 0. Slurm sends SIGTERM at the time limit (or the
signal ``--signal`` names, often SIGUSR1, ahead of it), Kubernetes SIGTERM, a closed terminal or
ssh session SIGHUP. The handler is installed when the trainer starts, before any checkpoint is
read: a signal during start-up stops the run before its first step, with nothing new to save.

One preemption is one save, however many copies of the signal arrive: a scheduler (Slurm,
Kubernetes) signals every process of the job, so a worker gets the signal both directly and again
from torchrun, which forwards it; a terminal's Ctrl-C reaches the launcher and every worker the
same way. Copies arriving within ``GRACE_S`` of the first are the same request. A signal after
that window (the cluster insists, or a second Ctrl-C) exits at once, without a checkpoint.

Under torchrun the worker also stops when its launcher dies (kill -9 on torchrun): the kernel sends
it SIGTERM (``PR_SET_PDEATHSIG``), and each step checks that its parent is still the launcher, so
an orphan saves and exits instead of training on unsupervised."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)
GRACE_S = 2.0  # copies of one preemption arrive within this window
PR_SET_PDEATHSIG = 1


def stop_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Linux: ask the kernel to send ``sig`` to this process when its parent exits. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class PreemptionHandler:
    def __init__(self, watch_parent: bool = False):
        self._requested_at: float | None = None
        self._reason = ""
        self._previous = {}
        # under torchrun the parent is the launcher's agent; an orphan is re-parented (pid 1 or a
        # subreaper), which the per-step check notices even where PR_SET_PDEATHSIG is unavailable
        self._parent = os.getppid() if watch_parent else None
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test harness thread)
                pass

    @property
    def requested(self) -> bool:
        return self._requested_at is not None

    @property
    def reason(self) -> str:
        """What asked the run to stop ("SIGTERM", "the launcher's exit"), once requested."""
        return self._reason

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._requested_at is not None:
            if now - self._requested_at <= GRACE_S:
                return  # another copy of the same preemption (scheduler + torchrun's forward)
            print(f"[rnd1] second {name}: exiting now, without a checkpoint", flush=True)
            os._exit(128 + signum)
        self._requested_at = now
        self._reason = name
        if signum == signal.SIGINT:
            print("[rnd1] Ctrl-C: finishing this step, then checkpoint and exit "
                  f"(Ctrl-C again after {GRACE_S:.0f}s exits at once)", flush=True)
        else:
            print(f"[rnd1] received {name}: finishing this step, then checkpoint and exit", flush=True)

    def _check_parent(self) -> None:
        if self._parent is not None and self._requested_at is None and os.getppid() != self._parent:
            self._requested_at = time.monotonic()
            self._reason = "the launcher's exit"
            print(f"[rnd1] launcher (pid {self._parent}) is gone: checkpoint and exit", flush=True)

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """Collective when distributed: stop if any rank was signalled, so all ranks save together."""
        self._check_parent()
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
