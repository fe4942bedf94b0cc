#!/usr/bin/env python
"""The sampler's speed / quality frontier on the task model: cache mode x decoding rule x gen
length, each scored on the held-out arithmetic questions.

    python scripts/bench_sampler.py --checkpoint outputs/task/sft_long/checkpoint --out bench_sampler/
    python scripts/bench_sampler.py --checkpoint CKPT --gen-lengths 256 --settings none/fixed dual/factor

Settings are ``CACHE/RULE[/K][/wW]``: CACHE in none, prefix, dual (``rnd1.model.kv_cache``); RULE in
``fixed`` (one token per forward: ``steps`` = gen length, today's sampler when CACHE is none),
``threshold`` (commit every position with confidence > ``--threshold``) or ``factor``
(Fast-dLLM's factor rule with ``--factor``); K, for a cached setting, recomputes the cache every
K steps within a block as well as at its start (``cache_refresh``; 0, the default: only at block
starts); W forwards only W masked positions past the block (DPad's sliding window,
``suffix_window``; none: all of them). Semi-autoregressive blocks of ``--block-length``;
greedy; a row stops at EOS. Per (gen length, setting) the table gives tokens/s, tokens per
forward, accuracy with its standard error over ``--limit`` questions, and the speed-up and
accuracy change against ``none/fixed`` of the same gen length (measured in the same run), the
change with its paired standard error (both settings answer the same questions).
Before each setting is timed, its first batch runs once untimed: a new shape's first forward
builds oneDNN primitives and would otherwise charge the setting that meets it first.

``--out`` gets ``results.json`` (every number and the record: sampler settings, seeds, model
hash, packages, device) and ``frontier.png`` (accuracy against tokens/s, one colour per gen
length; needs matplotlib). Timings include only the sampler's calls, on this process's threads.
``--append`` adds this run's gen lengths to an existing ``results.json`` of the same model (a
long gen length can then take fewer settings): a gen length is always measured whole in one run,
so its speed-ups still compare settings of one run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_task import evaluate, load_task_model  # noqa: E402

CACHES = ("none", "prefix", "dual")
RULES = ("fixed", "threshold", "factor")
BASELINE = "none/fixed"


def _parts(text: str) -> "tuple[str, str, int, int] | None":
    """``CACHE/RULE[/K][/wW]`` -> (cache, rule, cache refresh K, suffix window W), or None."""
    cache, _, rest = text.partition("/")
    rule, *extra = rest.split("/")
    refresh = window = 0
    for part in extra:
        if part.isdigit() and int(part) >= 1 and not refresh and not window and cache != "none":
            refresh = int(part)
        elif part[:1] == "w" and part[1:].isdigit() and int(part[1:]) >= 1 and not window:
            window = int(part[1:])
        else:
            return None
    return (cache, rule, refresh, window) if cache in CACHES and rule in RULES else None


def parse_setting(text: str) -> str:
    """A setting as written, once it parses (``_parts``)."""
    if _parts(text) is None:
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected CACHE/RULE, then optionally /K (K >= 1: "
                                         f"refresh the cache every K steps; prefix or dual only) and /wW (W >= 1: "
                                         f"DPad's suffix window), with CACHE in {', '.join(CACHES)} and RULE in "
                                         f"{', '.join(RULES)}")
    return text


def settings_for(setting: str, gen_length: int, args) -> dict:
    cache, rule, refresh, window = _parts(setting)
    return {"gen_length": gen_length, "steps": gen_length, "block_length": min(args.block_length, gen_length),
            "strategy": "confidence", "kv_cache": cache, "cache_refresh": refresh, "suffix_window": window,
            "threshold": args.threshold if rule == "threshold" else None,
            "factor": args.factor if rule == "factor" else None, "temperature": 0.0}


def paired_stderr(right: str, base: str) -> float:
    """Standard error of an accuracy change measured on the SAME questions: sqrt(var(d) / n) with
    d_i = correct_i - baseline_correct_i in {-1, 0, 1}. Much smaller than either accuracy's own
    standard error when the two settings agree on most questions, which is what decides whether
    a change of a few points is the sampler's or the draw of questions."""
    d = [int(a) - int(b) for a, b in zip(right, base, strict=True)]
    n = len(d)
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1) / n)


