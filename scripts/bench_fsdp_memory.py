#!/usr/bin/env python
"""Per-rank memory of one AdamW training step as the FSDP degree grows (CPU, gloo).

    python scripts/bench_fsdp_memory.py                 # FSDP 1, 2, 4 with a ~60M-parameter MoE
    python scripts/bench_fsdp_memory.py --nprocs 1 2 --ep 2

For each degree it launches torchrun, runs forward + backward + optimizer step, and prints per
rank: bytes of parameters + gradients + optimiser state held locally (exact) and the process's
peak resident memory (includes the ~0.4 GB that importing torch costs every process)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def worker(args):
    import resource
    from types import SimpleNamespace as NS

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import Qwen3
    from rnd1.parallel import build_parallel_dims, parallelize_model
    from rnd1.parallel.env import init_distributed

    env = init_distributed("cpu")
    cfg = NS(parallelism=NS(tensor_parallel_degree=1, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                            expert_parallel_degree=args.ep, fsdp_reshard_after_forward="default"),
             activation_checkpoint=NS(mode="none"), compile=NS(enable=False), training=NS(mixed_precision_param="float32"))
    mcfg = get_preset("debug", vocab_size=8192, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, moe_intermediate_size=512, num_experts=16,
                      num_experts_per_tok=4, mask_token_id=8191)
    dims = build_parallel_dims(cfg.parallelism, env)
    with torch.device("meta"):
        model = Qwen3(mcfg, attention_mode="bidirectional")
    model = parallelize_model(model, cfg, dims, env) if env.world_size > 1 else model
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 8000, (2, 256))
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()

    def local_bytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    held = sum(local_bytes(p) for p in model.parameters())
    held += sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    held += sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec = {"rank": env.rank, "world": env.world_size, "held_mib": held / 2**20, "peak_rss_mib": rss / 2**20}
    print("RESULT " + json.dumps(rec), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(f"{'FSDP degree':>11} {'EP':>3} {'rank':>4} {'params+grads+Adam held (MiB)':>29} {'peak RSS (MiB)':>15}")
    for n in args.nprocs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--ep", str(args.ep if n > 1 else 1)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        recs = sorted((json.loads(l[7:]) for l in out.stdout.splitlines() if l.startswith("RESULT ")),
                      key=lambda r: r["rank"])
        for r in recs:
            print(f"{n:>11} {args.ep if n > 1 else 1:>3} {r['rank']:>4} {r['held_mib']:>29.1f} {r['peak_rss_mib']:>15.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
