"""torchrun worker for test_cluster_faults: rank 1 freezes itself (SIGSTOP) before a collective;
rank 0 must fail within the collective timeout with one line naming rank 1."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from rnd1.parallel.env import collective_timeout_message, init_distributed

timeout_s = float(sys.argv[1])
env = init_distributed("cpu", timeout_s=timeout_s)
t = torch.ones(4)
dist.all_reduce(t)  # every rank is up
if env.rank == 1:
    # torchrun starts workers in their own process group: the test kills this pid itself
    print(f"FROZEN {os.getpid()}", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
t0 = time.monotonic()
try:
    dist.all_reduce(t)
except RuntimeError as e:
    msg = collective_timeout_message(e)
    print(f"ELAPSED {time.monotonic() - t0:.1f}", flush=True)
    print(f"MESSAGE {msg}", flush=True)
    # the frozen peer never exits by itself: the test kills it, via torchrun's group
    os._exit(3)
