#!/usr/bin/env python
"""Critical-batch-size sweep by branched training (RND1 Fig. 3.2).

Branches one DCP checkpoint into runs that differ only in global batch size (tokens), with
learning rates scaled by sqrt(B / B0), warmup and evaluation aligned in tokens, and one token
budget. Runs them one after another here, or with --print-only prints the commands for a
cluster. Then collects validation loss against tokens, plots it, and reports the estimate.

    python scripts/cbs_sweep.py --config train_configs/debug_model.toml \\
        --checkpoint outputs/debug_model/checkpoint --batch-tokens 1024 2048 4096 8192 \\
        --token-budget 393216 --eval-tokens 65536 --out outputs/cbs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rnd1.config import ConfigError, load_config
from rnd1.tools.cbs import estimate_cbs, make_branches
from rnd1.tools.runs import read_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True, help="DCP checkpoint (step folder or checkpoint root)")
    ap.add_argument("--batch-tokens", type=int, nargs="+", required=True)
    ap.add_argument("--token-budget", type=int, required=True)
    ap.add_argument("--eval-tokens", type=int, required=True, help="validate every this many tokens")
    ap.add_argument("--base-batch-tokens", type=int, help="B0 of the sqrt rule (default: the smallest batch)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="linear warmup of every branch, in tokens (default: 1%% of --token-budget, the paper's)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="relative loss tolerance of the CBS rule")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--out", default="outputs/cbs")
    ap.add_argument("--print-only", action="store_true", help="print the torchrun commands and exit")
    ap.add_argument("overrides", nargs="*", help="extra --section.key=value overrides for every branch")
    args, extra = ap.parse_known_args(argv)
    extra = args.overrides + extra
    try:
        cfg = load_config(args.config, extra)
        branches = make_branches(
            checkpoint=args.checkpoint, batch_tokens=args.batch_tokens, token_budget=args.token_budget,
            base_batch_tokens=args.base_batch_tokens or min(args.batch_tokens),
            lr_attention=cfg.optimizer.lr_attention, lr_non_attention=cfg.optimizer.lr_non_attention,
            warmup_tokens=args.token_budget // 100 if args.warmup_tokens is None else args.warmup_tokens,
            eval_tokens=args.eval_tokens, seq_len=cfg.training.seq_len,
            out_dir=args.out)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmds = []
    for b in branches:
        launch = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "rnd1.train"] \
            if args.nproc > 1 else [sys.executable, "-m", "rnd1.train"]
        cmds.append(launch + ["--config", args.config] + extra + b.overrides + ["--job.print_config=false"])
    if args.print_only:
        for c in cmds:
            print(shlex.join(c))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for b, c in zip(branches, cmds):
        print(f"[cbs] {b.name}: {b.steps} steps x {b.batch_tokens} tokens, lr_attention {b.lr_attention:.3g}",
              flush=True)
        t0 = time.time()
        proc = subprocess.run(c, capture_output=True, text=True, env=os.environ.copy())
        timings[b.name] = time.time() - t0
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
    final, curves = {}, {}
    for b in branches:
        run = read_run(out / b.name, b.name)
        xs, ys = run.series("val_loss", "val")
        curves[b.batch_tokens] = list(zip(xs, ys))
        final[b.batch_tokens] = ys[-1]
    cbs, rule = estimate_cbs(final, args.tolerance)
    lines = ["| global batch (tokens) | steps | lr_attention | final val NELBO/token | wall time (s) |", "|---|---|---|---|---|"]
    for b in branches:
        lines.append(f"| {b.batch_tokens:,} | {b.steps} | {b.lr_attention:.3g} | {final[b.batch_tokens]:.4f} | "
                     f"{timings[b.name]:.0f} |")
    md = "\n".join(lines) + f"\n\nCritical batch size estimate: **{cbs:,} tokens** ({rule}).\n"
    print(md)
    (out / "cbs.md").write_text(md)
    (out / "cbs.json").write_text(json.dumps({"final_val_loss": final, "curves": curves, "cbs": cbs, "rule": rule}))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for B, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"B = {B:,} tokens")
        ax.set(xlabel="tokens", ylabel="validation NELBO per token", title=f"branched from {args.checkpoint}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "cbs.png", dpi=110)
        print(f"wrote {out / 'cbs.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
