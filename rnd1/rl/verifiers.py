"""Verifiers: a reply and its task row in, a reward in [0, 1] out.

A verifier is a small registered function, so a new task kind is a file and a line::

    @register("my_kind")
    def my_kind(reply: str, row: dict) -> float: ...

A task row names its verifier in ``"verifier"`` (default ``number``) and carries what it needs
(``answer`` for ``number``; ``tests`` for ``code``). ``reward`` never raises: a verifier that
raises on one rollout scores it 0 and says so in ``Reward.error``, which the trainer counts and
logs (one bad rollout must not end a run that costs GPU-days).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Verifier = Callable[[str, dict], float]
_REGISTRY: dict[str, Verifier] = {}
_NUMBER = re.compile(r"-?\d+")  # integers (scripts/eval_task.py scores with final_number too)
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|$)", re.S)  # ```python, ```py, an unclosed fence


def register(name: str):
    def wrap(fn: Verifier) -> Verifier:
        if name in _REGISTRY:
            raise ValueError(f"verifier {name!r} is registered already")
        _REGISTRY[name] = fn
        return fn
    return wrap


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Verifier:
    if name not in _REGISTRY:
        raise KeyError(f"verifier {name!r} unknown; expected one of {', '.join(names())}")
    return _REGISTRY[name]


def final_number(text: str) -> str | None:
    """The reply's last number, cut at the chat turn's end (``37 + 48 = 85.`` -> ``85``)."""
    found = _NUMBER.findall(text.split("<|im_end|>")[0])
    return found[-1] if found else None


@register("number")
def number(reply: str, row: dict) -> float:
    """Exact match of the reply's final number with ``row["answer"]`` (as a string: ``"85"``)."""
    return float(final_number(reply) == str(row["answer"]))


@register("code")
def code(reply: str, row: dict) -> float:
    """The reply's program (its first fenced block, else all of it) run against ``row["tests"]``
    in ``rnd1.eval.code_exec``'s sandbox: 1 when every test passes. A clean exit is not enough:
    the tests must also print a random marker after the last of them, so a program that exits
    early (``os._exit(0)``, ``raise SystemExit``) before any test runs scores 0."""
    import secrets

    from rnd1.eval.code_exec import run_program

    fenced = _FENCE.search(reply)
    program = fenced.group(1) if fenced else reply.split("<|im_end|>")[0]
    marker = f"rnd1-tests-done-{secrets.token_hex(8)}"
    result = run_program(program, row["tests"] + f"\nprint({marker!r})", timeout_s=float(row.get("timeout_s", 5.0)))
    return float(result.passed and marker in result.output)


@register("regex")
def regex(reply: str, row: dict) -> float:
    """1 when the reply (cut at the chat turn's end) matches ``row["pattern"]`` (``re.search``):
    a format reward (d1 and DeepSeek-R1 reward the answer's layout as well as its value). A
    pattern that does not compile raises here, on the rollout, and scores 0."""
    return float(re.search(row["pattern"], reply.split("<|im_end|>")[0]) is not None)


@dataclass(frozen=True)
class Reward:
    value: float
    error: str | None = None  # the verifier's exception, one line, when it raised


def reward(reply: str, row: dict) -> Reward:
    """Score one rollout; a verifier that raises (or returns something outside [0, 1]) scores 0."""
    name = row.get("verifier", "number")
    where = f"{row['_where']}: " if "_where" in row else ""  # the task file's line (rnd1.rl.tasks)
    try:
        value = float(get(name)(reply, row))
    except Exception as e:  # noqa: BLE001 - any verifier failure is one rollout's 0, counted
        return Reward(0.0, f"{where}verifier {name!r}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}")
    if not 0.0 <= value <= 1.0:
        return Reward(0.0, f"{where}verifier {name!r}: returned {value}, outside [0, 1]")
    return Reward(value)
