"""The whole MoE block (router, dispatch, gate/up/down grouped matmuls, SwiGLU, combine), forward
and backward, at Qwen3-30B-A3B-per-rank shapes: ours against the naive per-expert masking loop
(one_hot / where / index_add_, the style of transformers' eager Qwen3-MoE), plus a bare matmul
for the machine's peak, in one run. On a GPU, the Triton path with do_bench.

    python -m rnd1.kernels.bench.bench_moe_block                    # hidden 2048, expert 768, 16 experts, 4096 rows, bf16
    python -m rnd1.kernels.bench.bench_moe_block --dtype float32
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rnd1.kernels.bench.common import matmul_peak, median_time
from rnd1.kernels.grouped_gemm import grouped_mm
from rnd1.kernels.token_dispatch import combine, dispatch


def make(a, device="cpu"):
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, a.dtype)
    E, H, I = a.experts, a.hidden, a.inter
    p = {
        "router": (torch.randn(E, H, generator=g) * 0.02).to(dt),
        "gate": (torch.randn(E, I, H, generator=g) * 0.02).to(dt),
        "up": (torch.randn(E, I, H, generator=g) * 0.02).to(dt),
        "down": (torch.randn(E, H, I, generator=g) * 0.02).to(dt),
    }
    p = {k: v.to(device).requires_grad_() for k, v in p.items()}
    x = torch.randn(a.rows // a.topk, H, generator=g).to(dt).to(device).requires_grad_()
    return x, p


def route(x, p, k):
    probs = torch.softmax(F.linear(x, p["router"]), dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(x.dtype), ids


def ours(x, p, k, E, backend="auto"):
    w, ids = route(x, p, k)
    xs, info = dispatch(x, ids, E, backend=backend)
    h = F.silu(grouped_mm(xs, p["gate"].transpose(1, 2), info.offs, backend)) * \
        grouped_mm(xs, p["up"].transpose(1, 2), info.offs, backend)
    y = grouped_mm(h, p["down"].transpose(1, 2), info.offs, backend)
    return combine(y, info, w, backend=backend)


def naive(x, p, k, E):
    w, ids = route(x, p, k)
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, E).permute(2, 1, 0)  # [E, k, T]
    for e in range(E):
        slot, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = F.silu(xe @ p["gate"][e].t()) * (xe @ p["up"][e].t())
        out.index_add_(0, tok, (h @ p["down"][e].t()) * w[tok, slot, None])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4096, help="routed rows = tokens x top-k")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    flops = 3 * 3 * 2 * a.rows * a.hidden * a.inter  # 3 GEMMs, forward + 2 backward GEMMs each
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, p = make(a, dev)
    g = torch.randn_like(x)

    def step(fn):
        return lambda: torch.autograd.backward(fn(x, p, a.topk, a.experts), g)

    if dev == "cuda":
        import triton

        ms = triton.testing.do_bench(step(ours))
        print(f"triton MoE block fwd+bwd: {ms:.2f} ms, {flops / ms / 1e9:.1f} TFLOP/s "
              f"({flops / ms / 1e9 / 989:.1%} of H100 dense bf16 peak)")
        return
    peak = matmul_peak(getattr(torch, a.dtype), n=a.hidden)
    t_ours = median_time(step(ours), reps=a.reps)
    t_naive = median_time(step(naive), reps=a.reps)
    print(f"MoE block fwd+bwd, {a.dtype}, hidden {a.hidden}, expert {a.inter}, {a.experts} experts, {a.rows} routed rows "
          f"({flops / 1e9:.1f} GFLOP)")
    print(f"  bare {a.hidden}^3 matmul peak : {peak / 1e9:7.1f} GFLOP/s")
    print(f"  ours (sort + grouped GEMM)  : {t_ours * 1e3:7.1f} ms  {flops / t_ours / 1e9:7.1f} GFLOP/s "
          f"({flops / t_ours / peak:.0%} of peak)")
    print(f"  naive per-expert masking    : {t_naive * 1e3:7.1f} ms  {flops / t_naive / 1e9:7.1f} GFLOP/s "
          f"-> ours is {t_naive / t_ours:.2f}x faster")


if __name__ == "__main__":
    main()
