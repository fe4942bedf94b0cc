"""One-command GPU check of the kernels (issue 15, part 5).

    python -m rnd1.kernels.bench.gpu_check            # on one H100/H200: full per-rank shapes
    python -m rnd1.kernels.bench.gpu_check --tiny     # CPU, Triton interpreter, tiny shapes (CI)

Sections, one table each:

1. environment: torch / Triton versions, device, which torch alternatives exist;
2. correctness: every Triton kernel and its PyTorch reference against a float64 oracle (the
   reference path run on the same inputs upcast to float64), forward and backward. The error is
   max|a - oracle| / max|oracle| per tensor; tolerances are in ``TOL`` and printed;
3. reproducibility: the Triton backward run twice on the same inputs must give identical bits;
4. speed (CUDA only): each kernel forward + backward against the torch alternatives
   (``F.grouped_mm``, ``F.linear_cross_entropy``, the reference paths) with
   ``triton.testing.do_bench``: ms, TFLOP/s, GB/s and the fraction of the device's peak;
5. targets (issue 27), one table: host reads in a Triton MoE layer's forward and backward (must
   be 0: a check); the MoE layer against the reference backends; the grouped GEMM's forward, dx and dW apart at 32,768 and 262,144 rows
   against torch's grouped mm (>= 1.0x in bf16); the masked CE against ``F.linear_cross_entropy``
   or, without it, a chunked ``F.cross_entropy`` over materialised logits (<= its time and <= 10%
   of its peak memory). Speed targets are reported met / not met, never an exit code;
6. attention (issue 28): ``scripts/bench_attention.py``'s FlexAttention against dense-mask and
   unmasked SDPA at L 4096, 32 heads / 4 KV heads x 128 (Qwen3-30B-A3B), targets judged;
7. training (ms per step of both backends on a GPU): a few steps of ``rnd1.training.step.run_step`` (A2D objective) on the debug model
   and on a 2-layer Qwen3-30B-A3B-shaped model (16 local experts, top-8), Triton backends against
   the reference backends on the same first batch, then steps that must lower the loss.

Full shapes (Qwen3-30B-A3B per rank at EP 8): grouped GEMM 32,768 routed rows, 16 experts,
2048 -> 768; dispatch/combine 4,096 tokens x top-8 over 128 experts, hidden 2048; masked CE
16,384 rows (half of them ignored) x 2048 against a 151,936 vocabulary. ``--tiny`` (automatic
without CUDA) sets ``TRITON_INTERPRET=1`` before Triton is imported and checks fp32 and fp16
only: the interpreter's bf16 ``tl.dot`` is wrong. Speed is not measured on CPU.

Exit code 1 when any correctness, reproducibility or training check fails.
"""

from __future__ import annotations

import os
import sys


def _tiny_requested(argv) -> bool:
    if "--tiny" in argv:
        return True
    import torch

    return not torch.cuda.is_available()


if __name__ == "__main__" and _tiny_requested(sys.argv[1:]) and os.environ.get("TRITON_INTERPRET") != "1":
    # The interpreter is chosen when a kernel is decorated (import time of rnd1/kernels/*.py) and
    # Triton may read the variable when it is imported: set it first, or start again with it.
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        extra = [] if "--tiny" in sys.argv else ["--tiny"]
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:], *extra])

# the repository root (rnd1/kernels/bench/gpu_check.py -> four levels up), so the file also runs by
# path without an install; never rnd1/ itself, whose kernels/ would shadow Hugging Face's `kernels`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import argparse  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rnd1.kernels import backend as kbackend  # noqa: E402
from rnd1.kernels.grouped_gemm import grouped_mm  # noqa: E402
from rnd1.kernels.masked_cross_entropy import masked_cross_entropy  # noqa: E402
from rnd1.kernels.token_dispatch import combine, dispatch  # noqa: E402

# max|a - oracle| / max|oracle|, per dtype. Every kernel's fp32 tl.dot is IEEE while torch's
# TF32 flags are off (the default, and this script does not turn them on: rnd1.kernels.backend.
# dot_precision), so fp32 is held to fp32 accuracy.
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# loss and gradient-norm agreement of one training step, Triton against reference backends
TRAIN_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
# Dense peaks (SXM parts): bf16 / fp32 (no TF32) FLOP/s and HBM bytes/s.
PEAKS = {"H200": (989e12, 67e12, 4.8e12), "H100": (989e12, 67e12, 3.35e12)}

