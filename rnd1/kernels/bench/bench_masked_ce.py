"""Masked cross-entropy: the chunked reference (what CPU training runs) against the full-logits
baseline, forward + backward, time and peak extra memory; Triton with do_bench on a GPU.

    python -m rnd1.kernels.bench.bench_masked_ce                       # N=8192, H=2048, V=151936, half selected
    python -m rnd1.kernels.bench.bench_masked_ce --n 2048 --v 32768    # quicker

Peak extra memory = the resident-set high-water mark during the first call (reset after the
inputs exist) minus the resident set before it, each method in a fresh subprocess."""

from __future__ import annotations

import argparse
import json

import torch

import time

from rnd1.kernels.bench.common import matmul_peak, median_time, peak_rss_mib, reset_peak_rss, rss_mib, run_isolated


def make_inputs(a):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    n_sel = int(a.n * a.frac)
    h = (torch.randn(n_sel, a.h, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(a.v, a.h, generator=g) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, a.v, (n_sel,), generator=g)
    wt = torch.rand(n_sel, generator=g) + 0.5
    return h, w, t, wt


def method_fn(name, h, w, t, wt):
    from rnd1.kernels.masked_cross_entropy import masked_cross_entropy

    if name == "fused_reference":
        return lambda: masked_cross_entropy(h, w, t, wt, backend="reference").backward()
    if name == "fused_reference_vocab_chunked":
        return lambda: masked_cross_entropy(h, w, t, wt, backend="reference", chunk_tokens=0).backward()
    if name == "full_logits":
        def full():
            logits = h @ w.t()
            ce = torch.nn.functional.cross_entropy(logits.float(), t, reduction="none")
            (ce * wt).sum().backward()
        return full
    if name == "torch_linear_cross_entropy":
        def lce():  # per-row weights need reduction="none"
            ce = torch.nn.functional.linear_cross_entropy(h, w, t, reduction="none")
            (ce.float() * wt).sum().backward()
        return lce
    raise ValueError(name)


def child(a):
    h, w, t, wt = make_inputs(a)
    fn = method_fn(a.method, h, w, t, wt)
    tiny = [x[:8].detach().clone().requires_grad_(x.requires_grad) if x.dim() else x for x in (h, w)]
    method_fn(a.method, tiny[0], tiny[1], t[:8] % 8, wt[:8])()  # one-time op set-up off the clock
    reset_peak_rss()  # the inputs' creation must not count
    base = rss_mib()
    t0 = time.perf_counter()
    fn()  # first call: peak memory (and time) of one forward+backward
    first = time.perf_counter() - t0
    peak = peak_rss_mib() - base
    sec = median_time(fn, reps=a.reps, warmup=0) if a.reps > 0 else first
    print(json.dumps({"method": a.method, "seconds": sec, "peak_extra_mib": peak}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192, help="positions in the micro-batch")
    ap.add_argument("--frac", type=float, default=0.5, help="fraction selected (supervised)")
    ap.add_argument("--h", type=int, default=2048)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=0, help="timed calls after the first (0: time the first)")
    ap.add_argument("--method", default="fused_reference")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    n_sel = int(a.n * a.frac)
    flops = 3 * 2 * n_sel * a.v * a.h
    if torch.cuda.is_available():
        import triton

        from rnd1.kernels.masked_cross_entropy import masked_cross_entropy

        h, w, t, wt = (x.cuda() for x in make_inputs(a))
        ms = triton.testing.do_bench(lambda: masked_cross_entropy(h, w, t, wt, backend="triton").backward())
        print(f"triton fwd+bwd: {ms:.2f} ms, {flops / ms / 1e9:.1f} TFLOP/s ({flops / ms / 1e9 / 989:.1%} of H100 "
              f"dense bf16 peak)")
        return
    peak = matmul_peak(getattr(torch, a.dtype))
    print(f"N={a.n} ({n_sel} selected), H={a.h}, V={a.v}, {a.dtype}; bare {a.h}^3 matmul: {peak / 1e9:.0f} GFLOP/s")
    base = None
    args = [f"--n={a.n}", f"--frac={a.frac}", f"--h={a.h}", f"--v={a.v}", f"--dtype={a.dtype}", f"--reps={a.reps}"]
    for m in ("full_logits", "fused_reference", "fused_reference_vocab_chunked", "torch_linear_cross_entropy"):
        try:
            r = run_isolated("rnd1.kernels.bench.bench_masked_ce", args + [f"--method={m}"])
        except RuntimeError as e:
            print(f"{m:>28}: failed ({str(e).strip().splitlines()[-1][:120]})")
            continue
        base = base or r
        print(f"{m:>28}: {r['seconds'] * 1e3:8.0f} ms  {flops / r['seconds'] / 1e9:6.0f} GFLOP/s  "
              f"peak extra {r['peak_extra_mib']:8.0f} MiB ({r['peak_extra_mib'] / base['peak_extra_mib']:.1%} of "
              f"full logits, {base['seconds'] / r['seconds']:.2f}x its speed)")


if __name__ == "__main__":
    main()
