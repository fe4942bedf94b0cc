"""Grouped GEMM alone at Qwen3-30B-A3B per-rank shapes (16 experts, hidden 2048, expert 768),
forward + backward: the reference (one mm per group), torch.nn.functional.grouped_mm, and a
naive loop that masks the full batch per expert; on a GPU, the Triton kernel with do_bench.

    python -m rnd1.kernels.bench.bench_grouped_gemm [--rows 4096] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from rnd1.kernels.bench.common import matmul_peak, median_time
from rnd1.kernels.grouped_gemm import grouped_mm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--m", type=int, default=768)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    sizes = torch.distributions.Dirichlet(torch.full((a.groups,), 2.0)).sample() * a.rows
    sizes = sizes.floor().long()
    sizes[-1] += a.rows - sizes.sum()
    offs = sizes.cumsum(0).to(torch.int32).to(dev)
    x = torch.randn(a.rows, a.k, generator=g).to(dt).to(dev).requires_grad_()
    w = (torch.randn(a.groups, a.m, a.k, generator=g) * 0.02).to(dt).to(dev).requires_grad_()
    dy = torch.randn(a.rows, a.m).to(dt).to(dev)
    flops = 3 * 2 * a.rows * a.k * a.m

    def run(fn):
        return lambda: torch.autograd.backward(fn(), dy)

    if dev == "cuda":
        import triton

        ms = triton.testing.do_bench(run(lambda: grouped_mm(x, w.transpose(1, 2), offs, backend="triton")))
        print(f"triton grouped GEMM fwd+bwd: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s "
              f"({flops / ms / 1e9 / 989:.1%} of H100 dense bf16 peak)")
        # Every candidate tile (forward and dW kernels alone), and the one the shape-keyed pick uses.
        from rnd1.kernels import grouped_gemm as gg

        xd, wt, dyd = x.detach(), w.detach().transpose(1, 2), dy
        key = gg.shape_key(a.rows, a.groups, a.k, a.m)
        for kind, cands, call, f in [
                ("fwd", gg.GPU_CONFIGS, lambda c: gg.grouped_mm_triton(xd, wt, offs, config=c), 2 * a.rows * a.k * a.m),
                ("dw", gg.DW_GPU_CONFIGS, lambda c: gg.grouped_mm_dw_triton(xd, dyd, offs, a.groups, config=c, like=wt),
                 2 * a.rows * a.k * a.m)]:
            picked = gg._pick_config(key, cands)
            for c in cands:
                ms = triton.testing.do_bench(lambda c=c: call(c))
                print(f"  {gg.config_name(kind, c):34} {ms * 1e3:8.1f} us {f / ms / 1e9:7.1f} TFLOP/s"
                      f"{'  <- shape-keyed pick' if c is picked else ''}")
        return

    def naive():
        out = torch.zeros(a.rows, a.m, dtype=dt)
        group = torch.repeat_interleave(torch.arange(a.groups), sizes)
        for e in range(a.groups):
            idx = torch.where(group == e)[0]
            out.index_add_(0, idx, x[idx] @ w[e].t())
        return out

    peak = matmul_peak(dt, n=a.k)
    print(f"{a.groups} groups, {a.rows} rows, {a.k} -> {a.m}, {a.dtype}: {flops / 1e9:.1f} GFLOP fwd+bwd; "
          f"bare matmul peak {peak / 1e9:.0f} GFLOP/s")
    for name, fn in [("reference (mm per group)", lambda: grouped_mm(x, w.transpose(1, 2), offs, backend="reference")),
                     ("F.grouped_mm", lambda: torch.nn.functional.grouped_mm(x, w.transpose(1, 2), offs=offs)),
                     ("naive masking loop", naive)]:
        t = median_time(run(fn), reps=a.reps)
        print(f"  {name:26}: {t * 1e3:8.1f} ms  {flops / t / 1e9:7.1f} GFLOP/s ({flops / t / peak:.0%} of peak)")


if __name__ == "__main__":
    main()