FAILURES: list[str] = []


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title} ==")
    for j, r in enumerate(cells):
        print("  " + " | ".join(c.ljust(w) for c, w in zip(r, width)))
        if j == 0:
            print("  " + "-+-".join("-" * w for w in width))
    sys.stdout.flush()


def rel_err(a: torch.Tensor, oracle: torch.Tensor) -> float:
    a, o = a.detach().double(), oracle.detach().double()
    return float((a - o).abs().max() / o.abs().max().clamp_min(1e-300))


def verdict(ok: bool, what: str) -> str:
    if not ok:
        FAILURES.append(what)
    return "ok" if ok else "FAIL"


# --------------------------------------------------------------------------- problems
class Problem:
    """One kernel: inputs, a call by backend returning (outputs, grads) and a cost model."""

    name = ""

    def grads(self, outs, inputs, cot):
        return torch.autograd.grad(outs, inputs, cot)


def _group_sizes(rows: int, groups: int, gen) -> torch.Tensor:
    w = torch.rand(groups, generator=gen) + 0.2
    w[1] = 0.0  # one expert without tokens: its dW must be exactly zero
    sizes = (w / w.sum() * rows).floor().long()
    sizes[-1] += rows - sizes.sum()
    return sizes


class GroupedMM(Problem):
    name = "grouped_mm"

    def __init__(self, rows, groups, k, m, tail, dtype, dev):
        g = torch.Generator().manual_seed(0)
        self.sizes = _group_sizes(rows, groups, g)
        self.offs = self.sizes.cumsum(0).to(torch.int32).to(dev)
        self.x = torch.randn(rows + tail, k, generator=g).to(dtype).to(dev)
        self.w = (torch.randn(groups, m, k, generator=g) * k ** -0.5).to(dtype).to(dev)  # model layout [E, out, in]
        self.dy = torch.randn(rows + tail, m, generator=g).to(dtype).to(dev)
        self.shape = f"{rows}+{tail} rows, {groups} groups, {k}->{m}"
        n, e = rows, torch.finfo(dtype).bits // 8
        self.flops = 3 * 2 * n * k * m
        self.bytes = 3 * (n * k + groups * k * m + n * m) * e

    def run(self, backend, dtype=None):
        x, w = (self.x, self.w) if dtype is None else (self.x.to(dtype), self.w.to(dtype))
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = grouped_mm(x, w.transpose(1, 2), self.offs, backend=backend)
        dx, dw = self.grads(y, (x, w), self.dy.to(y.dtype))
        return {"y": y, "dx": dx, "dw": dw}

    def extra_checks(self, r):
        tail_zero = bool(torch.all(r["y"][int(self.sizes.sum()):] == 0))
        empty_zero = bool(torch.all(r["dw"][1] == 0))
        return [("tail rows zero", tail_zero), ("empty-group dW exactly zero", empty_zero)]

    def alternatives(self):
        out = {}
        if hasattr(F, "grouped_mm"):
            def fgm():
                x, w = self.x.detach().requires_grad_(), self.w.detach().requires_grad_()
                torch.autograd.backward(F.grouped_mm(x, w.transpose(1, 2), offs=self.offs), self.dy)
            out["F.grouped_mm"] = fgm
        else:
            out["F.grouped_mm"] = None
        return out


