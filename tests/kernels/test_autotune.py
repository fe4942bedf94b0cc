"""Backends chosen by measurement (rnd1/kernels/autotune.py), CPU feature detection (rnd1/kernels/cpu.py),
and that every candidate an ``auto`` op may choose computes the same thing."""

import json
import time

import pytest
import torch

from rnd1.kernels import grouped_gemm, masked_cross_entropy
from rnd1.kernels.autotune import Autotuner, measure
from rnd1.kernels.backend import op_impl, set_op_backend, set_op_impl
from rnd1.kernels.cpu import isa_caps, parse_cpuinfo

SPR = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile
"""
ZEN3 = """processor\t: 0
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse2 avx2 fma
"""
GRAVITON3 = """processor\t: 0
Features\t: fp asimd evtstrm aes sve bf16 i8mm
"""


def test_bf16_matrix_units_are_detected_and_named():
    spr, zen3, arm = parse_cpuinfo(SPR, "x86_64"), parse_cpuinfo(ZEN3, "x86_64"), parse_cpuinfo(GRAVITON3, "aarch64")
    assert spr.bf16_units == "AMX-BF16" and "AMX-BF16" in spr.summary() and "8480+" in spr.summary()
    assert zen3.bf16_units is None and "no bf16 matrix units" in zen3.summary() and "avx2" in zen3.summary()
    assert arm.bf16_units == "Arm BF16 (BFMMLA)"
    assert parse_cpuinfo(SPR.replace(" amx_bf16", ""), "x86_64").bf16_units == "AVX512-BF16"


def test_an_instruction_limit_in_the_environment_turns_bf16_units_off_and_is_said():
    """ONEDNN_MAX_CPU_ISA=AVX2 (how the bench emulates an AVX2 machine) leaves oneDNN, which runs
    PyTorch's CPU bf16 matmuls, without AMX: the detection must say so, and key timings apart."""
    env = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "HOME": "/x"}
    caps = isa_caps(env)
    assert caps == ("ATEN_CPU_CAPABILITY=avx2", "MKL_ENABLE_INSTRUCTIONS=AVX2", "ONEDNN_MAX_CPU_ISA=AVX2")
    capped, native = parse_cpuinfo(SPR, "x86_64", caps), parse_cpuinfo(SPR, "x86_64")
    assert capped.bf16_units is None and "limited by ATEN_CPU_CAPABILITY=avx2" in capped.summary()
    assert capped.key() != native.key()
    assert native.key() == "Intel(R) Xeon(R) Platinum 8480+ [avx2 fma avx512f avx512_bf16 amx_tile amx_bf16]"
    assert parse_cpuinfo(SPR.replace(" amx_bf16", ""), "x86_64").key() != native.key()
    # a limit that still includes the units leaves them on; AVX512_CORE_BF16 keeps only the dot products
    assert parse_cpuinfo(SPR, "x86_64", ("ONEDNN_MAX_CPU_ISA=AVX512_CORE_AMX",)).bf16_units == "AMX-BF16"
    assert parse_cpuinfo(SPR, "x86_64", ("DNNL_MAX_CPU_ISA=avx512_core_bf16",)).bf16_units == "AVX512-BF16"
    assert isa_caps({}) == ()


def test_the_fastest_candidate_wins_and_the_answer_is_cached(tmp_path):
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)

    def fast():
        calls["fast"] += 1

    cache = tmp_path / "autotune.json"
    choice = Autotuner(cache, budget_ms=10).choose("op", "shape A", {"slow": slow, "fast": fast})
    assert choice.chosen == "fast" and not choice.cached
    assert choice.timings_ms["slow"] > choice.timings_ms["fast"]
    assert calls["slow"] >= 4 and calls["fast"] >= 4  # warm-up + at least 3 timed calls each
    line = choice.line()
    assert "\n" not in line and "op [shape A]: fast" in line and "slow" in line
    stored = json.loads(cache.read_text())
    assert any("op|shape A" in v for v in stored.values())
    # a resumed run reads the answer instead of measuring again
    before = dict(calls)
    again = Autotuner(cache).choose("op", "shape A", {"slow": slow, "fast": fast})
    assert again.chosen == "fast" and again.cached and calls == before
    # another shape is measured anew
    assert not Autotuner(cache, budget_ms=5).choose("op", "shape B", {"slow": slow, "fast": fast}).cached
    # candidates that cost memory to make (AdamW's copies) are made only when nothing is cached
    made = []

    def make():
        made.append(1)
        return {"slow": slow, "fast": fast}

    assert Autotuner(cache).choose("op", "shape A", make, names=("slow", "fast")).cached and not made
    assert Autotuner(cache, budget_ms=5).choose("op", "shape C", make, names=("slow", "fast")).chosen == "fast"
    assert made == [1]
    with pytest.raises(ValueError, match="need their names"):
        Autotuner(cache).choose("op", "shape D", make)


def test_a_damaged_cache_costs_a_measurement_not_a_crash(tmp_path):
    cache = tmp_path / "autotune.json"
    cache.write_text("{not json")
    assert Autotuner(cache, budget_ms=1).choose("op", "k", {"a": lambda: None, "b": lambda: None}).chosen in "ab"


