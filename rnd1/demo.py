"""The project's main job in miniature, on CPU: turn an AR model into a diffusion LM.

``python -m rnd1.demo`` (the README's first command) does what the paper does, at the size of
the ``debug`` MoE (1.9M parameters) on byte-level tokens of the Python standard library:

1. **AR base.** Without pretrained weights on a fresh machine, train one: ``debug_ar.toml``
   (next-token prediction, causal attention). Cached: a later demo reuses the finished run.
2. **SCP conversion.** ``debug_model.toml`` from the AR checkpoint: A2D, bidirectional attention
   from step 0 (Simple Continual Pretraining), with RND1's retention split of the learning rate:
   attention 2e-3 (it must learn to read both directions), everything else 5e-4 (the MLPs and
   experts hold what the AR base knows). On one machine, once, from the same AR base: 2e-3
   everywhere gave 6/128 words and a bound of 2.7481, the split 7/128 and 2.7142.
3. **The baseline.** The same config and budget from random weights (the paper's random-init
   baseline), so the value of starting from an AR model is visible.
4. **Samples**: every model finishes the same 128 held-out words of code (``self.ass`` ->
   ``ertEqual``; ``rnd1.eval.word_completion`` says why words and not whole lines); the demo
   prints a few, evenly spaced, and how many each model got right.
5. **The bound.** Held-out NELBO per token and exp(NELBO) >= perplexity of both conversions on
   the same validation windows, grid and seeds (``rnd1.eval.perplexity``), beside the AR base's
   exact NLL on the same positions.

Each stage is an ordinary ``python -m rnd1.train`` run whose folder stays under ``--out`` for
plots (``scripts/compare_runs.py``) and further training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_configs"
RETENTION_LR = ("--optimizer.lr_attention=2e-3", "--optimizer.lr_non_attention=5e-4")  # both conversions
WORD_CONTEXT = 128  # characters (bytes) of held-out code before each word's cut
WORD_TOKENS = 12  # tokens generated per word: the rest of most identifiers fits
SHOWN = 8  # word completions printed, evenly spaced over the scored ones


def _stage(config: str, run: Path, data: Path, steps: int, *extra: str, after: str = "") -> None:
    """Train one stage into ``run``, or reuse it. ``run/demo.json`` records the stage's settings
    (config, steps, overrides and, for a conversion, its AR base: ``after``) and whether it
    finished. The same settings: a finished stage is reused, an interrupted one resumed (the
    trainer resumes from its newest checkpoint). A folder holding anything else (an older demo's
    run with other steps or learning rates, another job) is refused: it would pass as this one."""
    settings = [config, str(steps), *extra, after]
    record = run / "demo.json"
    state = json.loads(record.read_text()) if record.is_file() else None
    if state is not None and state["settings"] == settings and state["finished"]:
        print(f"[demo] {run} already holds this stage, finished: reused", flush=True)
        return
    if (state is not None and state["settings"] != settings) or (state is None and run.exists() and any(run.iterdir())):
        print(f"error: {run} holds a run with other settings than this demo's (an older demo, or another "
              f"job): remove it, or give --out another folder", file=sys.stderr)
        raise SystemExit(2)
    run.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"settings": settings, "finished": False}))
    _train(config, run, data, steps, *extra)
    record.write_text(json.dumps({"settings": settings, "finished": True}))


def _train(config: str, run: Path, data: Path, steps: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "rnd1.train", "--config", str(CONFIGS / config), f"--job.dump_folder={run}",
           f"--data.datasets=[\"{data}\"]", "--data.prepare=stdlib", f"--training.steps={steps}", f"--metrics.log_freq={max(steps // 4, 1)}",
           "--eval.interval=0", f"--checkpoint.interval={steps}", "--job.print_config=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.returncode)
    print(f"[demo] {run.name}: {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs", help="folder for the runs and the data (default: outputs)")
    ap.add_argument("--ar-steps", type=int, default=450, help="AR pretraining steps (4,096 tokens each)")
    ap.add_argument("--steps", type=int, default=100, help="conversion steps, SCP and random init alike")
    ap.add_argument("--eval-sequences", type=int, default=64, help="validation windows of 256 tokens for the bound")
    ap.add_argument("--words", type=int, default=128, help="held-out words each model finishes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = out / "data" / "stdlib_byte"
    ar, scp, rnd = out / "debug_ar", out / "demo_scp", out / "demo_random"
    t0 = time.perf_counter()

    print("[demo] 1/5 the AR base (debug MoE, next-token prediction)", flush=True)
    _stage("debug_ar.toml", ar, data, args.ar_steps)
    print("[demo] 2/5 SCP conversion: A2D, bidirectional attention from step 0, from the AR checkpoint; "
          "learning rates: attention 2e-3, the rest 5e-4 (RND1's retention)", flush=True)
    _stage("debug_model.toml", scp, data, args.steps, *RETENTION_LR,
           f"--checkpoint.initial_load_path={ar / 'checkpoint'}", after=f"AR base of {args.ar_steps} steps")
    print("[demo] 3/5 the baseline: the same conversion from random weights", flush=True)
    _stage("debug_model.toml", rnd, data, args.steps, *RETENTION_LR)

    import numpy as np

    from rnd1.checkpoint.load import load_for_inference
    from rnd1.data.shards import TokenDataset
    from rnd1.data.tokenizer import load_tokenizer
    from rnd1.diffusion.objective import get_objective
    from rnd1.eval.perplexity import heldout_nelbo
    from rnd1.eval.word_completion import completed_word, held_out_words, score
    from rnd1.generate import ar_generate, diffusion_generate

    tok = load_tokenizer("byte")
    models = {"scp": load_for_inference(scp / "checkpoint", objective="a2d").eval(),
              "random": load_for_inference(rnd / "checkpoint", objective="a2d").eval(),
              "ar": load_for_inference(ar / "checkpoint", objective="ar").eval()}
    split = TokenDataset(data).split("val")
    documents = tok.decode(split.slice(0, len(split)).tolist()).split(tok.decode([tok.eos_id]))
    items = held_out_words(documents, args.words, context=WORD_CONTEXT)
    print(f"[demo] 4/5 finish the word: {len(items)} held-out identifiers, each cut 3 letters in (greedy; "
          f"diffusion: {WORD_TOKENS} masked positions, blocks of 4, one per forward)", flush=True)
    prompts = [tok.encode(it.prompt)[-WORD_CONTEXT:] for it in items]  # one length: no padding
    decode = {}
    for key in ("scp", "random"):
        out_ = diffusion_generate(models[key], prompts, gen_length=WORD_TOKENS, steps=WORD_TOKENS, block_length=4, mask_id=tok.mask_id,
                                  objective="a2d", eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
        decode[key] = [completed_word(tok.decode(t)) for t in out_.tokens]
    out_ = ar_generate(models["ar"], prompts, max_new_tokens=WORD_TOKENS, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
    decode["ar"] = [completed_word(tok.decode(t)) for t in out_.tokens]
    columns = (("held-out text", 34), ("truth", 14), ("A2D from AR", 14), ("A2D random", 14), ("AR base", 14))
    print("  ".join(f"{name:<{width}}" for name, width in columns))
    for i in np.linspace(0, len(items) - 1, min(SHOWN, len(items))).round().astype(int):
        shown = "..." + items[i].prompt.split("\n")[-1].strip()[-31:]
        cells = (shown, items[i].reference, *(decode[key][i] or "-" for key in ("scp", "random", "ar")))
        print("  ".join(f"{c[:w]:<{w}}" for c, (_, w) in zip(cells, columns)))
    scores = {key: score(decode[key], items) for key in ("scp", "random", "ar")}
    print("words finished exactly: " + ", ".join(
        f"{label} {s.right}/{s.total} ({100 * s.accuracy:.1f}% +- {100 * s.stderr:.1f})"
        for label, s in zip(("A2D from the AR base", "A2D from random init", "AR base"), scores.values())))

    print(f"[demo] 5/5 held-out bound: {args.eval_sequences} validation windows of 256 tokens, t grid of 8 "
          f"midpoints, seed 0", flush=True)
    rows = [("A2D from the AR base (SCP)", "scp", "a2d"), ("A2D from random init", "random", "a2d"),
            ("AR base (exact NLL)", "ar", "ar")]
    print(f"{'model':<30} {'NELBO/token':>12} {'+- s.e.':>8} {'PPL (bound)':>12}")
    for label, key, objective in rows:
        r = heldout_nelbo(models[key], objective, split, mask_id=tok.mask_id, seq_len=256,
                          num_sequences=args.eval_sequences, batch_size=8, seed=0)
        bound = f"<= {r.ppl_bound:.2f}" if get_objective(objective).masks else f"{r.ppl_bound:.2f}"
        print(f"{label:<30} {r.nelbo:>12.4f} {r.stderr:>8.4f} {bound:>12}")
    print(f"[demo] done in {time.perf_counter() - t0:.0f} s; runs in {out}/ (debug_ar, demo_scp, demo_random)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