class GroupedMMPhases:
    """The three grouped GEMMs of one projection timed apart (forward, dx, dW) against torch's
    grouped mm on the same operands: the target is >= 1.0x torch in bf16 for each."""

    def __init__(self, rows, groups, k, m, dtype, dev):
        g = torch.Generator().manual_seed(3)
        sizes = _group_sizes(rows, groups, g)
        self.offs = sizes.cumsum(0).to(torch.int32).to(dev)
        self.x = torch.randn(rows, k, generator=g).to(dtype).to(dev)
        self.w = (torch.randn(groups, m, k, generator=g) * k ** -0.5).to(dtype).to(dev)  # [E, out, in]
        self.dy = torch.randn(rows, m, generator=g).to(dtype).to(dev)
        self.rows, self.groups, self.k, self.m, self.dtype = rows, groups, k, m, dtype
        self.flops = 2 * rows * k * m  # each phase
        self.shape = f"{rows} rows, {groups} groups, {k}->{m}"

    def calls(self):
        """{phase: (triton call, torch call or None)}."""
        from rnd1.kernels.grouped_gemm import grouped_mm_dw_triton, grouped_mm_triton

        w_t = self.w.transpose(1, 2)  # [G, K, M], K-contiguous: the forward's layout
        w_dx = self.w  # [G, M, K] as stored, for dx = dy @ w: M-contiguous in the kernel's terms
        fgm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        tri = {"fwd": lambda: grouped_mm_triton(self.x, w_t, self.offs),
               "dx": lambda: grouped_mm_triton(self.dy, w_dx, self.offs),
               "dW": lambda: grouped_mm_dw_triton(self.x, self.dy, self.offs, self.groups, like=w_t)}
        if fgm is None:
            return {k: (v, None) for k, v in tri.items()}
        ref = {"fwd": lambda: fgm(self.x, w_t, offs=self.offs),
               "dx": lambda: fgm(self.dy, w_dx, offs=self.offs),
               "dW": lambda: fgm(self.dy.t(), self.x, offs=self.offs)}
        return {k: (tri[k], ref[k]) for k in tri}


class Dispatch(Problem):
    name = "dispatch+combine"

    def __init__(self, tokens, experts, topk, hidden, dtype, dev):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(tokens, hidden, generator=g).to(dtype).to(dev)
        probs = torch.rand(tokens, experts, generator=g)
        w, ids = probs.topk(topk, dim=-1)
        self.ids = ids.to(dev)
        self.tw = (w / w.sum(-1, keepdim=True)).to(dtype).to(dev)
        self.scale = (torch.rand(tokens * topk, 1, generator=g) + 0.5).to(dtype).to(dev)  # stands in for the experts
        self.dy = torch.randn(tokens, hidden, generator=g).to(dtype).to(dev)
        self.experts = experts
        self.shape = f"{tokens} tokens x top-{topk}, {experts} experts, hidden {hidden}"
        r, e = tokens * topk, torch.finfo(dtype).bits // 8
        self.flops = 0
        # gather: read + write R rows; combine: read R rows, write T; backward: the same again
        self.bytes = 2 * (2 * r * hidden + (r + tokens) * hidden) * e

    def run(self, backend, dtype=None):
        x, tw = (self.x, self.tw) if dtype is None else (self.x.to(dtype), self.tw.to(dtype))
        x, tw = x.detach().requires_grad_(), tw.detach().requires_grad_()
        xs, info = dispatch(x, self.ids, self.experts, backend=backend)
        y = combine(xs * self.scale.to(xs.dtype), info, tw, backend=backend)
        dx, dtw = self.grads(y, (x, tw), self.dy.to(y.dtype))
        return {"sorted": xs, "y": y, "dx": dx, "dw_topk": dtw}

    def extra_checks(self, r):
        return []

    def alternatives(self):
        """The model's own torch path (index_select / index_copy_ / bmm), i.e. LocalDispatcher with
        the dispatch op on ``reference``."""
        from rnd1.model.moe import LocalDispatcher

        def local():
            prev = kbackend.op_backend("dispatch") if hasattr(kbackend, "op_backend") else None
            if prev is not None:
                kbackend.set_op_backend("dispatch", "reference")
            try:
                x, tw = self.x.detach().requires_grad_(), self.tw.detach().requires_grad_()
                d = LocalDispatcher()
                xs, _, ctx = d.dispatch(x, self.ids, tw, self.experts)
                torch.autograd.backward(d.combine(xs, ctx), self.dy)
            finally:
                if prev is not None:
                    kbackend.set_op_backend("dispatch", prev)
        return {"model LocalDispatcher (torch ops)": local}


