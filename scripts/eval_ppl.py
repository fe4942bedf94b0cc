"""Held-out likelihood of a checkpoint: per-token NELBO, the perplexity bound exp(NELBO) and its
standard error, on a token dataset's split (rnd1/eval/perplexity.py).

    python scripts/eval_ppl.py --checkpoint outputs/debug_model/checkpoint --data outputs/data/stdlib_byte
    python scripts/eval_ppl.py --checkpoint CKPT --data DATA --num-sequences 256 --t-points 16 --json ppl.json

The same windows, grid and seeds for every checkpoint, so two numbers are comparable; an AR
checkpoint reports its exact NLL per token on the same positions.
"""

from __future__ import annotations

import argparse
import json
import sys

from rnd1.checkpoint.load import load_for_inference, objective_for
from rnd1.diffusion.objective import OBJECTIVES
from rnd1.eval.perplexity import DEFAULT_T_POINTS, heldout_nelbo, midpoint_grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="trainer checkpoint folder or Hugging Face folder")
    ap.add_argument("--data", required=True, help="dataset folder written by scripts/prepare_data.py")
    ap.add_argument("--split", default="val")
    ap.add_argument("--model", default="", help="preset / HF config for a checkpoint that records none")
    ap.add_argument("--objective", choices=list(OBJECTIVES), default="",
                    help="default: the one the checkpoint was trained with (a2d for HF folders)")
    ap.add_argument("--block-size", type=int, default=0,
                    help="block_a2d / block_mdlm: the block size, when the checkpoint does not record it")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-sequences", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--t-points", type=int, default=DEFAULT_T_POINTS,
                    help="quadrature points: midpoints of equal strata of t (the training validation's default grid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args(argv)
    from torch.distributed.checkpoint.api import CheckpointException

    from rnd1.data.shards import DataError, TokenDataset

    try:
        objective = objective_for(args.checkpoint, args.objective, args.block_size)
        model = load_for_inference(args.checkpoint, args.model, objective)
        data = TokenDataset(args.data, vocab_size=model.config.vocab_size)
        split = data.split(args.split)
        res = heldout_nelbo(model, objective, split, mask_id=model.config.mask_token_id, seq_len=args.seq_len,
                            num_sequences=args.num_sequences, batch_size=args.batch_size,
                            t_grid=midpoint_grid(args.t_points), seed=args.seed, eos_id=data.eos_id)
    except (OSError, ValueError, RuntimeError, DataError, CheckpointException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    what = "NLL" if not objective.masks else "NELBO"
    bound = "PPL" if not objective.masks else "PPL <="
    print(f"{args.checkpoint} ({res.objective}) on {args.data}:{args.split}: {res.sequences} sequences x "
          f"{args.seq_len}, {res.tokens:,} scored tokens, t grid {len(res.t_grid) or 'none'}, seed {res.seed}")
    print(f"{what}/token {res.nelbo:.4f} +- {res.stderr:.4f} (s.e.)   {bound} {res.ppl_bound:,.3f} "
          f"[{res.ppl_low:,.3f}, {res.ppl_high:,.3f}] (95%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.as_dict(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