def draw(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("frontier.png skipped: plotting needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, G in enumerate(sorted({r["gen_length"] for r in rows})):
        pts = [r for r in rows if r["gen_length"] == G]
        ax.errorbar([r["tokens_per_s"] for r in pts], [100 * r["accuracy"] for r in pts],
                    yerr=[100 * r["stderr"] for r in pts], fmt="o", color=f"C{k}", label=f"gen length {G}", capsize=3)
        for r in pts:
            ax.annotate(r["setting"], (r["tokens_per_s"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (log)")
    ax.set_ylabel("held-out exact match, % (+- 1 s.e.)")
    ax.set_title("sampler frontier on the task model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--questions", default="outputs/data/arith_task/heldout.jsonl")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--gen-lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--settings", type=parse_setting, nargs="+",
                    default=[f"{c}/{r}" for c in CACHES for r in RULES])
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--factor", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder for results.json and frontier.png")
    ap.add_argument("--append", action="store_true",
                    help="add these gen lengths to --out's results.json (same model) instead of replacing it")
    args = ap.parse_args(argv)
    if args.append and not args.out:
        print("error: --append needs --out (the folder whose results.json it adds to)", file=sys.stderr)
        return 2
    try:
        import torch

        from rnd1.eval.record import evaluation_record

        rows, tok, model = load_task_model(args.checkpoint, args.questions, args.limit)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = list(dict.fromkeys(args.settings))
    if BASELINE in settings:  # the baseline first, so every later line can compare with it
        settings.remove(BASELINE)
        settings.insert(0, BASELINE)
    torch.manual_seed(args.seed)
    record = evaluation_record(model=model, checkpoint=args.checkpoint,
                               sampler={"block_length": args.block_length, "threshold": args.threshold,
                                        "factor": args.factor, "strategy": "confidence", "temperature": 0.0},
                               seeds={"sampler": args.seed, "torch": args.seed},
                               command=["scripts/bench_sampler.py", *(argv if argv is not None else sys.argv[1:])])
    results, earlier = [], []
    if args.append:
        old = Path(args.out or ".") / "results.json"
        try:
            saved = json.loads(old.read_text())
        except (OSError, ValueError) as e:
            print(f"error: --append: cannot read {old}: {e}", file=sys.stderr)
            return 2
        if saved["record"]["model_hash"] != record["model_hash"]:
            print(f"error: --append: {old} measured model {saved['record']['model_hash']}, this checkpoint is "
                  f"{record['model_hash']}", file=sys.stderr)
            return 2
        # the gen lengths measured now are measured whole: earlier rows of them are replaced
        earlier = [r for r in saved["results"] if r["gen_length"] not in args.gen_lengths]
        record = {**record, "earlier_runs": saved["record"].get("earlier_runs", []) + [saved["record"]]}
    print(f"# {record['device']}; torch {record['packages'].get('torch')}; model {record['model_hash']}; "
          f"{len(rows)} questions")
    print(f"{'gen':>5} {'setting':<16} {'tokens/s':>9} {'tok/fwd':>7} {'accuracy':>16} {'speed-up':>8} "
          f"{'d acc (paired)':>12} {'seconds':>8}")
    for G in args.gen_lengths:
        base = None
        for name in settings:
            s = settings_for(name, G, args)
            evaluate(model, tok, rows[:args.batch_size], s, batch_size=args.batch_size, seed=args.seed)  # warm-up
            r = evaluate(model, tok, rows, s, batch_size=args.batch_size, seed=args.seed)
            r["correct"] = "".join("1" if x["correct"] else "0" for x in r["replies"])  # per question, in order
            if name == BASELINE:
                base = r
            row = {"gen_length": G, "setting": name, "sampler": s,
                   **{k: r[k] for k in ("n", "accuracy", "stderr", "tokens_per_s", "tokens_per_forward", "nfe",
                                        "seconds")},
                   "speedup": r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                   "accuracy_change": r["accuracy"] - base["accuracy"] if base else None,
                   "accuracy_change_stderr": paired_stderr(r["correct"], base["correct"]) if base else None,
                   "correct": r["correct"]}
            results.append(row)
            sp = f"{row['speedup']:.2f}x" if base else "-"
            da = f"{100 * row['accuracy_change']:+.1f} +- {100 * row['accuracy_change_stderr']:.1f}" if base else "-"
            print(f"{G:>5} {name:<16} {r['tokens_per_s']:>9.1f} {r['tokens_per_forward']:>7.2f} "
                  f"{100 * r['accuracy']:>7.1f} +- {100 * r['stderr']:>4.1f} % {sp:>8} {da:>12} {r['seconds']:>8.1f}",
                  flush=True)
            if args.out:  # after every line: a long sweep stopped early keeps what it measured
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(json.dumps({"record": record, "results": earlier + results},
                                                               indent=1))
    if args.out:
        drawn = draw(earlier + results, Path(args.out) / "frontier.png")
        print(f"wrote {Path(args.out) / 'results.json'}" + (f" and {Path(args.out) / 'frontier.png'}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
