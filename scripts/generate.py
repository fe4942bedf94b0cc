#!/usr/bin/env python
"""Sample from a converted model: masked diffusion (A2D / MDLM) or greedy AR decoding.

    python scripts/generate.py --checkpoint outputs/debug_model/checkpoint --model debug \\
        --tokenizer byte --prompt "def fibonacci(n):" --gen-length 64 --steps 32 --block-length 16
    python scripts/generate.py --checkpoint /path/to/hf_export --tokenizer /path/to/hf_export --prompt "..."
    python scripts/generate.py --checkpoint outputs/sft/checkpoint --tokenizer ../shared/data/qwen3_tokenizer \\
        --chat "What is a closure in Python?" --gen-length 256 --steps 128

--chat QUESTION (repeatable) renders the question as a user turn through Qwen3's chat template
(generation prompt, thinking off) and prints the answer up to <|im_end|> / EOS. Block-diffusion
models (block_a2d / block_mdlm) decode block by block with a KV cache of committed blocks
(--no-kv-cache: re-run the prefix every step); their block size is the one the checkpoint
records, else --block-size.

A2D / MDLM models decode semi-autoregressively (--block-length); --kv-cache prefix | dual are
Fast-dLLM's approximate caches (refreshed at every block start and every --cache-refresh steps),
--threshold / --factor the parallel decoding rules (several tokens per forward; --steps then
bounds the forwards), --suffix-window N DPad's window (only N masked positions past the block
are forwarded). The defaults lose no accuracy against one token per forward without a cache on
the task model at gen lengths 64, 256 and 1,024, at 14x-247x its speed (rnd1.generate.FAST_DEFAULTS:
dual cache, confidence threshold 0.9, blocks of 32, suffix window 32; the threshold rule because it
lost less than the factor rule on the previous task model: docs/sampling.md); --kv-cache none --no-parallel --suffix-window 0
--steps N is today's exact sampler.

Loads a DCP checkpoint (step folder or checkpoint root; --model names the preset or a HF
config) or a Hugging Face folder. Prints the samples, the number of forward passes (NFE) and
tokens/s."""

from __future__ import annotations

import argparse
import sys

import torch

