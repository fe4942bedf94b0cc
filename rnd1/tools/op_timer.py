"""Where a CPU training step spends its time, op by op, in a form two implementations can share.

``torch.profiler`` is the usual tool, but on a CPU it inflates what it measures unevenly (on
this project's machine it reported ``aten::mm`` alone at 80% of a step that takes 490 ms without
it), so two profiles cannot be compared line by line. ``OpTimer`` instead times each ATen call
where it is dispatched: a ``TorchDispatchMode`` around the step, ``perf_counter`` before and
after each op. CPU ops run synchronously, so the op's wall time is exact; a custom op (this
project's ``rnd1_kernels::*``) counts as one entry with everything it calls. The step timed this
way ran within 1-9% of its untimed time in our runs, so the sum of the ops is close to the step.

``categorise`` sorts the ops into the parts of a transformer step that both this project and
its peers (transformers, torchtitan) have, so ``scripts/bench_train_step.py --compare-ops`` can
print them side by side: where one implementation spends more, it shows under one name.

CPU only: on CUDA a dispatch-time wall clock measures launches, not kernels.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CATEGORIES = ("expert matmuls", "LM head + loss", "attention kernel", "other matmuls", "routing and dispatch",
              "optimizer", "elementwise and norms")

_ROUTING = ("index_select", "index_copy", "index_add", "index_put", "index.", "scatter", "gather", "sort", "argsort",
            "topk", "cumsum", "bincount", "histc", "nonzero", "masked_select", "repeat_interleave")
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def categorise(op: str, shapes: tuple, vocab: int) -> str:
    """One of ``CATEGORIES`` for an op (``aten::mm``, ``rnd1_kernels::grouped_mm``...) called on
    tensors of ``shapes``. A matmul touching a dimension of size ``vocab`` is the LM head."""
    if "grouped_mm" in op:
        return "expert matmuls"
    if "masked_ce" in op or "cross_entropy" in op or "log_softmax" in op or "nll_loss" in op:
        return "LM head + loss"
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention kernel"
    if any(op.startswith(m) for m in _MATMULS):
        return "LM head + loss" if any(vocab in s for s in shapes) else "other matmuls"
    if "adam" in op or "_foreach_" in op:
        return "optimizer"
    if any(r in op for r in _ROUTING):
        return "routing and dispatch"
    return "elementwise and norms"


class OpTimer(TorchDispatchMode):
    """``with OpTimer() as t: step()`` then ``t.by_op()`` / ``t.by_category(vocab)``: seconds
    per op name (and per op and argument shapes, ``t.calls``)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, list] = defaultdict(lambda: [0, 0.0])  # (op, shapes) -> [count, seconds]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        entry = self.calls[(str(func.name()), shapes)]
        entry[0] += 1
        entry[1] += dt
        return out

    def total(self) -> float:
        return sum(s for _, s in self.calls.values())

    def by_op(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (op, _), (_, s) in self.calls.items():
            out[op] += s
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def by_category(self, vocab: int) -> dict[str, float]:
        out = dict.fromkeys(CATEGORIES, 0.0)
        for (op, shapes), (_, s) in self.calls.items():
            out[categorise(op, shapes, vocab)] += s
        return out
