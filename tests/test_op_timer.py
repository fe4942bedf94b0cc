"""rnd1/tools/op_timer.py: every op of a step is timed once and sorted into one of the parts a
transformer step has, so two implementations' steps can be compared part by part
(scripts/bench_train_step.py --compare-ops)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rnd1.tools.op_timer import CATEGORIES, OpTimer, categorise

REPO = Path(__file__).resolve().parents[1]


def test_ops_fall_into_the_parts_of_a_step():
    vocab = 512
    assert categorise("rnd1_kernels::grouped_mm_backward", (), vocab) == "expert matmuls"
    assert categorise("aten::_grouped_mm", ((8, 4), (2, 4, 4)), vocab) == "expert matmuls"
    assert categorise("rnd1_kernels::masked_ce_fused", (), vocab) == "LM head + loss"
    assert categorise("aten::mm", ((64, 32), (32, 512)), vocab) == "LM head + loss"  # the vocab-sized matmul
    assert categorise("aten::mm", ((64, 32), (32, 48)), vocab) == "other matmuls"
    assert categorise("aten::_scaled_dot_product_flash_attention_for_cpu_backward", (), vocab) == "attention kernel"
    assert categorise("aten::_fused_adamw_", (), vocab) == "optimizer"
    assert categorise("aten::_foreach_lerp_.Scalar", (), vocab) == "optimizer"
    assert categorise("aten::index_select", (), vocab) == "routing and dispatch"
    assert categorise("aten::mul.Tensor", ((4, 4), (4, 4)), vocab) == "elementwise and norms"


def test_every_op_of_a_step_is_timed_once_and_the_parts_add_up():
    torch.manual_seed(0)
    x, w, head = torch.randn(64, 32), torch.randn(48, 32, requires_grad=True), torch.randn(512, 48, requires_grad=True)
    target = torch.randint(0, 512, (64,))
    timer = OpTimer()
    with timer:
        h = F.silu(x @ w.t())
        loss = F.cross_entropy(h @ head.t(), target)
        loss.backward()
    ops = timer.by_op()
    assert "aten::mm" in ops and "aten::silu" in ops and any("log_softmax" in op for op in ops)
    parts = timer.by_category(vocab=512)
    assert set(parts) == set(CATEGORIES)
    assert parts["LM head + loss"] > 0 and parts["other matmuls"] > 0 and parts["elementwise and norms"] > 0
    assert sum(parts.values()) == pytest.approx(timer.total()) and timer.total() > 0
    assert sum(n for n, _ in timer.calls.values()) >= 6  # two matmuls forward, their backward, the loss


def test_the_bench_compares_the_steps_part_by_part():
    pytest.importorskip("transformers")
    tiny = ["--vocab", "512", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim",
            "16", "--experts", "4", "--topk", "2", "--moe-inter", "32", "--seq", "32", "--batch", "2", "--dtype", "fp32"]
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_train_step.py"), *tiny, "--compare-ops",
                          "--steps", "1", "--warmup", "1"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| part of the step"))
    assert "rnd1 ar" in header and "hf ar" in header
    for part in (*CATEGORIES, "sum of ops", "step, untimed"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"| {part} "))
        assert len([float(v) for v in row.strip("|").split("|")[1:]]) == 2
    assert "top ops of rnd1 ar:" in out.stdout and "top ops of hf ar:" in out.stdout
