#!/usr/bin/env python
"""Train the task model: an AR base, its A2D conversion, diffusion SFT (packed, then at long gen
lengths), on the arithmetic task.

    python scripts/train_task_model.py                 # about 30 minutes on 2 idle CPU cores
    python scripts/eval_task.py --checkpoint outputs/task/sft_long/checkpoint

The recipe of ``docs/task_model.md`` in one command: write the task's data
(``scripts/make_chat_data.py --task``: the held-out questions appear in no training file), then
four ordinary training runs, each from the previous one's checkpoint:

1. ``train_configs/task/task_ar.toml``: the debug MoE learns the equations autoregressively;
2. ``task_a2d.toml``: A2D conversion with SCP (bidirectional attention from step 0);
3. ``task_sft.toml``: diffusion SFT on chat conversations about the training questions, packed
   into 256-token windows (cheap: no compute on padding);
4. ``task_sft_long.toml``: the same SFT in 1,152-token windows, each conversation followed by an
   EOS tail of its own (log-uniform below 1,024), so the model answers into the long masked
   region of gen lengths up to 1,024.

A finished stage is reused (its run folder holds a checkpoint at its last step), so an
interrupted recipe resumes where it stopped. The model the sampler benchmarks measure
(``scripts/bench_sampler.py``) is stage 4's checkpoint. Further arguments are config overrides
given to every stage (``--training.steps=20`` for a quick look).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("task_ar.toml", "task_a2d.toml", "task_sft.toml", "task_sft_long.toml")


def _last_step(run: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run / "checkpoint").glob("step-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/task", help="folder of the four runs (default: outputs/task)")
    ap.add_argument("--data", default="outputs/data/arith_task", help="folder of the task's files")
    args, overrides = ap.parse_known_args(argv)
    from rnd1.config import ConfigError, load_config

    data, out = Path(args.data), Path(args.out)
    if not (data / "heldout.jsonl").is_file() or not (data / "rl.jsonl").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_chat_data.py"), "--task", "--out", str(data)],
                       check=True)
    previous = None
    t_all = time.perf_counter()
    for k, name in enumerate(STAGES, 1):
        config = REPO / "train_configs" / "task" / name
        try:
            cfg = load_config(config, overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        run = out / Path(cfg.job.dump_folder).name
        steps = cfg.training.steps
        source = {"task_ar.toml": f"{data}/pretrain.jsonl", "task_a2d.toml": f"{data}/pretrain.jsonl",
                  "task_sft.toml": f"chat:{data}/sft.jsonl", "task_sft_long.toml": f"chat:{data}/sft.jsonl"}[name]
        dataset = out / "data" / ("sft_byte" if name.startswith("task_sft") else "pretrain_byte")
        if _last_step(run) >= steps:
            print(f"[task] {k}/{len(STAGES)} {name}: {run} is finished, reused", flush=True)
        else:
            cmd = [sys.executable, "-m", "rnd1.train", "--config", str(config), f"--job.dump_folder={run}",
                   f"--data.datasets=[\"{dataset}\"]", f"--data.prepare={source}", "--job.print_config=false",
                   *overrides]
            if previous is not None:
                cmd.append(f"--checkpoint.initial_load_path={previous / 'checkpoint'}")
            start = "random init" if previous is None else previous / "checkpoint"
            print(f"[task] {k}/{len(STAGES)} {name}: {steps} steps from {start} -> {run}", flush=True)
            t0 = time.perf_counter()
            if subprocess.run(cmd, cwd=REPO).returncode:
                return 1
            print(f"[task] {k}/{len(STAGES)} {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        previous = run
    print(f"[task] the task model: {previous / 'checkpoint'} ({time.perf_counter() - t_all:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
