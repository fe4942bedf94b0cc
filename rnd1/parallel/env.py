"""Process-group set-up from the torchrun environment (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
_timeout_s = DEFAULT_COLLECTIVE_TIMEOUT_S  # the limit init_distributed set, for the timeout message


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistEnv:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE set), else run alone.

    ``device``: "auto" (CUDA when available), "cpu" or "cuda". ``timeout_s``
    (``training.collective_timeout_s``): how long a collective waits for the other ranks before it
    fails (gloo raises; on CUDA, NCCL's watchdog aborts the rank) — see ``collective_timeout_message``."""
    if timeout_s <= 0:
        raise ValueError(f"training.collective_timeout_s={timeout_s}: must be > 0")
    global _timeout_s
    _timeout_s = timeout_s
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = None
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    elif dist.is_initialized():
        backend = dist.get_backend()
    return DistEnv(rank, local_rank, world, dev, backend)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_TIMEOUT_RE = re.compile(r"timed out|timeout", re.IGNORECASE)
_ALIVE_KEY = "rnd1/collective_timeout/alive/{}"


def collective_timeout_message(exc: BaseException, grace_s: float = 5.0) -> str | None:
    """One line for a collective that timed out (``None`` if ``exc`` is something else), naming the
    rank(s) that stopped answering.

    Gloo's text ("Timed out waiting 3000ms for recv operation to complete") names no peer, so the
    ranks find out through the rendezvous store (hosted by torchrun's agent, alive when a rank is
    frozen): every rank whose collective timed out posts a key, waits up to ``grace_s`` for the others'
    keys, and names the ranks that never posted — stopped (SIGSTOP), hung or dead."""
    if not isinstance(exc, RuntimeError) or not _TIMEOUT_RE.search(str(exc)):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../unbound_buffer.cc:78] " prefix
    silent = None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set(_ALIVE_KEY.format(rank), "1")
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in range(world) if r != rank and not store.check([_ALIVE_KEY.format(r)])]
            if not silent or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    except Exception:  # the store itself is unreachable: fall back on what the world size tells
        silent = [1 - rank] if world == 2 else None
    if silent:
        who = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent))
        return (f"collective timed out on rank {rank} of {world}: {who} stopped answering (frozen, hung or dead); "
                f"limit training.collective_timeout_s={_timeout_s:g} ({first})")
    return (f"collective timed out on rank {rank} of {world}: every rank is alive but one is stuck elsewhere "
            f"(a rank skipped or reordered a collective?); limit training.collective_timeout_s={_timeout_s:g} "
            f"({first})")
