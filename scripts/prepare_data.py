#!/usr/bin/env python
"""Tokenise text into memory-mapped uint32 token shards for training.

    python scripts/prepare_data.py --source stdlib --tokenizer byte --out outputs/data/stdlib_byte
    python scripts/prepare_data.py --source 'corpus/*.txt' --source jsonl:web.jsonl:text \\
        --tokenizer ../shared/data/qwen3_tokenizer --out outputs/data/mix --workers 2
    python scripts/prepare_data.py --source chat:data/arith_chat.jsonl --tokenizer byte \
        --out outputs/data/arith_chat_byte --val-fraction 0.05
"""

from __future__ import annotations

import argparse
import sys

from rnd1.data.prepare import prepare
from rnd1.data.shards import DataError
from rnd1.data.tokenizer import TokenizerError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", required=True,
                    help="stdlib | FILE | GLOB | jsonl:PATH[:FIELD] | chat:PATH (repeatable; chat: JSONL "
                         "conversations for SFT, see rnd1/data/chat.py)")
    ap.add_argument("--tokenizer", default="byte", help="'byte', a Qwen3 tokenizer folder or a .tiktoken file")
    ap.add_argument("--out", required=True, help="dataset folder to create")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-tokens", type=int, default=1 << 26)
    ap.add_argument("--max-docs", type=int, default=0, help="stop after this many documents (0: all)")
    ap.add_argument("--jsonl-field", default="text")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        prepare(args.source, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                workers=args.workers, shard_tokens=args.shard_tokens, max_docs=args.max_docs,
                jsonl_field=args.jsonl_field, overwrite=args.overwrite)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
