"""Every kernel, in every tile configuration, compiles ahead of time for Hopper and Blackwell,
specialised the way the JIT specialises a launch (aligned pointers, divisible ints, unit strides
as constants). The grouped-GEMM candidates compile to what the GPU really runs: a multi-stage
cp.async (or TMA) pipeline, tensor-core MMA (wgmma on sm_90, tcgen05 on sm_100), no spills, and
shared memory a block can have. Runs without a GPU."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run(code: str) -> str:
    # Compilation needs the real (not interpreted) triton.jit: a fresh process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _report(arch: int) -> dict:
    out = _run("import json\nfrom rnd1.kernels.aot import report_rows\n"
               f"print(json.dumps(report_rows({arch})))\n")
    return {r["name"]: r for r in json.loads(out.strip().splitlines()[-1])}


def test_jit_specialisation_is_derived_from_sample_arguments():
    """The attrs come from the JIT's own binder: aligned pointers and multiple-of-16 ints get
    tt.divisibility 16, unit strides become constants, an odd int gets nothing."""
    out = _run(
        "from rnd1.kernels.aot import SampleTensor, jit_specialization\n"
        "from rnd1.kernels.grouped_gemm import _grouped_mm_kernel as k\n"
        "import torch\n"
        "x = SampleTensor(torch.bfloat16, (64, 2048)); w = SampleTensor(torch.bfloat16, (16, 768, 2048))\n"
        "args = dict(x_ptr=x, w_ptr=w, y_ptr=x, offs_ptr=SampleTensor(torch.int32, (16,)), G=16, N=64, M=777,\n"
        "            K=2048, sxn=2048, sxk=1, swg=768 * 2048, swk=1, swm=2048, syn=2048, sym=1)\n"
        "sig, ce, attrs, opts = jit_specialization(k, args, dict(NUM_PROGRAMS=132, BLOCK_N=64, BLOCK_M=128,\n"
        "                                          BLOCK_K=64), 4, 4, 90)\n"
        "names = list(k.arg_names)\n"
        "print(sorted(n for (i,), a in attrs.items() if a for n in [names[i]]))\n"
        "print(sorted(n for n, t in sig.items() if t == 'constexpr' and not n.isupper()))\n"
        "print(opts.num_stages)\n")
    div, consts, stages = out.strip().splitlines()[-3:]
    assert eval(div) == ["G", "K", "N", "offs_ptr", "swg", "swm", "sxn", "syn", "w_ptr", "x_ptr", "y_ptr"]
    assert eval(consts) == ["swk", "sxk", "sym"]
    assert stages == "4"


def test_every_kernel_compiles_for_sm90_and_gemm_candidates_are_pipelined_wgmma_without_spills():
    rows = _report(90)
    assert {"dispatch_gather", "combine", "combine_backward", "masked_ce_lse", "masked_ce_grad_dh",
            "masked_ce_grad_dw"} <= set(rows)
    assert all(0 < r["registers"] <= 255 for r in rows.values())
    # every kernel as the JIT specialises a launch (the dispatch and CE kernels were compiled from
    # bare pointer types: 169 registers and no cp.async for masked_ce_lse, not what runs)
    assert all(r["specialised"] for r in rows.values()), [n for n, r in rows.items() if not r["specialised"]]
    assert rows["masked_ce_lse"]["cp_async"] and rows["masked_ce_lse"]["spill_stores"] == 0
    assert any(n.startswith("grouped_mm_dx") for n in rows)  # the dx layout is reported too
    gemms = {n: r for n, r in rows.items() if n.startswith("grouped_mm_")}
    assert any(n.startswith("grouped_mm_fwd") for n in gemms) and any(n.startswith("grouped_mm_dw") for n in gemms)
    for n, r in gemms.items():
        assert r["specialised"], n
        assert r["wgmma"], n
        assert r["cp_async"] or r["tma"], n
        assert r["num_stages"] >= 3, n
        assert r["spill_stores"] == 0 and r["stack_bytes"] == 0, (n, r)
        assert r["fits_shared"], (n, r["shared_bytes"])
    print(json.dumps(gemms, indent=1))


def test_default_grouped_gemm_configs_compile_for_sm100_with_tcgen05():
    from rnd1.kernels.grouped_gemm import DW_GPU_CONFIGS, GPU_CONFIGS, config_name

    rows = _report(100)
    for name in (config_name("fwd", GPU_CONFIGS[0]), config_name("fwd", GPU_CONFIGS[1]),
                 config_name("dw", DW_GPU_CONFIGS[0])):
        r = rows[name]
        assert r["tcgen05"] and r["cp_async"] and r["num_stages"] >= 3, (name, r)
        assert r["spill_stores"] == 0 and r["fits_shared"], (name, r)


def test_grouped_gemm_row_and_group_offsets_are_int64():
    """rows x row-stride and group x group-stride pass 2^31 at large shapes: the pointer
    arithmetic on them must be 64-bit in the compiled IR (forward and dW)."""
    out = _run(
        "import re\nfrom rnd1.kernels.aot import all_specs, compile_spec\n"
        "for s in all_specs():\n"
        "    if s[0].startswith('grouped_mm_'):\n"
        "        ir = compile_spec(s, 90).asm['ttir']\n"
        "        rows = bool(re.search(r'tt.addptr [^\\n]*tensor<\\d+x1x!tt.ptr<bf16>>, tensor<\\d+x1xi64>', ir)\n"
        "                    or re.search(r'tt.addptr [^\\n]*tensor<1x\\d+x!tt.ptr<bf16>>, tensor<1x\\d+xi64>', ir))\n"
        "        group = bool(re.search(r'tt.addptr [^\\n]*!tt.ptr<bf16>, i64', ir))\n"
        "        print(s[0], rows, group)\n")
    lines = [l.split() for l in out.strip().splitlines()]
    assert len(lines) >= 4
    assert all(l[1] == "True" for l in lines), lines
    assert all(l[2] == "True" for l in lines if "_fwd_" in l[0]), lines


def test_every_tile_the_chooser_may_pick_compiles_without_spills_in_both_layouts_and_dtypes():
    """For each weight layout (K-contiguous: forward; M-contiguous: dx) and operand dtype, every
    config ``grouped_gemm.candidates`` lets through compiles for sm_90 without spills and within
    a block's shared memory. Before, any config could be picked for any layout and dtype: the
    128x256x64 tile spills in the dx layout (17 stores, 72 B of stack), and three fp32 tiles need
    262-295 KB of shared memory."""
    out = _run(
        "import json, torch\n"
        "from rnd1.kernels.aot import SampleTensor, compile_spec, resource_usage\n"
        "from rnd1.kernels import grouped_gemm as gg\n"
        "G, N = 16, 32768\n"
        "rows = []\n"
        "for dt, prec in ((torch.bfloat16, 'tf32'), (torch.float32, 'ieee')):\n"
        "  for layout in ('k', 'm'):\n"
        "    for K, M in ((2048, 768), (768, 2048)):\n"
        "      x, y = SampleTensor(dt, (N, K)), SampleTensor(dt, (N, M))\n"
        "      w = SampleTensor(dt, (G, M, K) if layout == 'k' else (G, K, M))\n"
        "      swk, swm = (w.stride(2), w.stride(1)) if layout == 'k' else (w.stride(1), w.stride(2))\n"
        "      args = dict(x_ptr=x, w_ptr=w, y_ptr=y, offs_ptr=SampleTensor(torch.int32, (G,)), G=G, N=N, M=M, K=K,\n"
        "                  sxn=x.stride(0), sxk=x.stride(1), swg=w.stride(0), swk=swk, swm=swm, syn=y.stride(0), sym=y.stride(1))\n"
        "      ok, skipped = gg.candidates(gg.tile_key('fwd', N, G, K, M, dt, layout))\n"
        "      for c in ok:\n"
        "        ce = {'NUM_PROGRAMS': 132, **{k: v for k, v in c.items() if k.startswith('BLOCK')}, 'PRECISION': prec}\n"
        "        r = resource_usage(compile_spec((gg.config_name('fwd', c), gg._grouped_mm_kernel, args, ce,\n"
        "                                         c['num_warps'], c['num_stages']), 90))\n"
        "        rows.append([str(dt), layout, K, M, gg.config_name('fwd', c), r['spill_stores'], r['fits_shared']])\n"
        "print(json.dumps(rows))\n")
    rows = json.loads(out.strip().splitlines()[-1])
    assert rows and {(r[0], r[1]) for r in rows} == {(d, l) for d in ("torch.bfloat16", "torch.float32") for l in "km"}
    bad = [r for r in rows if r[5] or not r[6]]
    assert not bad, bad
