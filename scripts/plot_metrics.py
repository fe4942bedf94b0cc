#!/usr/bin/env python
"""Plot a run's loss (train and validation) and learning rates against tokens to a PNG.

    python scripts/plot_metrics.py outputs/debug_model [--out outputs/debug_model/metrics.png]

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
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.run) / "metrics.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
