#!/usr/bin/env python
"""Sample from a converted model: masked diffusion (A2D / MDLM) or greedy AR decoding.

    python scripts/generate.py --checkpoint outputs/debug_model/checkpoint --model debug \\
        --tokenizer byte --prompt "def fibonacci(n):" --gen-length 64 --steps 32 --block-length 16
    python scripts/generate.py --checkpoint /path/to/hf_export --tokenizer /path/to/hf_export --prompt "..."

Loads a DCP checkpoint (step folder or checkpoint root; --model names the preset or a HF
config) or a Hugging Face folder. Prints the samples, the number of forward passes (NFE) and
tokens/s."""

from __future__ import annotations

import argparse
import sys

import torch

from rnd1.checkpoint.load import load_for_inference, recorded_objective
from rnd1.data.tokenizer import load_tokenizer
from rnd1.diffusion.objective import OBJECTIVES, get_objective
from rnd1.generate import STRATEGIES, ar_generate, diffusion_generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="", help="preset or HF config for a DCP checkpoint that does not record "
                                                "its model config (trainer checkpoints do)")
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--prompt", action="append", required=True, help="repeatable: a batch of prompts")
    ap.add_argument("--objective", choices=list(OBJECTIVES), default="",
                    help="how to read the model (default: the one a trainer checkpoint records, else a2d)")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=0)
    ap.add_argument("--strategy", choices=STRATEGIES, default="confidence")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer)
        objective = get_objective(args.objective or recorded_objective(args.checkpoint))
        model = load_for_inference(args.checkpoint, args.model, objective).eval()
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = [tok.encode(p) for p in args.prompt]
    if not objective.masks:
        out = ar_generate(model, prompts, max_new_tokens=args.gen_length, eos_id=tok.eos_id,
                          vocab_limit=tok.vocab_size)
    else:
        out = diffusion_generate(
            model, prompts, gen_length=args.gen_length, steps=args.steps, mask_id=model.config.mask_token_id,
            objective=objective, block_length=args.block_length or None, strategy=args.strategy,
            threshold=args.threshold, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            eos_id=tok.eos_id, generator=torch.Generator().manual_seed(args.seed), vocab_limit=tok.vocab_size)
    for p, t in zip(args.prompt, out.tokens):
        print("=" * 60)
        print(p + tok.decode(t))
    print("=" * 60)
    print(f"NFE {out.nfe}, {out.tokens_per_s:.1f} tokens/s ({sum(len(t) for t in out.tokens)} tokens in "
          f"{out.seconds:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
