"""One training step counted by rnd1.tools.memory_estimate, on fake or real tensors; prints JSON.

    python worker_memory.py fake WORLD RANK CONFIG [overrides]   # the estimate of rank RANK
    torchrun --nproc_per_node=N worker_memory.py real N - CONFIG [overrides]   # the real step, every rank

The real run also reports the process's own peak: the resident set's high-water mark
(``ru_maxrss``) minus the resident set just before the model was built."""

import json
import os
import sys


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm() -> int:
    """The resident set's high-water mark (VmHWM), which ``reset_hwm`` restarts from now."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main():
    mode, world, rank, config, *overrides = sys.argv[1:]
    import torch

    torch.manual_seed(0)
    from rnd1.config import load_config
    from rnd1.tools.memory_estimate import estimate

    cfg = load_config(config, overrides)
    world = int(world)
    if mode == "real" and world > 1:
        from rnd1.parallel.env import init_distributed

        env = init_distributed("cpu")
        rank = env.rank
    else:
        rank = int(rank) if rank != "-" else 0
    at_start = {}

    def before_step():
        reset_hwm()
        at_start["rss"] = rss_now()

    est = estimate(cfg, world_size=world, rank=rank, fake=(mode == "fake"), before_step=before_step)
    rss_rise = hwm() - at_start["rss"]
    out = {"rank": rank, "peak": est.peak, "params": est.param_bytes, "grads": est.grad_bytes,
           "optimizer": est.optimizer_bytes, "peak_by_category": est.ledger.peak_by_category,
           "rss_rise": rss_rise, "tensor_rise": est.peak - est.param_bytes - est.optimizer_bytes}
    if mode == "real" and world > 1:
        import torch.distributed as dist

        from rank_order import print_in_rank_order

        print_in_rank_order(out)
        dist.destroy_process_group()
    else:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
