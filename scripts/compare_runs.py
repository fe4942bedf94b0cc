#!/usr/bin/env python
"""Compare runs: train and validation loss against tokens in one PNG, and a Markdown table of
the final values.

    python scripts/compare_runs.py outputs/recipes/* --out docs/compare.png --md docs/compare.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rnd1.tools.runs import read_run


def table(runs) -> str:
    """Final train loss and validation NELBO per token (with its perplexity bound; the exact
    perplexity for an AR run) of each run."""
    lines = ["| run | tokens | final train loss | final val NELBO/token | PPL bound |", "|---|---|---|---|---|"]
    for r in runs:
        toks = r.train[-1]["tokens"] if r.train else 0
        val = r.final("val_loss", "val")
        train = r.final("loss")
        ppl = r.final("val_ppl_bound", "val") or r.final("val_ppl", "val")
        lines.append(f"| {r.name} | {toks:,} | {train:.4f} | {val:.4f} | {ppl:,.2f} |" if val is not None and ppl
                     else f"| {r.name} | {toks:,} | {train:.4f} | {'-' if val is None else f'{val:.4f}'} | - |")
    return "\n".join(lines)


def plot(runs, out: Path, smooth: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        x, y = r.series("loss")
        if smooth > 1 and len(y) > smooth:
            y = [sum(y[max(0, i - smooth + 1):i + 1]) / len(y[max(0, i - smooth + 1):i + 1]) for i in range(len(y))]
        a.plot(x, y, label=r.name)
        if r.val:
            b.plot(*r.series("val_loss", "val"), "o-", label=r.name)
    a.set(xlabel="tokens", ylabel=f"train loss (moving average of {smooth})", title="train loss")
    b.set(xlabel="tokens", ylabel="validation NELBO per token (fixed t quadrature)", title="validation")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders (job.dump_folder)")
    ap.add_argument("--out", default="compare.png")
    ap.add_argument("--md", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    try:
        runs = [read_run(p) for p in args.runs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = table(runs)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    try:
        plot(runs, Path(args.out))
        print(f"wrote {args.out}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
