#!/usr/bin/env python
"""Plot a run's loss (train and validation) and learning rates against tokens to a PNG; an RL
run's rewards, accuracy (rollouts and held-out), zero-advantage groups, completion length,
rollout speed and the rollouts' share of step time against steps.

    python scripts/plot_metrics.py outputs/debug_model [--out outputs/debug_model/metrics.png]
    python scripts/plot_metrics.py outputs/task/rl

Needs matplotlib (`pip install -e ".[plot]"`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rnd1.tools.runs import read_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder (job.dump_folder) containing metrics.jsonl")
    ap.add_argument("--out", help="PNG path (default: <run>/metrics.png)")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plotting needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    try:
        run = read_run(args.run)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig = _plot_rl(plt, run) if run.is_rl else _plot_training(plt, run)
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.run) / "metrics.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


def _plot_rl(plt, run):
    """Six panels against the step (rnd1/rl/trainer.py logs each of these every step)."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    ax = axes[0][0]
    x, mean = run.series("reward_mean", x="step")
    _, std = run.series("reward_std", x="step")
    ax.plot(x, mean, label="reward mean")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2,
                    label="+- std")
    ax.set(xlabel="step", ylabel="reward", title=f"{run.name}: reward")
    ax.legend()
    ax = axes[0][1]
    ax.plot(*run.series("accuracy", x="step"), label="rollouts (reward 1)")
    if run.val:
        xs, acc = run.series("val_accuracy", "val", x="step")
        _, err = run.series("val_accuracy_stderr", "val", x="step")
        ax.errorbar(xs, acc, yerr=err or None, fmt="o-", label="held-out, greedy")
    ax.set(xlabel="step", ylabel="accuracy", title="accuracy")
    ax.legend()
    for ax, key, title in ((axes[0][2], "zero_adv_frac", "groups with zero advantage"),
                           (axes[1][0], "completion_len", "completion length (tokens)"),
                           (axes[1][1], "rollout_tokens_per_s", "rollout tokens/s"),
                           (axes[1][2], "rollout_share", "rollouts' share of step time")):
        ax.plot(*run.series(key, x="step"))
        ax.set(xlabel="step", title=title)
    return fig


def _plot_training(plt, run):
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(*run.series("loss"), label="train")
    if run.val:
        ax_loss.plot(*run.series("val_loss", "val"), "o-", label="validation")
    ax_loss.set(xlabel="tokens", ylabel="loss", title=f"{run.name}: loss")
    ax_loss.legend()
    for key in sorted({k for r in run.train for k in r if k.startswith("lr/")}):
        ax_lr.plot(*run.series(key), label=key[3:])
    ax_lr.set(xlabel="tokens", ylabel="learning rate", title="learning rate per group", yscale="log")
    ax_lr.legend()
    return fig


if __name__ == "__main__":
    sys.exit(main())
