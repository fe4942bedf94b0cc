#!/usr/bin/env python
"""Score a checkpoint on the arithmetic task's held-out questions: exact-match accuracy with its
standard error, and the sampler's speed.

    python scripts/eval_task.py --checkpoint outputs/task/sft_long/checkpoint
    python scripts/eval_task.py --checkpoint CKPT --kv-cache dual --factor 1.0 --gen-length 256 --out results/

Each question (``heldout.jsonl`` from ``scripts/make_chat_data.py --task``, never seen in
training) is rendered through the chat template as a user turn; the reply is decoded up to
``<|im_end|>`` and its last number compared with the answer. Accuracy p over n questions is
reported with its standard error sqrt(p (1 - p) / n). The JSON written with ``--out`` holds the
numbers, every question's reply, and the record of what produced them (``rnd1.eval.record``:
sampler settings, seeds, model hash, package versions, device): the same command on the same
machine writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count >= 0")
    return int(text)


def add_sampler_args(ap: argparse.ArgumentParser, *, gen_length: int = 64) -> None:
    """The sampler's settings as command-line options (shared with scripts/bench_sampler.py)."""
    from rnd1.generate import CACHE_MODES, STRATEGIES

    ap.add_argument("--gen-length", type=int, default=gen_length)
    ap.add_argument("--steps", type=int, default=0, help="forwards per block at most (default: gen length)")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--strategy", choices=STRATEGIES, default="confidence")
    ap.add_argument("--kv-cache", choices=CACHE_MODES, default="none")
    ap.add_argument("--cache-refresh", type=_count, default=0, help="also refresh the cache every N steps in a block")
    ap.add_argument("--suffix-window", type=_count, default=0,
                    help="DPad's window: forward only N masked positions past the block (0: all)")
    rule = ap.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, help="parallel decoding: commit every position above it")
    rule.add_argument("--factor", type=float, help="parallel decoding: Fast-dLLM's factor rule")


def sampler_settings(args) -> dict:
    return {"gen_length": args.gen_length, "steps": args.steps or args.gen_length,
            "block_length": min(args.block_length, args.gen_length), "strategy": args.strategy,
            "kv_cache": args.kv_cache, "cache_refresh": args.cache_refresh,
            "suffix_window": args.suffix_window, "threshold": args.threshold,
            "factor": args.factor, "temperature": 0.0}


def evaluate(model, tok, rows: list[dict], settings: dict, *, batch_size: int, seed: int) -> dict:
    """Greedy-decode every question with ``settings`` (``sampler_settings``); accuracy, its
    standard error, tokens/s, tokens per forward, and the replies."""
    import torch

    from rnd1.data.chat import encode_chat_prompt
    from rnd1.generate import diffusion_generate
    from rnd1.rl.verifiers import final_number

    correct, replies, tokens, forwards, seconds, nfe = 0, [], 0, 0, 0.0, 0
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [encode_chat_prompt([{"role": "user", "content": r["question"]}], tok) for r in chunk]
        out = diffusion_generate(model, prompts, mask_id=model.config.mask_token_id, objective="a2d",
                                 eos_id=tok.eos_id, vocab_limit=tok.vocab_size, generator=g, **settings)
        for r, t in zip(chunk, out.tokens):
            text = tok.decode([x for x in t if x != tok.eos_id])
            ok = final_number(text) == r["answer"]  # the RL verifier's reading of a reply
            correct += ok
            replies.append({"question": r["question"], "answer": r["answer"], "reply": text, "correct": ok})
        tokens += sum(len(t) for t in out.tokens)
        forwards += sum(out.row_forwards)
        seconds += out.seconds
        nfe += out.nfe
    n = len(rows)
    p = correct / n
    return {"n": n, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9), "tokens_per_forward": tokens / max(forwards, 1),
            "nfe": nfe, "replies": replies}


def load_questions(path: str, limit: int) -> list[dict]:
    from rnd1.data.jsonl import read_jsonl

    if not Path(path).is_file():
        raise ValueError(f"questions file {path} does not exist (python scripts/make_chat_data.py --task --out "
                         f"{Path(path).parent} writes it; scripts/train_task_model.py does too)")
    rows = []
    for i, ex in read_jsonl(Path(path), ValueError):
        if not isinstance(ex.get("question"), str) or not isinstance(ex.get("answer"), str):
            raise ValueError(f"{path}:{i}: expected {{\"question\": str, \"answer\": str}}, got {sorted(ex)}")
        rows.append(ex)
    return rows[:limit] if limit else rows


def load_task_model(checkpoint: str, questions: str, limit: int):
    """(questions, byte tokenizer, model in eval mode); raises OSError / ValueError / RuntimeError
    with a one-line reason (both scripts print it and exit 2)."""
    from rnd1.checkpoint.load import load_for_inference
    from rnd1.data.tokenizer import load_tokenizer

    rows = load_questions(questions, limit)
    return rows, load_tokenizer("byte"), load_for_inference(checkpoint, objective="a2d").eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--questions", default="outputs/data/arith_task/heldout.jsonl")
    ap.add_argument("--limit", type=int, default=0, help="the first N questions (default: all)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder for results.json")
    add_sampler_args(ap)
    args = ap.parse_args(argv)
    try:
        import torch

        from rnd1.eval.record import evaluation_record

        torch.manual_seed(args.seed)
        rows, tok, model = load_task_model(args.checkpoint, args.questions, args.limit)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = sampler_settings(args)
    t0 = time.perf_counter()
    res = evaluate(model, tok, rows, settings, batch_size=args.batch_size, seed=args.seed)
    print(f"accuracy {res['accuracy']:.4f} +- {res['stderr']:.4f} (n={res['n']}); {res['tokens_per_s']:.1f} tokens/s, "
          f"{res['tokens_per_forward']:.2f} tokens/forward, NFE {res['nfe']} ({time.perf_counter() - t0:.1f} s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rec = evaluation_record(model=model, checkpoint=args.checkpoint, sampler=settings,
                                seeds={"sampler": args.seed, "torch": args.seed},
                                command=["scripts/eval_task.py", *(argv if argv is not None else sys.argv[1:])])
        (out / "results.json").write_text(json.dumps({"record": rec, **res}, indent=1))
        print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
