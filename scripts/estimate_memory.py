"""Memory and communication per rank of a config at its full size, without a GPU.

    python scripts/estimate_memory.py train_configs/qwen3_30b_a3b_rnd1.toml --world-size 64
    python scripts/estimate_memory.py CONFIG [--world-size N] [--rank R] [--device-memory 80GiB] [--imbalance 1.25]
                                      [--section.key=value ...]

Builds the model at the configured size with fake tensors (nothing is allocated), applies the
trainer's parallelism under a fake process group of N ranks, runs one training step and prints
rank R's memory (rank 0 by default) by what it holds, the peak against the device, the largest micro-batch that
fits and the bytes each collective moves (rnd1/tools/memory_estimate.py says how). The world
size and device memory default to the config's [hardware] section. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--world-size", type=int, default=None, help="ranks (default: hardware.world_size)")
    ap.add_argument("--device-memory", default=None, help="e.g. 80GiB (default: hardware.device_memory)")
    ap.add_argument("--rank", type=int, default=0, help="the rank to count (ranks differ only in uneven shards "
                    "and, with --imbalance, in the rows they receive)")
    ap.add_argument("--imbalance", type=float, default=1.0,
                    help="expert-parallel routing: this rank receives this times the balanced share (>= 1)")
    ap.add_argument("--headroom", type=float, default=None, help="fraction of device memory kept free (0.10)")
    args, overrides = ap.parse_known_args(argv)

    from rnd1.config import ConfigError, load_config
    from rnd1.tools.memory_estimate import DEFAULT_HEADROOM, EstimateError, estimate, format_estimate
    from rnd1.tools.sizes import parse_bytes

    try:
        cfg = load_config(args.config, overrides)
        world = args.world_size if args.world_size is not None else cfg.hardware.world_size
        if world <= 0:
            raise EstimateError(f"{args.config}: no world size: pass --world-size N or set hardware.world_size")
        if not 0 <= args.rank < world:
            raise EstimateError(f"--rank {args.rank}: must be in [0, {world})")
        try:
            memory = parse_bytes(args.device_memory) if args.device_memory is not None else None
        except ValueError as e:
            raise EstimateError(f"--device-memory {e}") from e
        warnings.filterwarnings("ignore")  # torch's deprecation notes about mesh slicing: not the user's
        t0 = time.perf_counter()
        est = estimate(cfg, world_size=world, rank=args.rank, config_name=args.config, imbalance=args.imbalance,
                       device_memory=memory, headroom=DEFAULT_HEADROOM if args.headroom is None else args.headroom)
    except (ConfigError, EstimateError, OSError) as e:
        print(f"estimate_memory: {e}", file=sys.stderr)
        return 2
    print(format_estimate(est))
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
