#!/usr/bin/env python
"""Write ``data/arith_chat.jsonl`` (short arithmetic conversations for testing diffusion SFT), or
with ``--task`` the arithmetic task the task model is trained and measured on.

    python scripts/make_chat_data.py                # the shipped file (seed 0, 400 conversations)
    python scripts/make_chat_data.py --task --out outputs/data/arith_task   # the task (below)
    python scripts/prepare_data.py --source chat:data/arith_chat.jsonl --tokenizer byte \\
        --out outputs/data/arith_chat_byte --val-fraction 0.05

Why arithmetic: the answers are short, regular and checkable ("37 + 48 = 85."), so a tiny
byte-level model learns the chat format (where the response starts, that it ends with
``<|im_end|>`` and EOS) in a couple of CPU minutes, and a wrong sum is easy to spot. The file
exercises every record shape the chat loader accepts: plain two-message conversations, a system
prompt, two question/answer pairs, and the ``prompt``/``response`` form. Seeded, so rerunning
reproduces the shipped file byte for byte.

The task (``--task``, ``docs/task_model.md``): every question ``a + b`` and ``a - b`` with
``0 <= a, b <= 99`` (``a >= b`` for subtraction): 15,050 questions. A seeded draw of
``--heldout`` of them (1,000) is held out: no training file contains a held-out question, as an
equation or as a conversation (a test checks it), so accuracy on them measures arithmetic, not
recall. The folder gets:

- ``pretrain.jsonl``: documents of equations (``37 + 48 = 85.`` per line), the text the AR base
  is pretrained on and the A2D conversion continues on;
- ``sft.jsonl``: chat conversations about the training questions (diffusion SFT);
- ``heldout.jsonl``: ``{"question", "answer"}`` per held-out question, what ``scripts/eval_task.py``
  scores (exact match of the last number of the reply);
- ``rl.jsonl``: ``{"prompt", "answer"}`` for every training question, the prompts of RL
  (``train_configs/task/task_rl.toml``; rewarded by the ``number`` verifier).
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


TASK_OPS = ("+", "-")


def task_questions() -> list[tuple[int, str, int]]:
    """Every question of the task, in a fixed order: (a, op, b)."""
    out = []
    for op in TASK_OPS:
        for a in range(100):
            for b in range(100):
                if op == "-" and b > a:
                    continue
                out.append((a, op, b))
    return out


def equation(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b} = {OPS[op](a, b)}."


def write_task(out: Path, *, heldout: int, seed: int, docs: int, lines_per_doc: int, conversations: int) -> None:
    """The task's three files (see the module docstring); the same seed gives the same bytes."""
    rng = random.Random(seed)
    questions = task_questions()
    rng.shuffle(questions)
    held, train = questions[:heldout], questions[heldout:]
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows) -> None:
        path = out / name
        path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path}: {len(rows)} records, {path.stat().st_size:,} bytes")

    dump("pretrain.jsonl", [{"text": "\n".join(equation(*rng.choice(train)) for _ in range(lines_per_doc)) + "\n"}
                            for _ in range(docs)])
    sft = []
    for _ in range(conversations):
        a, op, b = rng.choice(train)
        q = rng.choice(QUESTIONS).format(q=f"{a} {op} {b}")
        sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": equation(a, op, b)}]})
    dump("sft.jsonl", sft)
    dump("heldout.jsonl", [{"question": QUESTIONS[0].format(q=f"{a} {op} {b}"), "answer": str(OPS[op](a, b))}
                           for a, op, b in held])
    dump("rl.jsonl", [{"prompt": QUESTIONS[0].format(q=f"{a} {op} {b}"), "answer": str(OPS[op](a, b))}
                      for a, op, b in train])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "arith_chat.jsonl"))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", action="store_true", help="write the arithmetic task into the folder --out")
    ap.add_argument("--heldout", type=int, default=1000, help="--task: questions held out for evaluation")
    ap.add_argument("--docs", type=int, default=20000, help="--task: pretraining documents")
    ap.add_argument("--lines-per-doc", type=int, default=16, help="--task: equations per pretraining document")
    ap.add_argument("--conversations", type=int, default=40000, help="--task: SFT conversations")
    args = ap.parse_args(argv)
    if args.task:
        if args.out == ap.get_default("out"):
            ap.error("--task writes a folder: give --out (e.g. outputs/data/arith_task)")
        write_task(Path(args.out), heldout=args.heldout, seed=args.seed, docs=args.docs,
                   lines_per_doc=args.lines_per_doc, conversations=args.conversations)
        return 0
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record(rng), ensure_ascii=False, separators=(",", ":")) for _ in range(args.n)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}: {args.n} conversations, {out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