class MaskedCE(Problem):
    name = "masked_cross_entropy"

    def __init__(self, rows, hidden, vocab, dtype, dev):
        g = torch.Generator().manual_seed(2)
        self.h = torch.randn(rows, hidden, generator=g).to(dtype).to(dev)
        self.w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(dtype).to(dev)
        t = torch.randint(0, vocab, (rows,), generator=g)
        t[torch.rand(rows, generator=g) < 0.5] = -100  # half the rows ignored, as A2D leaves them
        self.t = t.to(dev)
        self.wt = (1.0 / (torch.rand(rows, generator=g) * 0.9 + 0.1)).to(dev)  # 1/t weights
        self.shape = f"{rows} rows (~half ignored) x {hidden}, vocab {vocab}"
        e = torch.finfo(dtype).bits // 8
        self.flops = 3 * 2 * rows * vocab * hidden  # logits, dh, dW (the Triton path recomputes more)
        self.bytes = (2 * rows * hidden + 2 * vocab * hidden) * e

    def run(self, backend, dtype=None):
        h, w = (self.h, self.w) if dtype is None else (self.h.to(dtype), self.w.to(dtype))
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = masked_cross_entropy(h, w, self.t, self.wt, backend=backend)
        dh, dw = self.grads(loss, (h, w), torch.ones_like(loss))
        return {"loss": loss, "dh": dh, "dw": dw}

    def extra_checks(self, r):
        return []

    def alternatives(self):
        """The baseline first: ``F.linear_cross_entropy`` where this torch has it, else a chunked
        ``F.cross_entropy`` over materialised logits (what a user writes without a fused kernel)."""
        def lce():
            h, w = self.h.detach().requires_grad_(), self.w.detach().requires_grad_()
            ce = F.linear_cross_entropy(h, w, self.t, reduction="none", ignore_index=-100)
            (ce.float() * self.wt).sum().backward()

        def chunked(rows=4096):
            h, w = self.h.detach().requires_grad_(), self.w.detach().requires_grad_()
            for s in range(0, h.shape[0], rows):
                logits = h[s:s + rows] @ w.t()  # [rows, V] materialised
                ce = F.cross_entropy(logits.float(), self.t[s:s + rows], reduction="none", ignore_index=-100)
                (ce * self.wt[s:s + rows]).sum().backward()
        if hasattr(F, "linear_cross_entropy"):
            return {"F.linear_cross_entropy": lce, "chunked F.cross_entropy": chunked}
        return {"chunked F.cross_entropy": chunked}


def problems(tiny: bool, dtype, dev):
    if tiny:
        return [GroupedMM(40, 4, 24, 24, 3, dtype, dev), Dispatch(12, 8, 2, 24, dtype, dev),
                MaskedCE(24, 32, 200, dtype, dev)]
    return [GroupedMM(32768, 16, 2048, 768, 0, dtype, dev), Dispatch(4096, 128, 8, 2048, dtype, dev),
            MaskedCE(16384, 2048, 151936, dtype, dev)]


# --------------------------------------------------------------------------- sections
def check_correctness(probs_by_dtype, dev) -> None:
    rows = []
    for dtype, probs in probs_by_dtype.items():
        for p in probs:
            oracle = p.run("reference", torch.float64)
            tri = p.run("triton")
            ref = p.run("reference")
            tol = TOL[dtype]
            for key in oracle:
                et, er = rel_err(tri[key], oracle[key]), rel_err(ref[key], oracle[key])
                ok = math.isfinite(et) and et <= tol
                what = "fwd" if key in ("y", "loss", "sorted") else "bwd"
                rows.append([p.name, str(dtype).replace("torch.", ""), f"{what} {key}", f"{et:.2e}", f"{er:.2e}",
                             f"{tol:.0e}", verdict(ok, f"{p.name} {dtype} {key}")])
            for label, ok in p.extra_checks(tri):
                rows.append([p.name, str(dtype).replace("torch.", ""), label, "", "", "exact",
                             verdict(ok, f"{p.name} {dtype} {label}")])
    table("correctness: Triton and reference vs a float64 oracle (max|err| / max|oracle|)",
          ["kernel", "dtype", "tensor", "triton err", "reference err", "tolerance", "result"], rows)


def check_reproducible(probs_by_dtype) -> None:
    rows = []
    for dtype, probs in probs_by_dtype.items():
        for p in probs:
            a, b = p.run("triton"), p.run("triton")
            for key in a:
                same = torch.equal(a[key], b[key])
                rows.append([p.name, str(dtype).replace("torch.", ""), key, "identical" if same else "DIFFER",
                             verdict(same, f"{p.name} {dtype} {key} not bit-reproducible")])
    table("reproducibility: Triton forward + backward twice, bitwise", ["kernel", "dtype", "tensor", "bits", "result"],
          rows)


