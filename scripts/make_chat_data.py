#!/usr/bin/env python
"""Write ``data/arith_chat.jsonl``: short arithmetic conversations for testing diffusion SFT.

    python scripts/make_chat_data.py                # the shipped file (seed 0, 400 conversations)
    python scripts/prepare_data.py --source chat:data/arith_chat.jsonl --tokenizer byte \\
        --out outputs/data/arith_chat_byte --val-fraction 0.05

Why arithmetic: the answers are short, regular and checkable ("37 + 48 = 85."), so a tiny
byte-level model learns the chat format (where the response starts, that it ends with
``<|im_end|>`` and EOS) in a couple of CPU minutes, and a wrong sum is easy to spot. The file
exercises every record shape the chat loader accepts: plain two-message conversations, a system
prompt, two question/answer pairs, and the ``prompt``/``response`` form. Seeded, so rerunning
reproduces the shipped file byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SYSTEMS = ["You are a calculator.", "Answer with the result only.", "Be brief."]
QUESTIONS = ["What is {q}?", "Compute {q}.", "{q} = ?"]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def qa(rng: random.Random) -> tuple[str, str]:
    """One question and its answer; subtraction never goes negative, products stay small."""
    op = rng.choice(list(OPS))
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if op == "-" and b > a:
            a, b = b, a
    q = f"{a} {op} {b}"
    return rng.choice(QUESTIONS).format(q=q), f"{q} = {OPS[op](a, b)}."


def record(rng: random.Random) -> dict:
    kind = rng.random()
    q, a = qa(rng)
    if kind < 0.2:  # prompt / response form
        rec = {"prompt": q, "response": a}
        if rng.random() < 0.3:
            rec["system"] = rng.choice(SYSTEMS)
        return rec
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if kind < 0.4 else []
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if kind > 0.75:  # two question/answer pairs
        q2, a2 = qa(rng)
        msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    return {"messages": msgs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "arith_chat.jsonl"))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record(rng), ensure_ascii=False, separators=(",", ":")) for _ in range(args.n)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}: {args.n} conversations, {out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