from rnd1.checkpoint.load import load_for_inference, objective_for
from rnd1.data.chat import encode_chat_prompt
from rnd1.data.tokenizer import load_tokenizer
from rnd1.diffusion.objective import OBJECTIVES
from rnd1.generate import (CACHE_MODES, FAST_DEFAULTS, STRATEGIES, ar_generate, diffusion_generate, fast_kv_cache,
                           parallel_rule)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="", help="preset or HF config for a DCP checkpoint that does not record "
                                                "its model config (trainer checkpoints do)")
    ap.add_argument("--tokenizer", default="byte")
    ap.add_argument("--prompt", action="append", default=[], help="repeatable: a batch of prompts")
    ap.add_argument("--chat", action="append", default=[],
                    help="repeatable: a user question, rendered through the chat template; prints the answer")
    ap.add_argument("--block-size", type=int, default=0,
                    help="block_a2d / block_mdlm: the model's block size when the checkpoint does not record it")
    ap.add_argument("--no-kv-cache", action="store_true", help="same as --kv-cache none")
    ap.add_argument("--kv-cache", choices=CACHE_MODES, default=None,
                    help="none | prefix | dual (default: dual; block models: their exact cache of committed blocks)")
    ap.add_argument("--cache-refresh", type=int, default=0, help="A2D/MDLM caches: also refresh every N steps")
    ap.add_argument("--suffix-window", type=int, default=None,
                    help="A2D/MDLM: forward only N masked positions past the block (DPad's window; 0: all; "
                         f"default {FAST_DEFAULTS['suffix_window']})")
    ap.add_argument("--objective", choices=list(OBJECTIVES), default="",
                    help="how to read the model (default: the one a trainer checkpoint records, else a2d)")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="forwards per block at most (default: gen length)")
    ap.add_argument("--block-length", type=int, default=0,
                    help=f"semi-AR block (default {FAST_DEFAULTS['block_length']}; block models: their block size)")
    ap.add_argument("--strategy", choices=STRATEGIES, default="confidence")
    rule = ap.add_mutually_exclusive_group()
    rule.add_argument("--no-parallel", action="store_true",
                      help="commit a fixed number per step (gen length / steps) instead of the default threshold rule")
    rule.add_argument("--threshold", type=float,
                      help=f"parallel decoding: commit every position above it (the default, {FAST_DEFAULTS['threshold']})")
    rule.add_argument("--factor", type=float,
                      help="parallel decoding: Fast-dLLM's factor rule (e.g. 1.0)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.prompt and not args.chat:
        ap.error("give at least one --prompt or --chat")
    try:
        tok = load_tokenizer(args.tokenizer)
        objective = objective_for(args.checkpoint, args.objective, args.block_size)
        model = load_for_inference(args.checkpoint, args.model, objective).eval()
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    im_end = tok.special_tokens.get("<|im_end|>")
    runs = []  # (texts shown, prompt ids, stop id, chat?)
    if args.prompt:
        runs.append((args.prompt, [tok.encode(p) for p in args.prompt], tok.eos_id, False))
    if args.chat:
        ids = [encode_chat_prompt([{"role": "user", "content": q}], tok) for q in args.chat]
        runs.append((args.chat, ids, im_end if im_end is not None else tok.eos_id, True))
    nfe, cache_nfe, n_tokens, seconds = 0, 0, 0, 0.0
    for texts, prompts, stop, chat in runs:
        try:
            out = _generate(model, prompts, objective, args, tok, stop)
        except ValueError as e:  # a sampler setting this model cannot take (e.g. a suffix window on block diffusion)
            print(f"error: {e}", file=sys.stderr)
            return 2
        nfe, cache_nfe, seconds = nfe + out.nfe, cache_nfe + out.cache_nfe, seconds + out.seconds
        n_tokens += sum(len(t) for t in out.tokens)
        for p, t in zip(texts, out.tokens):
            print("=" * 60)
            if chat:
                print(f"Q: {p}")
                # a byte-level tokenizer spells <|im_end|> out: cut the text there too
                print(f"A: {tok.decode(_answer(t, {stop, tok.eos_id, im_end})).split('<|im_end|>')[0]}")
            else:
                print(p + tok.decode(t))
    print("=" * 60)
    # a block model's KV cache costs forwards beyond --steps: say so rather than leave NFE > steps unexplained
    why = (f" ({nfe - cache_nfe} denoising + {cache_nfe} that write the block cache: the prompt's prefill and "
           f"each finished block's clean pass)" if cache_nfe else "")
    print(f"NFE {nfe}{why}, {n_tokens / max(seconds, 1e-9):.1f} tokens/s ({n_tokens} tokens in {seconds:.2f}s)")
    return 0


def _generate(model, prompts, objective, args, tok, stop):
    if not objective.masks:
        return ar_generate(model, prompts, max_new_tokens=args.gen_length, eos_id=stop, vocab_limit=tok.vocab_size)
    block_model = getattr(objective, "block_size", None) is not None
    threshold, factor = parallel_rule(args.threshold, args.factor, parallel=not args.no_parallel)
    kv_cache = "none" if args.no_kv_cache else (args.kv_cache or fast_kv_cache(objective))
    block_length = args.block_length or (None if block_model else min(FAST_DEFAULTS["block_length"], args.gen_length))
    window = args.suffix_window if args.suffix_window is not None else (0 if block_model else
                                                                          FAST_DEFAULTS["suffix_window"])
    return diffusion_generate(
        model, prompts, gen_length=args.gen_length, steps=args.steps or args.gen_length,
        mask_id=model.config.mask_token_id, objective=objective, block_length=block_length, strategy=args.strategy,
        threshold=threshold, factor=factor, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_id=stop, generator=torch.Generator().manual_seed(args.seed), vocab_limit=tok.vocab_size,
        kv_cache=kv_cache, cache_refresh=args.cache_refresh, suffix_window=window)


def _answer(tokens: list[int], stops: set) -> list[int]:
    """The generated tokens up to (not including) the first stop token (<|im_end|> / EOS)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


if __name__ == "__main__":
    sys.exit(main())
