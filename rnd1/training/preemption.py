"""Graceful preemption: on SIGTERM or SIGUSR1 the current step finishes, a checkpoint is saved
and the run exits 0. A second signal exits at once (the cluster insists)."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self):
        self._requested = False
        self._previous = {}
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test harness thread)
                pass

    def _handle(self, signum, frame):
        if self._requested:
            print(f"[rnd1] second signal {signal.Signals(signum).name}: exiting now", flush=True)
            os._exit(1)
        self._requested = True
        print(f"[rnd1] received {signal.Signals(signum).name}: finishing this step, then checkpoint "
              f"and exit", flush=True)

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """Collective when distributed: stop if any rank was signalled, so all ranks save together."""
        flag = torch.tensor([1.0 if self._requested else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
