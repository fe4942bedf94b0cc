"""Masked attention: FlexAttention with a BlockMask against SDPA with the dense boolean mask, for
every mask kind the project uses, at L = 1024, 4096 and 8192.

    python scripts/bench_attention.py                              # all kinds and lengths (CPU: ~10 min)
    python scripts/bench_attention.py --lengths 1024 --reps 1      # quick
    python scripts/bench_attention.py --json out.jsonl             # also one JSON line per row

Kinds (``rnd1.model.attention_masks``): ``documents`` (packed documents, bidirectional: the
diffusion SFT recipe; document lengths drawn around ``--doc-len``), ``two_stream`` (block
diffusion's [x_t | x0] stream: 2L queries and keys, blocks of ``--block-size``) and
``block_causal`` (the block sampler's prefix without KV cache). On CUDA each kind is also
compared with unmasked SDPA (the flash kernel) at the same shape: the GPU target is flex within
1.2x of it.

Per row: the mask's own bytes (dense bool vs the BlockMask's tile tables), the time to build it,
forward and forward+backward time (median of ``--reps`` after a warm-up call that compiles),
and the peak extra memory of one forward+backward (forward on the CPU, where torch's
FlexAttention has no backward): the resident-set high-water mark on the CPU (each method in a
fresh process, glibc returning freed blocks at once), ``max_memory_allocated`` on CUDA, counted
from before the mask is built (on CUDA all rows run in one process). The fraction of 128 x 128 tiles that are empty is what
FlexAttention skips.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = ("documents", "two_stream", "block_causal")


def make_pattern(kind: str, L: int, block_size: int, doc_len: int, device):
    from rnd1.model.attention_masks import BlockCausal, Documents, TwoStream

    if kind == "documents":
        g = torch.Generator().manual_seed(0)
        lengths, total = [], 0
        while total < L:  # lengths uniform in [doc_len / 4, 7 doc_len / 4]: mean doc_len
            n = int(torch.randint(doc_len // 4, 7 * doc_len // 4 + 1, (), generator=g))
            lengths.append(min(n, L - total))
            total += lengths[-1]
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return Documents(ids[None].to(device), causal=False)
    if kind == "two_stream":
        return TwoStream(L, block_size, device=device)
    if kind == "block_causal":
        return BlockCausal.prefix(L, block_size, 1, device)
    raise ValueError(kind)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _median(fn, reps, dev) -> float:
    times = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def child(a) -> dict:
    """One (kind, L, method) in this process: JSON on stdout."""
    from rnd1.kernels.bench.common import peak_rss_mib, reset_peak_rss, rss_mib
    from rnd1.model import attention

    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    pattern = make_pattern(a.kind, a.length, a.block_size, a.doc_len, dev)
    _, Lq, Lk = pattern.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, a.head_dim, generator=g).to(dev, dtype)
               for h, n in ((a.heads, Lq), (a.kv_heads, Lk), (a.kv_heads, Lk)))
    grad = a.method == "sdpa_unmasked" or a.method == "sdpa" or attention.flex_backward_supported(dev)

    def build():
        if a.method == "flex":
            return attention.block_mask(pattern, dev)
        return None if a.method == "sdpa_unmasked" else pattern.dense()

    def call(mask, backward):
        qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
        out = attention.attend(qq, kk, vv, mask, False, a.kv_heads != a.heads)
        if backward:
            out.sum().backward()

    attention._CACHE.clear()
    call(build(), grad)  # warm-up: compiles flex (and the mask builder) for this shape
    attention._CACHE.clear()

    def peak_of(backward: bool) -> int:
        """Peak extra bytes of building the mask and one call, from before the mask exists."""
        attention._CACHE.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            base = rss_mib() * 2**20
        call(build(), backward)
        _sync(dev)
        return (torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss_mib() * 2**20) - base

    peak_fwd = peak_of(False)
    peak_fwd_bwd = peak_of(True) if grad else None
    attention._CACHE.clear()  # time a first build (a run then reuses a shape-only BlockMask)
    t0 = time.perf_counter()
    mask = build()
    _sync(dev)
    build_s = time.perf_counter() - t0
    res = {"kind": a.kind, "length": a.length, "queries": Lq, "method": a.method, "device": dev.type,
           "dtype": a.dtype, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
           "mask_bytes": 0 if mask is None else (attention.block_mask_bytes(mask) if a.method == "flex"
                                                  else mask.numel() * mask.element_size()),
           "build_s": build_s, "fwd_s": _median(lambda: call(mask, False), a.reps, dev),
           "fwd_bwd_s": _median(lambda: call(mask, True), a.reps, dev) if grad else None,
           "peak_fwd_bytes": peak_fwd, "peak_fwd_bwd_bytes": peak_fwd_bwd}
    if a.method == "flex":
        from torch.nn.attention.flex_attention import BlockMask

        assert isinstance(mask, BlockMask)
        nq, nk = -(-Lq // 128), -(-Lk // 128)
        full = 0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum().item()
        res["empty_tiles"] = 1 - (mask.kv_num_blocks.sum().item() + full) / (nq * nk * mask.kv_num_blocks.shape[0])
    return res


def cpu_model() -> str:
    try:
        from rnd1.kernels.cpu import cpu_info

        return cpu_info().model
    except Exception:  # noqa: BLE001 - a label only
        return platform.processor() or "unknown CPU"


def _pct(x):
    return "" if x is None else f"{x:.0%}"


def _mib(x):
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def _fmt_s(x):
    return "n/a" if x is None else f"{x * 1e3:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32, help="diffusion block size (two_stream, block_causal)")
    ap.add_argument("--doc-len", type=int, default=512, help="mean document length (documents)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="", help="also append one JSON line per row to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return 0
    methods = ["sdpa", "flex"] + (["sdpa_unmasked"] if a.device == "cuda" else [])
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else cpu_model()
    print(f"# bench_attention on {device_name} ({os.cpu_count()} CPUs visible, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, {a.dtype}, heads {a.heads}/{a.kv_heads} x {a.head_dim}, blocks of "
          f"{a.block_size}, documents ~{a.doc_len}")
    print("| kind | L | queries | method | mask bytes | build ms | fwd ms | fwd+bwd ms | peak MiB fwd | "
          "peak MiB fwd+bwd | empty tiles | flex speed-up (fwd / fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for kind in a.kinds:
        for L in a.lengths:
            rows = {}
            for m in methods:
                cmd = [sys.executable, __file__, "--child", "--kind", kind, "--length", str(L), "--method", m,
                       "--heads", str(a.heads), "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim),
                       "--block-size", str(a.block_size), "--doc-len", str(a.doc_len), "--dtype", a.dtype,
                       "--device", a.device, "--reps", str(a.reps)]
                if a.device == "cuda":  # max_memory_allocated is exact in one process (and compiles are shared)
                    rows[m] = child(argparse.Namespace(**{**vars(a), "kind": kind, "length": L, "method": m}))
                    continue
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    print(f"{kind} L={L} {m}: failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    return 1
                rows[m] = json.loads(out.stdout.strip().splitlines()[-1])
            s, f = rows["sdpa"], rows["flex"]
            up_fwd = s["fwd_s"] / f["fwd_s"]
            up_bwd = f"{s['fwd_bwd_s'] / f['fwd_bwd_s']:.2f}x" if f["fwd_bwd_s"] else "n/a (no CPU backward)"
            for m, r in rows.items():
                print(f"| {kind} | {L} | {r['queries']} | {m} | {r['mask_bytes']:,} | {r['build_s'] * 1e3:.1f} | "
                      f"{_fmt_s(r['fwd_s'])} | {_fmt_s(r['fwd_bwd_s'])} | {_mib(r['peak_fwd_bytes'])} | "
                      f"{_mib(r['peak_fwd_bwd_bytes'])} | {_pct(r.get('empty_tiles'))} | "
                      f"{f'{up_fwd:.2f}x / {up_bwd}' if m == 'flex' else ''} |", flush=True)
                if a.json:
                    with open(a.json, "a") as fh:
                        fh.write(json.dumps({**r, "device_name": device_name}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