def measure_speed(probs_by_dtype, dev) -> None:
    if dev != "cuda":
        # no timing here; still run each torch alternative once, so the GPU run meets no surprise
        rows = []
        for dtype, probs in probs_by_dtype.items():
            for p in probs:
                for label, fn in p.alternatives().items():
                    if fn is None:
                        state = "not available"
                    else:
                        try:
                            fn()
                            state = "runs"
                        except Exception as e:
                            state = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
                    rows.append([p.name, str(dtype).replace("torch.", ""), label, state, "unmeasured"])
        table("speed: NOT MEASURED (no CUDA device; Triton interpreter on CPU). Torch alternatives run once:",
              ["kernel", "dtype", "alternative", "status", "speed"], rows)
        return
    import triton

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    rows = []
    for dtype, probs in probs_by_dtype.items():
        for p in probs:
            calls = {"triton": lambda p=p: p.run("triton"), "reference": lambda p=p: p.run("reference")}
            try:
                calls.update(p.alternatives())
            except Exception as e:  # e.g. the model's dispatcher changed its interface
                rows.append([p.name, str(dtype).replace("torch.", ""), "alternatives",
                             f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}", "", "", "", ""])
            for label, fn in calls.items():
                if fn is None:
                    rows.append([p.name, str(dtype).replace("torch.", ""), label, "not available", "", "", "", ""])
                    continue
                try:
                    ms = triton.testing.do_bench(fn, warmup=5, rep=50)
                except Exception as e:  # an alternative may reject a dtype or layout
                    rows.append([p.name, str(dtype).replace("torch.", ""), label,
                                 f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}", "", "", "", ""])
                    torch.cuda.synchronize()
                    continue
                tf = p.flops / ms / 1e9
                gbs = p.bytes / ms / 1e6
                if peak:
                    pf = peak[0] if dtype == torch.bfloat16 else peak[1]
                    frac = f"{tf * 1e12 / pf:.1%} FLOP, {gbs * 1e9 / peak[2]:.1%} BW"
                else:
                    frac = "unknown device"
                rows.append([p.name, str(dtype).replace("torch.", ""), label, f"{ms:.3f}",
                             f"{tf:.1f}" if p.flops else "-", f"{gbs:.0f}", frac, p.shape])
    table(f"speed: forward + backward, do_bench median ({name}; peaks {peak})",
          ["kernel", "dtype", "path", "ms", "TFLOP/s", "GB/s", "of peak", "shape"], rows)


# --------------------------------------------------------------------------- targets
def _timed(fn, dev):
    """(median ms, peak MiB above what was allocated before) of one call; CUDA only."""
    import triton

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(fn, warmup=5, rep=50), peak


def host_reads_per_moe_layer(dev, tiny: bool, which: str = "triton") -> int:
    """Host reads of tensor values (``.item()``, ``.tolist()``, ``int(t)``, ``float(t)``: on a GPU
    each one waits for the device) in one MoE layer's forward and backward with every kernel op
    on ``which`` and the model's local dispatcher. Counted by wrapping those Tensor methods, which
    also sees the reads inside custom ops' Python bodies (a dispatch mode would not)."""
    names = ("item", "tolist", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    count = [0]

    def wrap(name):
        def read(self, *a, **k):
            count[0] += 1
            return saved[name](self, *a, **k)
        return read

    run = moe_block(dev, which, tiny=tiny)
    for n in names:
        setattr(torch.Tensor, n, wrap(n))
    try:
        run()
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
    return count[0]


def moe_block(dev, which: str, tiny: bool = False):
    """A call running one MoE layer forward and backward with every kernel op on ``which``."""
    from rnd1.model.moe import MoE

    h, inter, experts, k, tokens = (32, 16, 8, 2, 16) if tiny else (2048, 768, 16, 8, 4096)
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    moe = MoE(h, inter, experts, k, True).to(dev, dtype)
    for prm in moe.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    x = torch.randn(tokens, h, device=dev, dtype=dtype)

    def run():
        _set_backends(which)
        try:
            xi = x.detach().requires_grad_()
            out, _ = moe(xi)
            out.float().sum().backward()
        finally:
            _set_backends("reference")
    return run


def check_targets(tiny: bool, dev) -> None:
    """The speed targets, reported as met / not met (never a failure exit: speed is what a GPU
    measures, not what this script can promise), and the host-read target, which is a check."""
    rows = []
    reads = host_reads_per_moe_layer(dev, tiny)
    rows.append(["MoE layer fwd+bwd, Triton path", "host reads (item/int/tolist)", str(reads), "0",
                 verdict(reads == 0, f"{reads} host reads in a Triton MoE layer")])
    if dev == "cuda":  # the whole MoE block: router, dispatch, three grouped GEMMs, combine
        (t_ms, _), (r_ms, _) = _timed(moe_block(dev, "triton"), dev), _timed(moe_block(dev, "reference"), dev)
        rows.append(["MoE layer fwd+bwd (4096 tokens, 16 experts top-8, 2048->768)",
                     f"{t_ms:.3f} ms vs reference backends {r_ms:.3f} ms", f"{r_ms / t_ms:.2f}x", "reported", "-"])
    else:
        moe_block(dev, "triton", tiny=True)()
        rows.append(["MoE layer fwd+bwd", "vs reference backends", "unmeasured (no GPU)", "reported", "unmeasured"])
    dtype = torch.float32 if tiny else torch.bfloat16
    sizes = [40] if tiny else [32768, 262144]
    for n in sizes:
        ph = GroupedMMPhases(n, 4 if tiny else 16, 24 if tiny else 2048, 24 if tiny else 768, dtype, dev)
        for phase, (tri, ref) in ph.calls().items():
            label = f"grouped GEMM {phase}, {ph.shape}"
            if ref is None:
                rows.append([label, "vs torch grouped mm", "no torch grouped mm here", ">= 1.0x", "not met"])
                continue
            if dev != "cuda":
                tri(), ref()  # both paths run; speed is a GPU's to measure
                rows.append([label, "vs torch grouped mm", "unmeasured (no GPU)", ">= 1.0x", "unmeasured"])
                continue
            (t_ms, _), (r_ms, _) = _timed(tri, dev), _timed(ref, dev)
            tf = ph.flops / t_ms / 1e9
            rows.append([label, f"{t_ms:.3f} ms ({tf:.0f} TFLOP/s) vs {r_ms:.3f} ms", f"{r_ms / t_ms:.2f}x",
                         ">= 1.0x", "met" if r_ms / t_ms >= 1.0 else "not met"])
    ce = MaskedCE(24, 32, 200, dtype, dev) if tiny else MaskedCE(16384, 2048, 151936, dtype, dev)
    base_name, base = next(iter(ce.alternatives().items()))
    tri = lambda: ce.run("triton")  # noqa: E731
    if dev != "cuda":
        tri(), base()
        rows.append([f"masked CE, {ce.shape}", f"vs {base_name}", "unmeasured (no GPU)",
                     "<= 1.0x time, <= 10% memory", "unmeasured"])
    else:
        (t_ms, t_mem), (b_ms, b_mem) = _timed(tri, dev), _timed(base, dev)
        met = t_ms <= b_ms and t_mem <= 0.10 * b_mem
        rows.append([f"masked CE, {ce.shape}", f"{t_ms:.2f} ms, {t_mem:.0f} MiB vs {base_name} {b_ms:.2f} ms, "
                     f"{b_mem:.0f} MiB", f"{t_ms / b_ms:.2f}x time, {t_mem / max(b_mem, 1e-9):.1%} memory",
                     "<= 1.0x time, <= 10% memory", "met" if met else "not met"])
    table("targets (issue 27): the Triton kernels against what a user would otherwise run",
          ["what", "measured", "result", "target", "verdict"], rows)


# --------------------------------------------------------------------------- attention
def check_attention(tiny: bool, dev) -> None:
    """Masked attention (issue 28): ``scripts/bench_attention.py`` at L 4096 (the full sweep to
    8192 is the script's own default; here the GPU time is budgeted), its
    targets judged here: FlexAttention faster than dense-mask SDPA for every masked kind, and
    within 1.2x of unmasked SDPA (the flash kernel) at the same shape. Reported, never an exit
    code; on the CPU one small shape checks that the script runs."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    script = Path(__file__).resolve().parents[3] / "scripts" / "bench_attention.py"
    if not script.is_file():
        table("attention (issue 28)", ["what", "verdict"], [["scripts/bench_attention.py", "not in this checkout"]])
        return
    args = ["--lengths", "256", "--reps", "1", "--kinds", "two_stream"] if tiny else \
        ["--lengths", "4096", "--heads", "32", "--kv-heads", "4", "--head-dim", "128", "--reps", "5"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        proc = subprocess.run([sys.executable, str(script), *args, "--json", str(out)], capture_output=True,
                              text=True)
        if proc.returncode:
            verdict(False, "bench_attention failed: " + proc.stderr.strip().splitlines()[-1][:200])
            return
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["kind"], r["length"], r["method"]): r for r in rows}
    report = []
    for (kind, L, method), r in by.items():
        if method != "flex":
            continue
        dense, plain = by[(kind, L, "sdpa")], by.get((kind, L, "sdpa_unmasked"))
        what = f"{kind}, L {L} ({r['queries']} queries), {r['empty_tiles']:.0%} tiles empty"
        if dev != "cuda":
            report.append([what, f"flex fwd {r['fwd_s'] * 1e3:.1f} ms vs dense SDPA {dense['fwd_s'] * 1e3:.1f} ms",
                           "< dense SDPA; <= 1.2x flash", "unmeasured (no GPU)"])
            continue
        f, d, p = r["fwd_bwd_s"], dense["fwd_bwd_s"], plain["fwd_bwd_s"]
        met = f < d and f <= 1.2 * p
        report.append([what, f"fwd+bwd flex {f * 1e3:.2f} ms, dense SDPA {d * 1e3:.2f} ms, unmasked SDPA "
                             f"{p * 1e3:.2f} ms; mask {r['mask_bytes']:,} B vs {dense['mask_bytes']:,} B",
                       "< dense SDPA; <= 1.2x flash", "met" if met else "not met"])
    table("attention (issue 28): FlexAttention vs dense-mask SDPA (scripts/bench_attention.py)",
          ["what", "measured", "target", "verdict"], report)


# --------------------------------------------------------------------------- training
def _set_backends(which: str) -> str:
    """Every kernel op to ``which`` ("triton" or "reference") through the project's switch: the
    per-op settings the trainer sets from ``[kernels]`` (``rnd1.kernels.backend.set_op_backend``)."""
    kbackend.set_default_backend(which)
    for op in kbackend.OPS:
        kbackend.set_op_backend(op, which)
    return which


def _train(cfg, which, dtype, dev, batch, seq, steps, lr):
    from rnd1.diffusion.objective import get_objective
    from rnd1.model.qwen3 import build_model
    from rnd1.training.step import MicroBatch, run_step

    ce_backend = _set_backends(which)
    obj = get_objective("a2d")
    model = build_model(cfg, device=dev, dtype=dtype, attention_mode=obj.attention, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, cfg.mask_token_id, (batch, seq), generator=g)
    mb = MicroBatch(x0=x0, sample_ids=torch.arange(batch), seed=0)
    losses, gnorm, times = [], None, []
    for s in range(steps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        res = run_step(model, obj, [mb], mask_id=cfg.mask_token_id, samples_per_step=batch, ce_backend=ce_backend,
                       device=dev)
        if s == 0:
            gnorm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None])))
        losses.append(float(res.loss))
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = sorted(times[1:])[len(times[1:]) // 2] if dev == "cuda" and len(times) > 1 else None  # median after step 0
    return losses, gnorm, ms


def check_training(tiny: bool, dev) -> None:
    from rnd1.model.config import get_preset

    import rnd1.model.moe as moe_mod

    uses_dispatch_kernels = "token_dispatch" in inspect.getsource(moe_mod)
    if tiny:
        dtype, steps = torch.float32, 3
        # the interpreter runs ~0.5 s per tiny grouped GEMM forward + backward: shrink the widths
        small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     intermediate_size=64, moe_intermediate_size=16)
        runs = [("debug (hidden 32, 2 layers)", get_preset("debug", **small), 2, 8, 1e-2),
                ("30B-A3B-shaped, 2 layers, 16 experts top-8 (hidden 32)",
                 get_preset("qwen3_30b_a3b", num_experts=16, vocab_size=512, mask_token_id=511, **small), 1, 8, 1e-2)]
    else:
        dtype, steps = torch.bfloat16, 6
        runs = [("debug", get_preset("debug"), 8, 512, 1e-3),
                ("30B-A3B-shaped, 2 layers, 16 experts top-8",
                 get_preset("qwen3_30b_a3b", num_hidden_layers=2, num_experts=16), 1, 4096, 1e-4)]
    rows = []
    for label, cfg, batch, seq, lr in runs:
        t0 = time.perf_counter()
        # on a GPU the reference runs as many steps, so the step times compare
        ref, ref_g, ref_ms = _train(cfg, "reference", dtype, dev, batch, seq, steps if dev == "cuda" else 1, lr)
        tri, tri_g, tri_ms = _train(cfg, "triton", dtype, dev, batch, seq, steps, lr)
        speed = (f"{tri_ms:.1f} / {ref_ms:.1f} ({ref_ms / tri_ms:.2f}x)" if tri_ms and ref_ms else "unmeasured")
        dl = abs(tri[0] - ref[0]) / max(abs(ref[0]), 1e-12)
        dg = abs(tri_g - ref_g) / max(ref_g, 1e-12)
        tol = TRAIN_TOL[dtype]
        finite = all(math.isfinite(v) for v in tri)
        ok = finite and dl <= tol and dg <= tol and tri[-1] < tri[0]
        rows.append([label, str(dtype).replace("torch.", ""), f"{batch}x{seq}", f"{ref[0]:.4f}",
                     " ".join(f"{v:.4f}" for v in tri), f"{dl:.1e} / {dg:.1e}", f"{tol:.0e}",
                     speed, f"{time.perf_counter() - t0:.1f}", verdict(ok, f"training {label}")])
    kbackend.set_default_backend("auto")
    if hasattr(kbackend, "set_op_backend"):
        for op in kbackend.OPS:
            kbackend.set_op_backend(op, "auto")
    table("training: run_step (A2D), every kernel op on 'triton' vs every op on 'reference'",
          ["model", "dtype", "batch", "ref loss 0", "triton losses", "d loss0 / d gradnorm", "tol",
           "ms/step triton / reference", "s", "result"],
          rows)
    if not uses_dispatch_kernels:
        print("  note: rnd1.model.moe does not call rnd1.kernels.token_dispatch (it has its own dispatcher), so the "
              "dispatch/combine kernels are checked above only, not inside these steps.")
    print("  pass = losses finite, step-0 loss and gradient norm within tol of the reference backends, "
          "last loss below the first (same batch every step).")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes, Triton interpreter on CPU (automatic without CUDA)")
    ap.add_argument("--skip-training", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    tiny = a.tiny or not torch.cuda.is_available()
    dev = "cpu" if tiny else "cuda"
    if tiny and not kbackend.triton_interpreting():
        print("--tiny needs TRITON_INTERPRET=1 before Triton is imported (run this file as a script or module)")
        return 2
    import triton

    dtypes = [torch.float32, torch.float16] if tiny else [torch.bfloat16, torch.float32]
    table("environment", ["item", "value"], [
        ["torch / Triton", f"{torch.__version__} / {triton.__version__}"],
        ["device", torch.cuda.get_device_name() if dev == "cuda" else "CPU (TRITON_INTERPRET=1)"],
        ["mode", "tiny shapes" if tiny else "Qwen3-30B-A3B per-rank shapes (EP 8)"],
        ["dtypes", ", ".join(str(d).replace("torch.", "") for d in dtypes)
         + ("  (bf16 skipped: the interpreter's bf16 tl.dot is wrong)" if tiny else "")],
        ["F.grouped_mm", "available" if hasattr(F, "grouped_mm") else "not available"],
        ["F.linear_cross_entropy", "available" if hasattr(F, "linear_cross_entropy") else "not available"],
        ["TF32 for fp32 matmuls (torch)", str(torch.backends.cuda.matmul.allow_tf32)],
    ])
    probs = {d: problems(tiny, d, dev) for d in dtypes}
    for d, ps in probs.items():
        if d == dtypes[0]:
            print("  shapes: " + "; ".join(f"{p.name}: {p.shape}" for p in ps))
    check_correctness(probs, dev)
    check_reproducible(probs)
    measure_speed(probs, dev)
    del probs
    check_targets(tiny, dev)
    check_attention(tiny, dev)
    if dev == "cuda":
        torch.cuda.empty_cache()
    if not a.skip_training:
        check_training(tiny, dev)
    print(f"\n{len(FAILURES)} failed check(s){': ' + '; '.join(FAILURES) if FAILURES else ''}; "
          f"{time.perf_counter() - t0:.1f} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
