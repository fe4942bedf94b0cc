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
# A peer process that is gone: gloo's socket errors, NCCL's "remote process exited".
_LOST_PEER_RE = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|remote process exited|"
                           r"connection refused|socket closed", re.IGNORECASE)
_ALIVE_KEY = "rnd1/collective_timeout/alive/{}"
_BAD_INPUT_KEY = "rnd1/bad_input"
_REPORTED_KEY = "rnd1/reported"


def _store():
    """The job's rendezvous store (hosted by torchrun's agent, so it outlives any one rank), or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store, no shared verdict: each rank reports for itself
        return None


def first_to_report() -> bool:
    """True for the first rank of the job to call this (the one that prints the job's one line);
    True everywhere without a reachable store (one process, or the store is gone)."""
    store = _store()
    if store is None:
        return True
    try:
        return store.add(_REPORTED_KEY, 1) == 1
    except Exception:  # noqa: BLE001
        return True


def announce_bad_input() -> None:
    """Tell the other ranks that this rank stopped on bad input (exit 2, its one line printed), before
    it leaves: a rank that was waiting for it in a collective then sees its peer go, finds this
    note and exits 2 quietly instead of crashing with the transport's traceback."""
    store = _store()
    if store is not None:
        try:
            store.set(_BAD_INPUT_KEY, "1")
        except Exception:  # noqa: BLE001 - best effort: the peers then report a lost peer instead
            pass


def peer_had_bad_input(wait_s: float = 2.0) -> bool:
    """Whether another rank announced bad input (waiting up to ``wait_s`` for its note)."""
    store = _store()
    if store is None:
        return False
    deadline = time.monotonic() + wait_s
    try:
        while True:
            if store.check([_BAD_INPUT_KEY]):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    except Exception:  # noqa: BLE001
        return False


def collective_timeout_message(exc: BaseException, grace_s: float = 5.0) -> str | None:
    """One line for a collective that timed out or whose peer process is gone (``None`` if ``exc``
    is something else), naming the rank(s) that stopped answering.

    Gloo's text ("Timed out waiting 3000ms for recv operation to complete") names no peer, so the
    ranks find out through the rendezvous store (hosted by torchrun's agent, alive when a rank is
    frozen): every rank whose collective timed out posts a key, waits up to ``grace_s`` for the others'
    keys, and names the ranks that never posted — stopped (SIGSTOP), hung or dead."""
    lost = isinstance(exc, RuntimeError) and bool(_LOST_PEER_RE.search(str(exc)))
    if not isinstance(exc, RuntimeError) or not (lost or _TIMEOUT_RE.search(str(exc))):
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
        if lost:
            return (f"rank {rank} of {world} lost its peer: {who} died (its process is gone); the newest complete "
                    f"checkpoint is intact: run the same command to resume ({first})")
        return (f"collective timed out on rank {rank} of {world}: {who} stopped answering (frozen, hung or dead); "
                f"limit training.collective_timeout_s={_timeout_s:g} ({first})")
    return (f"collective timed out on rank {rank} of {world}: every rank is alive but one is stuck elsewhere "
            f"(a rank skipped or reordered a collective?); limit training.collective_timeout_s={_timeout_s:g} "
            f"({first})")
