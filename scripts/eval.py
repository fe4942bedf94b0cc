#!/usr/bin/env python
"""Score a checkpoint on lm-evaluation-harness tasks and write a JSON + Markdown table shaped
like RND1's Table 4.1 (one row per model, one column per benchmark).

    python scripts/eval.py --checkpoint outputs/run/checkpoint --tokenizer /path/to/Qwen3 --preset rnd1_table41
    python scripts/eval.py --checkpoint HF_DIR --tasks arc_easy:0 hellaswag:0 --limit 100 --out results/
    python scripts/eval.py --checkpoint CKPT --tasks my_task:0 --include-path my_tasks/   # local task YAMLs

Needs the eval extra (pip install -e ".[eval]") and the benchmark datasets (downloaded by
lm-eval/datasets, or present in the local cache). Few-shot counts of the presets follow the
common setup of LLaDA / Dream style evaluations; check them against the paper before
quoting numbers side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PRESETS = {
    # RND1 Table 4.1 benchmarks: (lm-eval task, few-shot)
    "rnd1_table41": [("mmlu", 5), ("mmlu_redux", 0), ("bbh_fewshot", 3), ("arc_challenge", 0), ("race", 0),
                     ("gsm8k", 4), ("mbpp", 3)],
    # the 4B recipe study (section 3)
    "rnd1_4b_study": [("arc_easy", 0), ("arc_challenge", 0), ("hellaswag", 0), ("winogrande", 0), ("piqa", 0)],
}
METRIC_ORDER = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,flexible-extract",
                "exact_match,none", "pass_at_1,none", "pass@1,none")


def _window(text: str) -> str:
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a count >= 0")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--model", default="", help="preset / HF config for a DCP checkpoint without a recorded one")
    ap.add_argument("--objective", default="", help="a2d | mdlm | ar (default: recorded in the checkpoint)")
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--tasks", nargs="*", default=[], help="task:shots entries")
    ap.add_argument("--include-path", help="folder of extra task YAMLs")
    ap.add_argument("--limit", type=float, help="examples per task (for a quick look)")
    ap.add_argument("--mc-samples", type=int, default=32)
    ap.add_argument("--gen-steps", type=int, default=64)
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "none", "prefix", "dual"],
                    help="sampler cache (default auto: dual, block models their exact cache; docs/sampling.md)")
    ap.add_argument("--suffix-window", default="auto", type=_window,
                    help="DPad's window: masked positions past the block a forward sees (default auto: 32, block "
                         "models 0; 0: all)")
    rule = ap.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, help="parallel decoding: confidence threshold (the default, 0.9)")
    rule.add_argument("--factor", type=float, help="parallel decoding: Fast-dLLM's factor rule (e.g. 1.0)")
    rule.add_argument("--no-parallel", action="store_true", help="a fixed number of tokens per forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval_results")
    ap.add_argument("--name", default="", help="row name in the table (default: the checkpoint path)")
    args = ap.parse_args(argv)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        from rnd1.eval.harness import RND1HarnessLM
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tasks = list(PRESETS[args.preset]) if args.preset else []
    for t in args.tasks:
        name, _, shots = t.partition(":")
        tasks.append((name, int(shots or 0)))
    if not tasks:
        print("error: give --preset or --tasks", file=sys.stderr)
        return 2
    lm = RND1HarnessLM(checkpoint=args.checkpoint, tokenizer=args.tokenizer, model=args.model,
                       objective=args.objective, mc_samples=args.mc_samples, gen_steps=args.gen_steps,
                       kv_cache=args.kv_cache, factor=args.factor, seed=args.seed, threshold=args.threshold,
                       parallel=not args.no_parallel, suffix_window=args.suffix_window)
    tm = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    scores, raw = {}, {}
    for task, shots in tasks:
        res = simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=args.limit, task_manager=tm)
        results = res["results"]
        raw[task] = results
        main_metrics = results.get(task) or next(iter(results.values()))
        metric = next((m for m in METRIC_ORDER if m in main_metrics), None)
        scores[task] = (metric, main_metrics.get(metric), shots)
        print(f"{task} ({shots}-shot): {metric} = {main_metrics.get(metric)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or args.checkpoint
    record = lm.get_model_info()["rnd1_record"]
    (out / "results.json").write_text(json.dumps({"model": name, "record": record, "scores": {t: {"metric": m, "value": v, "shots": s}
                                                                          for t, (m, v, s) in scores.items()},
                                                  "raw": raw}, indent=1, default=str))
    header = "| model | " + " | ".join(f"{t} ({s}-shot)" for t, (_, _, s) in scores.items()) + " |"
    row = f"| {name} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for _, v, _ in scores.values()) + " |"
    md = "\n".join([header, "|" + "---|" * (len(scores) + 1), row]) + "\n"
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
