#!/usr/bin/env python
"""RL against an equal-compute SFT control, on the task model (docs/experiments.md, "RL").

    python scripts/rl_study.py                          # 3 seeds, 100 RL steps each
    python scripts/rl_study.py --seeds 0 --rl-steps 20  # a quick look

For each seed, from the same starting checkpoint (the task model, stage 4):

1. RL: ``train_configs/task/task_rl.toml`` (diffu-GRPO, rewards from the number verifier on the
   training questions) for ``--rl-steps`` steps, without in-run validation; its wall-clock time,
   start-up included, is the budget;
2. the control: ``train_configs/task/task_sft_long.toml`` (the SFT the model was trained with,
   continued) for as many steps as fit that wall-clock time, from a probe of its start-up and
   step time;
3. both scored with ``scripts/eval_task.py`` on the same ``--questions`` held-out questions with
   the same sampler (greedy, the RL config's rollout settings), as is the starting model.

Writes ``<out>/study.json`` (every run's accuracy, time, steps and record) and prints the table:
mean over seeds with the standard error of that mean, beside each run's binomial standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RL_CONFIG = REPO / "train_configs" / "task" / "task_rl.toml"
SFT_CONFIG = REPO / "train_configs" / "task" / "task_sft_long.toml"


def _train(config: Path, run: Path, overrides: list[str]) -> float:
    """Run one training job to its end (or reuse a finished one); its wall-clock seconds."""
    done = run / "study_time.json"
    if done.is_file():
        return json.loads(done.read_text())["seconds"]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "rnd1.train", "--config", str(config), f"--job.dump_folder={run}",
           "--job.print_config=false", *overrides]
    if subprocess.run(cmd, cwd=REPO).returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed")
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def _last_checkpoint(run: Path) -> Path:
    steps = sorted((run / "checkpoint").glob("step-*"))
    return steps[-1]


def _evaluate(checkpoint: Path, out: Path, args) -> dict:
    res = out / "results.json"
    if not res.is_file():
        cmd = [sys.executable, str(REPO / "scripts" / "eval_task.py"), "--checkpoint", str(checkpoint),
               "--questions", args.questions, "--limit", str(args.limit), "--gen-length", "64", "--kv-cache", "dual",
               "--threshold", "0.9", "--out", str(out)]
        if subprocess.run(cmd, cwd=REPO).returncode:
            raise SystemExit(f"error: {' '.join(cmd)} failed")
    r = json.loads(res.read_text())
    return {"accuracy": r["accuracy"], "stderr": r["stderr"], "n": r["n"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="outputs/task/sft_long/checkpoint", help="the starting model")
    ap.add_argument("--questions", default="outputs/data/arith_task/heldout.jsonl")
    ap.add_argument("--sft-data", default="outputs/task/data/sft_byte", help="the tokenised SFT conversations")
    ap.add_argument("--limit", type=int, default=500, help="held-out questions scored")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rl-steps", type=int, default=100)
    ap.add_argument("--probe-steps", type=int, default=20, help="SFT steps timed to size the control")
    ap.add_argument("--out", default="outputs/rl_study")
    args, rl_overrides = ap.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = [f"--checkpoint.initial_load_path={args.checkpoint}"]
    sft_data = [f"--data.datasets=[\"{args.sft_data}\"]", "--data.prepare="]
    study = {"checkpoint": args.checkpoint, "rl_steps": args.rl_steps, "rl_overrides": rl_overrides,
             "base": _evaluate(Path(args.checkpoint), out / "eval_base", args), "runs": []}
    # the control's start-up and step time, from a probe: it gets the RL run's wall-clock time,
    # start-up included (the RL run starts up too)
    probe = _train(SFT_CONFIG, out / "sft_probe", start + sft_data + [f"--training.steps={args.probe_steps}",
                                                                         "--checkpoint.enable=false",
                                                                         "--eval.interval=0", "--metrics.log_freq=1"])
    times = [json.loads(line)["step_time_s"] for line in (out / "sft_probe" / "metrics.jsonl").read_text().splitlines()
             if "step_time_s" in line]
    per_step = statistics.median(times[1:])
    startup = probe - sum(times)
    study["sft_probe"] = {"seconds": probe, "steps": args.probe_steps, "per_step_s": per_step, "startup_s": startup}
    for seed in args.seeds:
        rl_run, sft_run = out / f"rl_seed{seed}", out / f"sft_seed{seed}"
        rl_s = _train(RL_CONFIG, rl_run, start + [f"--training.seed={seed}", f"--training.steps={args.rl_steps}",
                                                  f"--checkpoint.interval={args.rl_steps}", "--eval.interval=0",
                                                  *rl_overrides])
        sft_steps = max(1, round((rl_s - startup) / per_step))
        sft_s = _train(SFT_CONFIG, sft_run, start + sft_data + [f"--training.seed={seed}",
                                                                f"--training.steps={sft_steps}",
                                                                f"--checkpoint.interval={sft_steps}",
                                                                "--eval.interval=0"])
        rl_metrics = [json.loads(line) for line in (rl_run / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in rl_metrics if "reward_mean" in m]
        share = statistics.mean(m["rollout_share"] for m in steps[1:] or steps)  # step 1 holds start-up work
        study["runs"].append({
            "seed": seed,
            "rl": {"seconds": rl_s, "steps": args.rl_steps, "rollout_share": share,
                   "reward_first10": statistics.mean(m["reward_mean"] for m in steps[:10]),
                   "reward_last10": statistics.mean(m["reward_mean"] for m in steps[-10:]),
                   **_evaluate(_last_checkpoint(rl_run), out / f"eval_rl_seed{seed}", args)},
            "sft": {"seconds": sft_s, "steps": sft_steps,
                    **_evaluate(_last_checkpoint(sft_run), out / f"eval_sft_seed{seed}", args)}})
        (out / "study.json").write_text(json.dumps(study, indent=1))
    _report(study)
    return 0


def _report(study: dict) -> None:
    base = study["base"]
    print(f"start: {base['accuracy']:.3f} +- {base['stderr']:.3f} (n={base['n']})")
    print("| seed | RL steps | RL s | rollout share | RL accuracy | SFT steps | SFT s | SFT accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in study["runs"]:
        a, b = r["rl"], r["sft"]
        print(f"| {r['seed']} | {a['steps']} | {a['seconds']:.0f} | {a['rollout_share']:.0%} | "
              f"{a['accuracy']:.3f} +- {a['stderr']:.3f} | {b['steps']} | {b['seconds']:.0f} | "
              f"{b['accuracy']:.3f} +- {b['stderr']:.3f} |")
    for arm in ("rl", "sft"):
        accs = [r[arm]["accuracy"] for r in study["runs"]]
        se = statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else float("nan")
        print(f"{arm}: mean {statistics.mean(accs):.3f} +- {se:.3f} (s.e. over {len(accs)} seeds)")
    gaps = [r["rl"]["accuracy"] - r["sft"]["accuracy"] for r in study["runs"]]
    se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else float("nan")
    print(f"RL - SFT: {statistics.mean(gaps) * 100:+.1f} points +- {se * 100:.1f}")


if __name__ == "__main__":
    sys.exit(main())
