"""RL task sets: JSONL, one prompt per line, checked whole at start-up.

``{"prompt": "What is 37 + 48?", "answer": "85"}`` (verifier ``number``, the default), or
``{"prompt": ..., "tests": "assert f(1) == 2", "verifier": "code"}``, or
``{"prompt": ..., "pattern": "^\\d+$", "verifier": "regex"}``. A row the named verifier
cannot score (a missing field, an unknown verifier) is refused before any rollout, with
``file:line``; the arithmetic task's held-out file (``question`` / ``answer``) is read as is.
"""

from __future__ import annotations

from pathlib import Path

from rnd1.data.jsonl import read_jsonl
from rnd1.rl import verifiers

NEEDS = {"number": ("answer",), "code": ("tests",), "regex": ("pattern",)}  # fields each built-in verifier reads


class TaskSetError(ValueError):
    pass


def load_prompts(path: str | Path) -> list[dict]:
    """Rows with ``prompt`` (str), ``verifier`` and that verifier's fields; raises TaskSetError."""
    path = Path(path)
    if not path.is_file():
        raise TaskSetError(f"rl task file {path} does not exist")
    rows = []
    for line, row in read_jsonl(path, TaskSetError):
        row = dict(row)
        if "prompt" not in row and "question" in row:
            row["prompt"] = row["question"]
        if not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise TaskSetError(f"{path}:{line}: expected a non-empty string \"prompt\" (or \"question\")")
        name = row.setdefault("verifier", "number")
        if name not in verifiers.names():
            raise TaskSetError(f"{path}:{line}: verifier {name!r} unknown; expected one of "
                               f"{', '.join(verifiers.names())}")
        missing = [f for f in NEEDS.get(name, ()) if not isinstance(row.get(f), str)]
        if missing:
            raise TaskSetError(f"{path}:{line}: verifier {name!r} needs string field(s) {', '.join(missing)}")
        row["_where"] = f"{path}:{line}"  # named in a verifier's error on this row's rollouts
        rows.append(row)
    if not rows:
        raise TaskSetError(f"rl task file {path} holds no prompts")
    return rows
