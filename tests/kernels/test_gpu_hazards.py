"""Hazards a first GPU run would hit, checked on the CPU (issue 27): 32-bit element offsets, Triton
kernels that autocast never reaches, host syncs in the expert matmul's tail, the grouped GEMM's
tile choice (key, shared memory, launch failures, one choice for every rank)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

interpreting = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------- 64-bit offsets
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    from rnd1.kernels.offsets import row_offset

    @triton.jit
    def _offset_probe(row_ptr, out_ptr, width):
        row = tl.load(row_ptr)  # int32, like a program id or an int32 index
        tl.store(out_ptr, row_offset(row, width))
        tl.store(out_ptr + 1, (row * width).to(tl.int64))


@interpreting
def test_row_offset_is_64_bit_where_the_plain_product_wraps():
    """2^20 rows x width 2^12 = 2^32 elements: the plain int32 product wraps to 0 (what the
    gather kernel computed for ``row * H``), ``row_offset`` does not."""
    row = torch.tensor([1 << 20], dtype=torch.int32)
    out = torch.zeros(2, dtype=torch.int64)
    _offset_probe[(1,)](row, out, 1 << 12)
    assert out[0].item() == 1 << 32
    assert out[1].item() != 1 << 32  # the interpreter reproduces the overflow this guards against


def test_every_kernel_row_product_goes_through_row_offset():
    """No kernel multiplies a row index by a width in 32 bits any more."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "rnd1" / "kernels"
    bad = []
    for f in ("token_dispatch.py", "masked_cross_entropy_triton.py"):
        for n, line in enumerate((root / f).read_text().splitlines(), 1):
            if "_ptr +" in line and re.search(r"\b(row|rows|t|p|safe|cols|lr)(\[[^\]]*\])? \* (H|K|n_cols)\b", line):
                bad.append(f"{f}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- autocast
@interpreting
@pytest.mark.parametrize("op", ["grouped_mm", "masked_ce"])
def test_triton_kernels_see_the_autocast_dtype(op, monkeypatch):
    """fp32 parameters under fp16 autocast: the Triton kernel gets fp16 operands, as a plain
    matmul would (fp16 here: the interpreter's bf16 dot is wrong). Before, it got fp32."""
    from rnd1.kernels import grouped_gemm, masked_cross_entropy_triton

    seen = []
    if op == "grouped_mm":
        real = grouped_gemm.grouped_mm_triton
        monkeypatch.setattr(grouped_gemm, "grouped_mm_triton",
                            lambda x, w, offs, config=None: (seen.append((x.dtype, w.dtype)), real(x, w, offs, config))[1])
        x = torch.randn(12, 16, requires_grad=True)
        w = torch.randn(3, 32, 16, requires_grad=True)  # [E, out, in] as the experts store it
        with torch.autocast("cpu", dtype=torch.float16):
            y = grouped_gemm.grouped_mm(x, w.transpose(-2, -1), torch.tensor([4, 8, 12], dtype=torch.int32),
                                        backend="triton")
        y.float().sum().backward()
    else:
        from rnd1.kernels.masked_cross_entropy import masked_cross_entropy

        real = masked_cross_entropy_triton.fused_forward_triton
        monkeypatch.setattr(masked_cross_entropy_triton, "fused_forward_triton",
                            lambda h, w, *a: (seen.append((h.dtype, w.dtype)), real(h, w, *a))[1])
        h = torch.randn(8, 16, requires_grad=True)
        w = torch.randn(40, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = masked_cross_entropy(h, w, torch.randint(0, 40, (8,)), torch.ones(8), backend="triton")
        loss.backward()
    assert seen and all(d == (torch.float16, torch.float16) for d in seen), seen
    assert w.grad is not None and w.grad.dtype == torch.float32  # the gradient returns in the parameter's dtype


# ----------------------------------------------------------------------------- host syncs
class _NoHostReads(TorchDispatchMode):
    """Fails on the op behind ``.item()`` / ``int(t)`` / ``.tolist()``: a host sync on a GPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host read of a device value")
        return func(*args, **(kwargs or {}))


def test_zero_tail_off_the_host_reads_nothing_and_zeroes_the_tail():
    from rnd1.kernels.grouped_gemm import _zero_tail

    offs = torch.tensor([2, 5], dtype=torch.int32)
    with _NoHostReads():
        got = _zero_tail(torch.ones(7, 3), offs, on_host=False)  # the path every non-CPU device takes
    assert torch.equal(got, _zero_tail(torch.ones(7, 3), offs, on_host=True))
    assert got[5:].abs().sum() == 0 and got[:5].eq(1).all()
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        _zero_tail(torch.ones(7, 3), offs, on_host=True)  # the check has teeth


# ----------------------------------------------------------------------------- tile choice
def test_tile_key_names_dtype_and_weight_layout():
    """The down projection's forward and gate/up's dx share K, M but not the weight layout; bf16
    and fp32 need different tiles. Before, all four were one key (kind, rows, K, M)."""
    from rnd1.kernels import grouped_gemm as gg

    keys = {gg.tile_key("fwd", 32768, 16, 768, 2048, dt, layout)
            for dt in (torch.bfloat16, torch.float32) for layout in ("k", "m")}
    assert len(keys) == 4
    stored = torch.empty(16, 2048, 768)  # [E, out, in]
    assert gg.weight_layout(stored.transpose(-2, -1)) == "k"  # forward: the weight transposed
    assert gg.weight_layout(stored.transpose(-2, -1).transpose(1, 2)) == "m"  # dx: transposed back


def test_fp32_never_gets_a_tile_that_needs_more_shared_memory_than_a_block_has():
    """In fp32, three of the four forward tiles need 262-295 KB of shared memory (the limit is
    227 KiB): they are not candidates, and the deterministic pick takes one that fits."""
    from rnd1.kernels import grouped_gemm as gg

    key = gg.tile_key("fwd", 32768, 16, 2048, 768, torch.float32, "k")
    ok, skipped = gg.candidates(key)
    memory = [n for n, why in skipped.items() if "shared memory" in why]
    assert len(memory) == 3 and ok
    for c in ok:
        assert gg.shared_bytes("fwd", c, 4) <= gg.SHARED_MEMORY_LIMIT
    assert gg._choose(key) in ok
    assert gg.shared_bytes("fwd", gg._choose(gg.tile_key("fwd", 32768, 16, 2048, 768, torch.bfloat16, "k")), 2) \
        <= gg.SHARED_MEMORY_LIMIT


def test_the_tile_that_spills_in_the_dx_layout_is_only_used_forward():
    from rnd1.kernels import grouped_gemm as gg

    name = "grouped_mm_fwd_128x256x64_w8s3"
    fwd_ok, _ = gg.candidates(gg.tile_key("fwd", 32768, 16, 768, 2048, torch.bfloat16, "k"))
    dx_ok, dx_skipped = gg.candidates(gg.tile_key("fwd", 32768, 16, 768, 2048, torch.bfloat16, "m"))
    assert name in {gg.config_name("fwd", c) for c in fwd_ok}
    assert name in dx_skipped and name not in {gg.config_name("fwd", c) for c in dx_ok}


def test_tiles_are_chosen_at_start_up_never_timed_during_training(monkeypatch):
    """Unmeasured problems get the deterministic pick on every rank; a measured choice
    (``set_tuned_tile``, what rank 0's start-up measurement broadcasts) wins."""
    import triton.testing

    from rnd1.kernels import grouped_gemm as gg

    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed during training"))
    key = gg.tile_key("fwd", 32768, 16, 2048, 768, torch.bfloat16, "k")
    first = gg._choose(key)
    assert gg._choose(key) is first
    other = next(c for c in gg.GPU_CONFIGS if c is not first and "layouts" not in c)
    gg.set_tuned_tile(key, gg.config_name("fwd", other))
    try:
        assert gg._choose(key) is other
    finally:
        gg.set_tuned_tile(key, None)
    problems = gg.tile_problems(32768, 16, 2048, 768, torch.bfloat16)
    assert len(set(problems)) == 6 and {p[5] for p in problems if p[0] == "fwd"} == {"k", "m"}


def test_a_candidate_that_cannot_launch_is_skipped_and_logged(tmp_path):
    """OutOfResources at launch drops the candidate (logged in the choice's line) instead of
    failing the run; only when nothing can run is it an error."""
    from triton.runtime.errors import OutOfResources

    from rnd1.kernels.autotune import Autotuner

    def too_big():
        raise OutOfResources(294912, 232448, "shared memory")

    tuner = Autotuner(tmp_path / "a.json")
    choice = tuner.choose("grouped_mm_tile", "k1", {"big": too_big, "small": lambda: None, "mid": lambda: None})
    assert choice.chosen in ("small", "mid") and "big" in choice.skipped
    assert "skipped big (OutOfResources" in choice.line()
    with pytest.raises(RuntimeError, match="no candidate can run"):
        tuner.choose("grouped_mm_tile", "k2", {"big": too_big, "huge": too_big})


@interpreting
def test_tiles_that_cannot_fit_are_named_in_the_tuners_log_line(tmp_path):
    """The start-up tuner's candidates for an fp32 problem (``tile_candidates``, run here by the
    interpreter at a tiny shape) include the tiles that cannot fit: they raise CannotRun, and the
    choice's line names each with its reason."""
    from rnd1.kernels import grouped_gemm as gg
    from rnd1.kernels.autotune import Autotuner

    key = gg.tile_key("fwd", 64, 4, 32, 32, torch.float32, "k")
    _, skipped = gg.candidates(key)
    assert skipped
    choice = Autotuner(tmp_path / "a.json", budget_ms=1.0).choose(
        "grouped_mm_tile", "k", gg.tile_candidates(key, 64, 4, device="cpu"))
    assert set(choice.skipped) == set(skipped) and choice.chosen not in skipped
    for name, why in skipped.items():
        assert name in choice.line() and why in choice.skipped[name]
    assert any("shared memory" in why for why in skipped.values())


@interpreting
def test_a_triton_moe_layer_reads_nothing_back_the_reference_path_does():
    """gpu_check's host-read count over one MoE layer forward + backward: 0 with every op on
    Triton; on the CPU reference path the nine reads of ``offs[-1]`` (three grouped GEMMs forward,
    six backward) show the count sees reads inside the custom ops."""
    from rnd1.kernels.bench.gpu_check import host_reads_per_moe_layer

    assert host_reads_per_moe_layer("cpu", True, "triton") == 0
    assert host_reads_per_moe_layer("cpu", True, "reference") == 9
