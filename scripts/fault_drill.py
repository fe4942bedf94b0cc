#!/usr/bin/env python
"""Fault drill: kill a training run with SIGKILL at random moments (some during checkpoint saves),
resume it each time, and check that the final weights and the loss log equal an uninterrupted
run's, bit for bit.

    python scripts/fault_drill.py --kills 5 --steps 60          # about a minute on 2 CPU cores

Prints the number of kills survived, how many landed while a checkpoint was being written, and
any difference; exits 1 if anything differs."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def train_cmd(run_dir: Path, data: Path, steps: int, interval: int) -> list[str]:
    return [sys.executable, "-m", "rnd1.train", "--config", str(REPO / "train_configs" / "debug_model.toml"),
            f"--job.dump_folder={run_dir}", f"--data.datasets={data}", "--data.prepare=", f"--training.steps={steps}",
            "--training.local_batch_size=4", "--training.seq_len=64", "--metrics.log_freq=1",
            "--job.print_config=false", f"--checkpoint.interval={interval}", "--checkpoint.keep_latest_k=2",
            "--eval.interval=0", "--metrics.peak_flops=1e12"]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in open(run_dir / "metrics.jsonl"):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a resumed run re-logs re-done steps: keep the last
    return out


def _safe_losses(run_dir: Path) -> dict[int, float]:
    """losses() of a log another process may be writing (a torn last line is skipped)."""
    out = {}
    for line in open(run_dir / "metrics.jsonl"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from rnd1.checkpoint.dcp import load_model_weights
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    model = build_model(get_preset("debug"), seed=12345)
    load_model_weights(model, run_dir / "checkpoint")
    return {k: v.clone() for k, v in model.state_dict().items()}


def drill(kills: int, steps: int, interval: int, seed: int, work: Path, log=print) -> dict:
    from rnd1.data.prepare import prepare

    data = prepare(["stdlib"], "byte", work / "data", val_fraction=0.05, workers=1, max_docs=200, quiet=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_dir = work / "reference"
    t0 = time.time()
    subprocess.run(train_cmd(ref_dir, data, steps, interval), check=True, capture_output=True, env=env)
    ref_time = time.time() - t0
    log(f"uninterrupted run: {steps} steps in {ref_time:.1f}s")

    rng = random.Random(seed)
    run_dir = work / "drilled"
    survived = during_save = 0
    ckpt = run_dir / "checkpoint"
    for k in range(kills):
        done = max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
        if done >= steps - 1:
            break
        target = rng.randint(done + 1, steps - 1)
        in_save = rng.random() < 0.5  # half the kills wait for a checkpoint save in progress
        proc = subprocess.Popen(train_cmd(run_dir, data, steps, interval), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        saving = False
        while proc.poll() is None:
            saving = ckpt.exists() and any(ckpt.glob(".step-*.tmp"))
            reached = (run_dir / "metrics.jsonl").exists() and max(_safe_losses(run_dir), default=0) >= target
            if (in_save and saving) or (not in_save and reached):
                break
            time.sleep(0.002 if in_save else 0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            survived += 1
            during_save += saving
            log(f"kill {k + 1}: SIGKILL after step {max(_safe_losses(run_dir), default=0)}"
                f"{' while a checkpoint was being written' if saving else ''}")
        else:
            log(f"kill {k + 1}: the run finished before the kill")
    subprocess.run(train_cmd(run_dir, data, steps, interval), check=True, capture_output=True, env=env)
    a, b = losses(ref_dir), losses(run_dir)
    loss_diffs = [s for s in a if a.get(s) != b.get(s)] + [s for s in b if s not in a]
    wa, wb = final_weights(ref_dir), final_weights(run_dir)
    weight_diffs = [k for k in wa if not torch.equal(wa[k], wb[k])]
    return {"kills": survived, "during_save": during_save, "loss_steps_differing": loss_diffs,
            "weights_differing": weight_diffs, "steps": len(b)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interval", type=int, default=5, help="checkpoint interval (steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = drill(args.kills, args.steps, args.interval, args.seed, Path(args.work or tmp))
    print(f"kills survived: {res['kills']} ({res['during_save']} during a checkpoint save); "
          f"loss log: {res['steps']} steps, {len(res['loss_steps_differing'])} differ; "
          f"final weights: {len(res['weights_differing'])} tensors differ")
    if res["loss_steps_differing"] or res["weights_differing"]:
        print(f"DIFFERENCES: steps {res['loss_steps_differing'][:10]}, tensors {res['weights_differing'][:10]}")
        return 1
    print("bit-identical to the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
