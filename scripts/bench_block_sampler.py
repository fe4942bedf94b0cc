#!/usr/bin/env python
"""Block-diffusion sampling speed with and without the KV cache of committed blocks.

    python scripts/bench_block_sampler.py                       # debug model, random weights
    python scripts/bench_block_sampler.py --checkpoint outputs/block/checkpoint --model debug

Generates --prompts prompts x --gen-length tokens with block size --block-size (steps = gen
length: one commit per step, at temperature 0), once with the cache (each step forwards one
block) and once without (each step re-runs the whole prefix under block_causal_mask); prints
tokens/s and NFE for both, the speedup, whether the tokens agree, and the CPU/GPU."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from rnd1.diffusion.objective import get_objective
from rnd1.generate import diffusion_generate


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="a trained model (default: the debug preset, random weights)")
    ap.add_argument("--model", default="debug", help="preset (or HF config) to build / read the checkpoint with")
    ap.add_argument("--objective", choices=["block_a2d", "block_mdlm"], default="",
                    help="default: the checkpoint's (block_a2d for random weights)")
    ap.add_argument("--block-size", type=int, default=0,
                    help="default: the checkpoint's recorded block size (32 for random weights)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-length", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=0, help="default: the gen length")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up run (the last is shown)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from rnd1.checkpoint.load import load_for_inference, objective_for

        objective = objective_for(args.checkpoint, args.objective, args.block_size)
        if not hasattr(objective, "block_size"):
            raise SystemExit(f"{args.checkpoint} is a {objective.name} model, not block diffusion")
        model = load_for_inference(args.checkpoint, args.model, objective)
    else:
        from rnd1.model.config import get_preset
        from rnd1.model.qwen3 import build_model

        objective = get_objective(args.objective or "block_a2d", block_size=args.block_size or 32)
        model = build_model(get_preset(args.model), seed=0, attention_mode=objective.attention)
    model = model.to(args.device).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, min(cfg.vocab_size, 256), (args.prompts, args.prompt_length), generator=g).tolist()
    kw = dict(gen_length=args.gen_length, steps=args.steps or args.gen_length, mask_id=cfg.mask_token_id,
              objective=objective)
    res = {}
    for cache in (True, False):  # the first run of each warms up its shapes (CPU kernels are built per shape)
        for _ in range(args.repeats + 1):
            res[cache] = diffusion_generate(model, prompts, kv_cache=cache, **kw)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU: {_cpu_model()}"
    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model {args.checkpoint or args.model + ' (random weights)'}, {objective.name} block {objective.block_size}, "
          f"{args.prompts} prompts x {args.prompt_length} prompt + {args.gen_length} generated tokens, "
          f"{kw['steps']} steps")
    for cache in (True, False):
        o = res[cache]
        print(f"  {'kv cache   ' if cache else 'no kv cache'}  {o.tokens_per_s:9.1f} tokens/s  NFE {o.nfe:5d}  "
              f"{o.seconds:8.2f}s")
    speed = res[True].tokens_per_s / max(res[False].tokens_per_s, 1e-9)
    same = res[True].tokens == res[False].tokens
    print(f"speedup {speed:.2f}x; same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
