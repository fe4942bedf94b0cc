"""Small task sets scored during training (knowledge-retention curves, like RND1's Fig. 4.1).

A task file is JSONL, one example per line, of either kind:

- multiple choice: ``{"context": "...", "choices": ["...", "..."], "label": 1}``, scored by
  log-likelihood (the diffusion ELBO for a2d/mdlm, exact for ar): accuracy of the argmax;
- generation: ``{"prompt": "...", "answer": "..."}``, scored by exact match of the greedy
  diffusion (or AR) sample's first line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnd1.data.jsonl import read_jsonl
from rnd1.diffusion.objective import Objective, get_objective
from rnd1.eval.likelihood import continuation_loglikelihood
from rnd1.generate import ar_generate, diffusion_generate


class TaskError(ValueError):
    pass


def load_task(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    rows = []
    for i, ex in read_jsonl(path, TaskError):
        if not ({"context", "choices", "label"} <= ex.keys() or {"prompt", "answer"} <= ex.keys()):
            raise TaskError(f"{path}:{i}: expected context/choices/label or prompt/answer, got {sorted(ex)}")
        rows.append(ex)
    if not rows:
        raise TaskError(f"task file {path} is empty")
    return rows


def loglikelihood(model, tok, context: str, continuation: str, *, objective: "str | Objective", mask_id: int,
                  num_samples: int, generator: torch.Generator | None) -> float:
    return continuation_loglikelihood(model, tok.encode(context), tok.encode(continuation), objective=objective,
                                      mask_id=mask_id, num_samples=num_samples, generator=generator)


@torch.no_grad()
def score_tasks(model, tok, task_files: list[str], *, objective: "str | Objective", mask_id: int,
                num_samples: int = 16, gen_length: int = 32, gen_steps: int = 16, seed: int = 0) -> dict[str, float]:
    """{task name: accuracy or exact match} for each task file (evaluated in eval mode)."""
    objective = get_objective(objective)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for f in task_files:
            rows = load_task(f)
            g = torch.Generator().manual_seed(seed)
            correct = 0
            for ex in rows:
                if "choices" in ex:
                    scores = [loglikelihood(model, tok, ex["context"], c, objective=objective, mask_id=mask_id,
                                            num_samples=num_samples, generator=g) for c in ex["choices"]]
                    correct += int(max(range(len(scores)), key=scores.__getitem__) == ex["label"])
                else:
                    ids = [tok.encode(ex["prompt"])]
                    if not objective.masks:
                        gen = ar_generate(model, ids, max_new_tokens=gen_length, eos_id=tok.eos_id,
                                          vocab_limit=tok.vocab_size)
                    else:
                        gen = diffusion_generate(model, ids, gen_length=gen_length, steps=gen_steps, mask_id=mask_id,
                                                 objective=objective, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
                    text = tok.decode([t for t in gen.tokens[0] if t != tok.eos_id]).strip().splitlines()
                    correct += int(bool(text) and text[0].strip() == ex["answer"].strip())
            out[f"task/{Path(f).stem}"] = correct / len(rows)
    finally:
        model.train(was_training)
    return out