def test_measure_times_round_robin():
    order = []
    measure({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, budget_ms=0.0)
    assert order[:2] == ["a", "b"] and order[2:8] == ["a", "b"] * 3  # warm-up, then interleaved


def test_grouped_mm_candidates_compute_the_same_function():
    """The loop and F.grouped_mm give the same values and gradients (here: the same bits), so the
    measured choice changes speed only."""
    cands = grouped_gemm.tuning_candidates(96, 4, 32, 48)
    assert set(cands) == {"grouped", "loop"}  # Triton only on CUDA
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 32, generator=g, requires_grad=True)
    w = torch.randn(4, 48, 32, generator=g, requires_grad=True)
    offs = torch.tensor([10, 40, 40, 96], dtype=torch.int32)
    outs = {}
    try:
        for impl in ("grouped", "loop"):
            set_op_backend("grouped_mm", "auto")
            set_op_impl("grouped_mm", impl)
            assert op_impl("grouped_mm") == impl
            y = grouped_gemm.grouped_mm(x, w.transpose(-2, -1), offs)
            y.square().sum().backward()
            outs[impl] = (y.detach(), x.grad.clone(), w.grad.clone())
            x.grad = w.grad = None
        set_op_backend("grouped_mm", "reference")
        assert op_impl("grouped_mm") is None  # a configured backend ignores the measurement
    finally:
        set_op_impl("grouped_mm", None)
        set_op_backend("grouped_mm", "auto")
    for a, b in zip(outs["grouped"], outs["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 7, 64, 1000])
def test_every_chunk_size_computes_the_same_loss(chunk):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (300,), generator=g)
    wt = torch.rand(300, generator=g)
    ref = masked_cross_entropy.masked_cross_entropy_reference_full(h, w, t, wt)
    try:
        masked_cross_entropy.set_tuned_chunk_tokens(chunk)
        got = masked_cross_entropy.masked_cross_entropy(h, w, t, wt)
    finally:
        masked_cross_entropy.set_tuned_chunk_tokens(None)
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-5, atol=1e-4)
    assert set(masked_cross_entropy.tuning_candidates(300, 16, 50)) == {"128", "256", "300"}


def test_the_machine_cache_makes_every_run_choose_alike(tmp_path):
    shared = tmp_path / "machine.json"
    first = Autotuner(tmp_path / "run1.json", shared_file=shared, budget_ms=1).choose(
        "op", "k", {"a": lambda: None, "b": lambda: time.sleep(0.002)})
    second = Autotuner(tmp_path / "run2.json", shared_file=shared).choose(
        "op", "k", {"a": lambda: time.sleep(0.002), "b": lambda: None})  # would now measure b faster
    assert first.chosen == second.chosen == "a" and second.cached
    assert (tmp_path / "run2.json").is_file()  # the run folder records what the run used


def test_concurrent_jobs_keep_each_others_entries_and_the_first_measurement(tmp_path):
    """Issue 32: jobs sharing the machine cache rewrote each other's timings. Two jobs opened the
    cache before either wrote: both entries survive, and the one measured first is kept."""
    shared = tmp_path / "machine.json"
    a = Autotuner(tmp_path / "a.json", shared_file=shared, budget_ms=1)
    b = Autotuner(tmp_path / "b.json", shared_file=shared, budget_ms=1)
    a.choose("op", "k1", {"x": lambda: None, "y": lambda: time.sleep(0.002)})
    b.choose("op", "k2", {"x": lambda: None, "y": lambda: time.sleep(0.002)})
    first = a.choose("op", "k3", {"x": lambda: None, "y": lambda: time.sleep(0.002)})
    b.choose("op", "k3", {"x": lambda: time.sleep(0.002), "y": lambda: None})  # b opened before a wrote k3
    (entries,) = json.loads(shared.read_text()).values()
    assert set(entries) == {"op|k1", "op|k2", "op|k3"}
    assert entries["op|k3"]["chosen"] == first.chosen == "x"
    later = Autotuner(tmp_path / "c.json", shared_file=shared).choose("op", "k3", {"x": None, "y": None})
    assert later.cached and later.chosen == "x"


def test_a_shared_entry_timed_under_load_is_measured_again(tmp_path):
    """An entry records the matmul peak of the job that timed it; a job whose own peak is over
    twice that finds it implausible, measures, says so, and replaces it."""
    shared = tmp_path / "machine.json"
    Autotuner(tmp_path / "a.json", shared_file=shared, budget_ms=1, peak_flops=1e11).choose(
        "op", "k", {"x": lambda: None, "y": lambda: time.sleep(0.002)})
    near = Autotuner(tmp_path / "b.json", shared_file=shared, peak_flops=1.9e11).choose(
        "op", "k", {"x": None, "y": None})
    assert near.cached and near.chosen == "x"
    fresh = Autotuner(tmp_path / "c.json", shared_file=shared, budget_ms=1, peak_flops=1e12).choose(
        "op", "k", {"x": lambda: time.sleep(0.002), "y": lambda: None})
    assert not fresh.cached and fresh.chosen == "y"
    assert fresh.line().endswith("; not the machine cache's answer: it was timed at a matmul peak of 0.1 TFLOP/s, "
                                 "this job's is 1 (a loaded machine then))")
    (entries,) = json.loads(shared.read_text()).values()
    assert entries["op|k"]["chosen"] == "y" and entries["op|k"]["peak_flops"] == 1e12
