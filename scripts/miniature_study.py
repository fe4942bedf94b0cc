#!/usr/bin/env python
"""The paper's experiments in miniature, on CPU: AR-pretrain the debug MoE on the stdlib corpus,
convert that checkpoint with random init / grafting / SCP for the same token budget
(Fig. 3.1), then run a small critical-batch-size sweep branched from the SCP checkpoint
(Fig. 3.2). Writes plots, tables and timings to --out (docs/miniature/ for the recorded run).

    python scripts/miniature_study.py --out docs/miniature            # ~15 minutes on 2 cores
    python scripts/miniature_study.py --out /tmp/mini --ar-steps 4 --convert-steps 4 --cbs-budget 8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "train_configs"


def run(cmd: list[str], log) -> float:
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    dt = time.time() - t0
    log(f"  {dt:6.1f}s  {' '.join(cmd[2:])}")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/miniature")
    ap.add_argument("--runs", default="outputs/miniature", help="where the run folders go")
    ap.add_argument("--data", default="outputs/data/stdlib_byte")
    ap.add_argument("--ar-steps", type=int, default=400)
    ap.add_argument("--convert-steps", type=int, default=300)
    ap.add_argument("--grafting-fraction", type=float, default=0.5, help="share of the conversion kept causal")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--cbs-batch-seqs", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--cbs-budget", type=int, default=393216, help="tokens per CBS branch")
    args = ap.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    py = [sys.executable, "-m"]
    tokens_per_step = args.seq_len * args.batch
    common = [f"--data.datasets={args.data}", "--data.prepare=stdlib", f"--training.seq_len={args.seq_len}",
              f"--training.local_batch_size={args.batch}", "--job.print_config=false", "--metrics.log_freq=5"]
    timings = {}
    log("## AR pretraining")
    timings["ar"] = run(py + ["rnd1.train", "--config", str(CFG / "debug_ar.toml"), *common,
                              f"--job.dump_folder={runs}/ar", f"--training.steps={args.ar_steps}",
                              f"--eval.interval={max(args.ar_steps // 4, 1)}"], log)
    ar_ckpt = f"{runs}/ar/checkpoint"
    conv = [*common, f"--training.steps={args.convert_steps}", f"--eval.interval={max(args.convert_steps // 6, 1)}",
            "--checkpoint.interval=0", "--objective.name=a2d"]
    graft_tokens = int(args.grafting_fraction * args.convert_steps) * tokens_per_step
    log("## Conversions (same token budget)")
    timings["scp"] = run(py + ["rnd1.train", "--config", str(CFG / "debug_model.toml"), *conv,
                               f"--job.dump_folder={runs}/scp", "--model.init=pretrained",
                               f"--checkpoint.initial_load_path={ar_ckpt}", "--objective.attention_recipe=scp"], log)
    timings["grafting"] = run(py + ["rnd1.train", "--config", str(CFG / "debug_model.toml"), *conv,
                                    f"--job.dump_folder={runs}/grafting", "--model.init=pretrained",
                                    f"--checkpoint.initial_load_path={ar_ckpt}", "--objective.attention_recipe=grafting",
                                    f"--objective.grafting_tokens={graft_tokens}"], log)
    timings["random"] = run(py + ["rnd1.train", "--config", str(CFG / "debug_model.toml"), *conv,
                                  f"--job.dump_folder={runs}/random", "--model.init=random",
                                  "--objective.attention_recipe=scp"], log)
    run([sys.executable, str(REPO / "scripts/compare_runs.py"), f"{runs}/random", f"{runs}/grafting", f"{runs}/scp",
         "--out", str(out / "recipes.png"), "--md", str(out / "recipes.md")], log)

    log("## Critical batch size sweep (branched from the SCP checkpoint)")
    batch_tokens = [s * args.seq_len for s in args.cbs_batch_seqs]
    eval_tokens = max(batch_tokens) * max(1, args.cbs_budget // max(batch_tokens) // 4)
    timings["cbs"] = run([sys.executable, str(REPO / "scripts/cbs_sweep.py"), "--config",
                          str(CFG / "debug_model.toml"), "--checkpoint", f"{runs}/scp/checkpoint",
                          "--batch-tokens", *map(str, batch_tokens), "--token-budget", str(args.cbs_budget),
                          "--eval-tokens", str(eval_tokens), "--out", f"{runs}/cbs", "--",
                          f"--data.datasets={args.data}", f"--training.seq_len={args.seq_len}",
                          f"--training.local_batch_size={min(args.cbs_batch_seqs)}", "--metrics.log_freq=5"], log)
    for f in ("cbs.md", "cbs.png", "cbs.json"):
        if (runs / "cbs" / f).exists():
            (out / f).write_bytes((runs / "cbs" / f).read_bytes())
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    (out / "commands.log").write_text("\n".join(log_lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
