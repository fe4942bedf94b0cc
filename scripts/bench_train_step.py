#!/usr/bin/env python
"""Time this project's real training step (forward, loss, backward, AdamW) and, with --vs-hf /
--vs-torchtitan, the same architecture and weights in transformers / torchtitan, one after the
other in the same run (each variant in a fresh process).

    python scripts/bench_train_step.py                          # the issue's config, ar, bf16
    python scripts/bench_train_step.py --objective a2d --vs-hf
    python scripts/bench_train_step.py --vs-hf --vs-torchtitan --dtype fp32
    python scripts/bench_train_step.py --hidden 512 --seq 2048 --batch 1
    python scripts/bench_train_step.py --table                  # Table 4.2-style sweep (1 and 2 processes)
    python scripts/bench_train_step.py --nprocs 2 --ep 2         # EP + FSDP2 under torchrun (gloo)
    python scripts/bench_train_step.py --dtype fp32 --scaling    # MFU as the model grows
    python scripts/bench_train_step.py --dtype fp32 --profile 15 # torch.profiler top ops

Prints tokens/s, step ms, TFLOP/s, MFU against a bf16/fp32 matmul peak measured in the same run
(or given with --peak-gflops), and peak memory (resident-set growth of the step, measured in a
fresh subprocess per variant so earlier variants do not pollute it)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from rnd1.diffusion.objective import OBJECTIVES, get_objective
from rnd1.metrics import measure_matmul_peak


def model_config(a):
    from rnd1.model.config import ModelConfig

    return ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                       intermediate_size=a.moe_inter * 2, moe_intermediate_size=a.moe_inter, num_experts=a.experts,
                       num_experts_per_tok=a.topk, norm_topk_prob=True, rope_theta=1e6,
                       max_position_embeddings=max(4096, a.seq), mask_token_id=a.vocab - 1)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_rnd1_distributed(a, mcfg):
    """Under torchrun: EP + FSDP2 over all ranks (the trainer's parallelize_model), gloo on CPU."""
    from types import SimpleNamespace as NS

    from rnd1.model.grouped_mm import set_grouped_mm_backend
    from rnd1.model.qwen3 import Qwen3
    from rnd1.parallel import build_parallel_dims, parallelize_model
    from rnd1.parallel.env import init_distributed

    env = init_distributed("cpu")
    cfg = NS(parallelism=NS(tensor_parallel_degree=1, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                            expert_parallel_degree=a.ep, fsdp_reshard_after_forward="default"),
             activation_checkpoint=NS(mode=a.ac), compile=NS(enable=a.compile, backend="inductor", fullgraph=True),
             training=NS(mixed_precision_param="float32"))
    set_grouped_mm_backend(a.grouped_mm)
    dims = build_parallel_dims(cfg.parallelism, env)
    with torch.device("meta"):
        model = Qwen3(mcfg, attention_mode=get_objective(a.objective).attention)
    model = parallelize_model(model, cfg, dims, env)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    return model, dims, env


def build_rnd1(a, mcfg):
    from rnd1.model.grouped_mm import set_grouped_mm_backend
    from rnd1.model.qwen3 import build_model
    from rnd1.parallel.activation_checkpoint import apply_activation_checkpointing
    from rnd1.parallel.compile import apply_compile

    set_grouped_mm_backend(a.grouped_mm)
    model = build_model(mcfg, seed=0, attention_mode=get_objective(a.objective).attention,
                        dtype=torch.bfloat16 if a.dtype == "bf16-params" else torch.float32)
    if a.impl != "rnd1":  # only the weights are wanted: the peers apply their own options
        return model
    apply_activation_checkpointing(model, a.ac)
    if a.compile:
        apply_compile(model, fullgraph=True)
    return model


def adamw(params, implementation: str) -> torch.optim.AdamW:
    """``auto`` starts as foreach; ``autotune`` then measures and switches, as the trainer does."""
    return torch.optim.AdamW(list(params), lr=1e-4, foreach=implementation in ("foreach", "auto"),
                             fused=implementation == "fused")


def rnd1_step_fn(a, model, mcfg, dims=None):
    """The trainer's step: ``rnd1.training.step.run_step`` (the function ``Trainer.train_step``
    calls) with the objective from the same registry, noise keyed by global sample index, the
    normaliser summed over data-parallel ranks (``dims``) and the model config's load-balancing
    coefficient (the trainer's default), then AdamW."""
    from rnd1.training.step import MicroBatch, run_step

    opt = adamw(model.parameters(), a.optimizer)
    objective = get_objective(a.objective)
    world, rank = (1, 0) if dims is None else (dims.dp_size, dims.dp_rank)
    all_reduce = (lambda t: t) if dims is None else dims.all_reduce_dp
    aux_coef = mcfg.router_aux_loss_coef if mcfg.is_moe else 0.0
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.dtype == "bf16" else nullcontext
    calls = [0]

    def step(x0):
        first = calls[0] * a.batch * world + rank * a.batch  # this rank's rows of the global batch
        calls[0] += 1
        mb = MicroBatch(x0, torch.arange(first, first + a.batch), seed=0)
        out = run_step(model, objective, [mb], mask_id=mcfg.mask_token_id, samples_per_step=a.batch * world,
                       all_reduce=all_reduce, backward=True, aux_coef=aux_coef, aux_scale=1.0 / world,
                       autocast=autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    step.optimizer = opt  # for ``autotune`` (optimizer.implementation = auto)
    return step


def hf_step_fn(a, rnd1_model, mcfg):
    """transformers' Qwen3MoeForCausalLM with the same weights, next-token CE via labels."""
    from rnd1.checkpoint.hf import save_pretrained
    import tempfile
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(rnd1_model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    hf.train()
    if a.compile:
        hf = torch.compile(hf)
    opt = adamw(hf.parameters(), a.peer_optimizer)
    autocast = a.dtype == "bf16"

    def step(x0):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = hf(input_ids=x0, labels=x0).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def make_batches(a, rank: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1 + rank)
    return [torch.randint(0, a.vocab - 1, (a.batch, a.seq), generator=g) for _ in range(a.warmup + a.steps)]


def time_steps(step, a, mcfg, world: int = 1, rank: int = 0):
    batches = make_batches(a, rank)
    base = rss_bytes()
    peak = base
    times = []
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        step(x)
        dt = time.perf_counter() - t0
        peak = max(peak, rss_bytes())
        if i >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    tokens = a.batch * a.seq * world  # global tokens per step
    flops = mcfg.flops_per_token(a.seq) * tokens / med
    return {"tokens_per_s": tokens / med, "step_ms": med * 1e3, "tflops": flops / 1e12,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "step_rss_growth_gib": (peak - base) / 2**30}


def profile_variant(a) -> None:
    """torch.profiler over the timed steps of this project's step; prints the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    apply_malloc(a)
    torch.manual_seed(0)
    mcfg = model_config(a)
    step = rnd1_step_fn(a, build_rnd1(a, mcfg), mcfg)
    for line in autotune(a, mcfg, step.optimizer):
        print(line)
    batches = make_batches(a)
    for x in batches[:a.warmup]:
        step(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches[a.warmup:]:
            step(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile))


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def autotune(a, mcfg, optimizer, env=None, ep: int = 1) -> list[str]:
    """The trainer's start-up measurement of its ``auto`` kernels (rnd1.training.build), at this
    bench's shapes, sharing the machine-wide cache: the bench times what a run would run."""
    from types import SimpleNamespace as NS

    from rnd1.training.build import autotune_kernels

    cfg = NS(kernels=NS(grouped_mm=a.grouped_mm, cross_entropy="auto"), optimizer=NS(implementation=a.optimizer),
             model=NS(attention_backend="auto"), training=NS(document_masking=False))
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    env = env or NS(device=torch.device("cpu"), is_rank0=True)
    return autotune_kernels(cfg, mcfg, NS(local_batch_size=a.batch, seq_len=a.seq), NS(ep=ep), env,
                            get_objective(a.objective), dtype, None, optimizer=optimizer)


def apply_malloc(a) -> None:
    """--malloc keep: the trainer's CPU allocator setting, applied to every variant alike."""
    if a.malloc == "keep":
        from rnd1.training.cpu_malloc import keep_freed_memory

        if not keep_freed_memory():
            raise RuntimeError("--malloc keep: glibc mallopt unavailable on this platform")


def build_step(a, mcfg):
    """(step function, autotune lines) of one single-process variant: this project's step or a peer's."""
    model = build_rnd1(a, mcfg)
    if a.impl == "hf":
        return hf_step_fn(a, model, mcfg), []
    if a.impl == "torchtitan":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from peers.torchtitan_qwen3 import torchtitan_step_fn

        return torchtitan_step_fn(a, model, mcfg), []
    step = rnd1_step_fn(a, model, mcfg)
    return step, autotune(a, mcfg, step.optimizer)


def op_times_variant(a) -> dict:
    """--compare-ops: after the warm-up steps, ``a.steps`` untimed steps (their median is the
    reference) then ``a.steps`` under ``rnd1.tools.op_timer``, each op timed where it is
    dispatched; milliseconds per step by category and by op."""
    from rnd1.tools.op_timer import OpTimer

    apply_malloc(a)
    torch.manual_seed(0)
    mcfg = model_config(a)
    step, tuned = build_step(a, mcfg)
    batches = make_batches(a)
    plain = []
    for i, x in enumerate(batches):  # warm-up, then the untimed reference steps
        t0 = time.perf_counter()
        step(x)
        plain.append(time.perf_counter() - t0)
    timer = OpTimer()
    t0 = time.perf_counter()
    with timer:
        for x in batches[a.warmup:]:
            step(x)
    n = len(batches) - a.warmup
    per_step = {k: v * 1e3 / n for k, v in timer.by_category(a.vocab).items()}
    ops = [(op, s * 1e3 / n) for op, s in list(timer.by_op().items())[:12]]
    return {"impl": a.impl, "objective": a.objective, "untimed_step_ms": statistics.median(plain[a.warmup:]) * 1e3,
            "timed_step_ms": (time.perf_counter() - t0) * 1e3 / n, "ops_ms": timer.total() * 1e3 / n,
            "categories": per_step, "top_ops": ops, "autotune": tuned}


def run_variant(a) -> dict:
    apply_malloc(a)
    torch.manual_seed(0)
    mcfg = model_config(a)
    if a.nprocs > 1:
        model, dims, env = build_rnd1_distributed(a, mcfg)
        step = rnd1_step_fn(a, model, mcfg, dims)
        tuned = autotune(a, mcfg, step.optimizer, env=env, ep=a.ep)
        res = time_steps(step, a, mcfg, world=env.world_size, rank=env.rank)
        res["autotune"] = tuned
        res["peak_rss_gib"] = max_over_ranks(res["peak_rss_gib"])
        if env.rank:
            return {}
    else:
        step, tuned = build_step(a, mcfg)
        res = time_steps(step, a, mcfg)
        if a.impl == "rnd1":
            res["autotune"] = tuned
    res.update({k: getattr(a, k) for k in ("hidden", "moe_inter", "heads", "kv_heads", "seq", "batch", "impl",
                                           "objective", "dtype", "compile", "ac", "grouped_mm", "malloc", "nprocs")})
    res["ep"] = a.ep if a.nprocs > 1 else 1
    res["optimizer"] = a.peer_optimizer
    if a.impl == "rnd1":
        g = step.optimizer.param_groups[0]
        ran = "fused" if g["fused"] else "foreach" if g["foreach"] else "for-loop"
        res["optimizer"] = f"auto:{ran}" if a.optimizer == "auto" else ran
    return res


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--objective", choices=list(OBJECTIVES), default="ar")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "bf16-params"], default="bf16",
                    help="bf16: fp32 params + bf16 autocast; bf16-params: bf16 parameters")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ac", choices=["none", "full", "selective"], default="none")
    ap.add_argument("--grouped-mm", default="auto", choices=["auto", "reference", "triton"],
                    help="expert matmul backend (rnd1/kernels/backend.py)")
    ap.add_argument("--optimizer", choices=["auto", "fused", "foreach", "for-loop"], default="auto",
                    help="this project's AdamW kernel (the trainer's default: auto, measured at start-up)")
    ap.add_argument("--peer-optimizer", choices=["fused", "foreach", "for-loop"], default="fused",
                    help="AdamW kernel of the peers (default fused: their fastest on CPU, so the comparison is "
                         "with their best; foreach is torch's own default)")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: glibc keeps freed memory (the trainer's CPU default, rnd1/training/cpu_malloc.py), "
                         "applied to every implementation alike; default: glibc as configured")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impl", choices=["rnd1", "hf", "torchtitan"], default="rnd1")
    ap.add_argument("--nprocs", type=int, default=1,
                    help="processes (torchrun, gloo, one thread each); the batch is per process (MBS)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel degree when --nprocs > 1 (FSDP over all)")
    ap.add_argument("--vs-hf", action="store_true", help="also time transformers with the same weights")
    ap.add_argument("--vs-torchtitan", action="store_true",
                    help="also time torchtitan 0.3.0's Qwen3 with the same weights (scripts/peers/)")
    ap.add_argument("--table", action="store_true", help="sweep options, print a Table 4.2-style table")
    ap.add_argument("--side-by-side", action="store_true",
                    help="this trainer's A2D step and same-work AR step beside transformers' AR step "
                         "(and torchtitan's with --vs-torchtitan), with the CPU model and flags")
    ap.add_argument("--scaling", action="store_true",
                    help="sweep model size (hidden 256/512/1024, expert width and heads growing with it) x "
                         "(seq 512 x batch 4, seq 2048 x batch 1), MFU against one peak measurement")
    ap.add_argument("--compare-ops", action="store_true",
                    help="time every op of this project's step and transformers' (and torchtitan's with "
                         "--vs-torchtitan) where it is dispatched (rnd1/tools/op_timer.py) and print ms per step "
                         "by category side by side, and each one's top ops")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile this project's step (torch.profiler) and print the top N ops by self time")
    ap.add_argument("--peak-gflops", type=float, default=0.0, metavar="G",
                    help="matmul peak (GFLOP/s, both dtypes) for MFU instead of measuring one; tests use it, "
                         "since a bf16 peak on a CPU without bf16 units takes a minute to measure")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: run everything (peak, autotune, every variant) with ATen, MKL and oneDNN limited "
                         "to AVX2 (rnd1/kernels/cpu.py ISA_CAP_VARIABLES): an AVX2-only CPU emulated on a newer one")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


RESULT = "RESULT "  # the line a variant's process prints its JSON result on


def subprocess_variant(a, **changes) -> dict:
    """Run one variant in a fresh process (clean memory high-water mark)."""
    a = argparse.Namespace(**{**vars(a), **changes})
    launcher = [sys.executable]
    if a.nprocs > 1:
        if a.impl != "rnd1":
            raise SystemExit("--nprocs > 1 times this project's step only")
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nprocs}"]
    args = [*launcher, os.path.abspath(__file__), "--json"]
    for k, v in vars(a).items():
        if k in ("vs_hf", "vs_torchtitan", "table", "scaling", "json", "peak_gflops", "side_by_side", "isa"):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                args.append(flag)
        else:
            args += [flag, str(v)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    # under torchrun only rank 0 prints its result
    return json.loads([line for line in out.stdout.splitlines() if line.startswith(RESULT)][-1][len(RESULT):])


def limit_to_avx2(argv) -> None:
    """Re-run this command with the libraries limited to AVX2 (the variables are read when the
    libraries start, so this process, which already imported torch, cannot change itself)."""
    from rnd1.kernels.cpu import ISA_CAP_VARIABLES

    wanted = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert set(wanted) == set(ISA_CAP_VARIABLES)
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    os.environ.update(wanted)
    # Inductor's cache does not key its generated C++ by ATEN_CPU_CAPABILITY: a graph compiled
    # natively (16-lane AVX-512 loops) was reused under the AVX2 limit and built with AVX2 flags,
    # and the compiled step read out of bounds (measured here with --compile). A cache of its own:
    import getpass
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_avx2"))
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *argv])


def compare_ops(a) -> int:
    """--compare-ops: this project's step and the peers', op by op, each in its own process."""
    from rnd1.kernels.cpu import cpu_info
    from rnd1.tools.op_timer import CATEGORIES

    print(f"device: CPU {cpu_info().summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"ms per step, each op timed where it is dispatched: mean of {a.steps} steps, after {a.warmup} warm-up "
          f"and {a.steps} untimed steps (their median: the last row)")
    peers = ["hf"] + (["torchtitan"] if a.vs_torchtitan else [])
    rows = [subprocess_variant(a, impl="rnd1")] + [subprocess_variant(a, impl=p, objective="ar") for p in peers]
    for r in rows:
        for line in r["autotune"]:
            print(f"      {line}")
    names = [f"{r['impl']} {r['objective']}" for r in rows]
    print(f"| {'part of the step':<24} | " + " | ".join(f"{n:>16}" for n in names) + " |")
    print("|" + "---|" * (len(rows) + 1))
    for c in CATEGORIES:
        print(f"| {c:<24} | " + " | ".join(f"{r['categories'][c]:16.1f}" for r in rows) + " |")
    print(f"| {'sum of ops':<24} | " + " | ".join(f"{r['ops_ms']:16.1f}" for r in rows) + " |")
    print(f"| {'step, timed':<24} | " + " | ".join(f"{r['timed_step_ms']:16.1f}" for r in rows) + " |")
    print(f"| {'step, untimed':<24} | " + " | ".join(f"{r['untimed_step_ms']:16.1f}" for r in rows) + " |")
    for n, r in zip(names, rows):
        print(f"top ops of {n}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in r["top_ops"]))
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    if a.compare_ops and (a.nprocs > 1 or a.compile):
        # compiled kernels bypass the dispatcher, and the timer runs in one process
        raise SystemExit("--compare-ops times one eager process: drop --nprocs and --compile")
    if a.isa == "avx2":
        limit_to_avx2(sys.argv[1:] if argv is None else list(argv))
    if a.json:
        res = op_times_variant(a) if a.compare_ops else run_variant(a)
        if res:
            print(RESULT + json.dumps(res), flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0
    if a.profile:
        profile_variant(a)
        return 0
    if a.compare_ops:
        return compare_ops(a)
    if a.peak_gflops > 0:
        peak_bf16 = peak_fp32 = a.peak_gflops * 1e9
    else:
        peak_bf16 = measure_matmul_peak(torch.bfloat16, n=2048)
        peak_fp32 = measure_matmul_peak(torch.float32, n=2048)
    from rnd1.kernels.cpu import cpu_info

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU " + cpu_info().summary()
    print(f"device: {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    mcfg = model_config(a)
    pc = mcfg.param_counts()
    print(f"model: {pc['total'] / 1e6:.1f}M params, {mcfg.flops_per_token(a.seq) / 1e6:.1f} MFLOP/token; "
          f"seq {a.seq} x batch {a.batch}; matmul peak {'given' if a.peak_gflops > 0 else 'measured now'}: bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, "
          f"fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")
    fpt = mcfg.flops_per_token(a.seq)
    print(f"ceiling (every FLOP at that peak): fp32 {peak_fp32 / fpt:,.0f} tok/s, bf16 {peak_bf16 / fpt:,.0f} tok/s")
    variants = [{}]
    if a.vs_hf:
        variants.append({"impl": "hf"})
    if a.vs_torchtitan:
        variants.append({"impl": "torchtitan"})
    if a.side_by_side:  # the trainer's A2D step, the same-work AR step, and the peers' AR step
        variants = [{"objective": "ar"}, {"objective": "a2d"}, {"impl": "hf", "objective": "ar"}]
        if a.vs_torchtitan:
            variants.append({"impl": "torchtitan", "objective": "ar"})
    if a.table:
        variants = [{"objective": o, "ac": ac, "compile": c}
                    for o in ("ar", "a2d") for ac in ("none", "selective") for c in (False, True)]
        # the machine's two cores as two processes (one thread each): FSDP 2, with and without EP 2
        variants += [{"objective": o, "nprocs": 2, "ep": ep, "ac": "none", "compile": False}
                     for ep in (2, 1) for o in ("ar", "a2d")]
    if a.scaling:
        # the whole model grows with the hidden size: expert width = hidden, heads of 64 = hidden / 32
        variants = [{"hidden": h, "moe_inter": h, "heads": h // 32, "kv_heads": max(1, h // 128), "seq": sq, "batch": b}
                    for h in (256, 512, 1024) for sq, b in ((512, 4), (2048, 1))]
    rows = []
    for ch in variants:
        r = subprocess_variant(a, **ch)
        peak = peak_fp32 if r["dtype"] == "fp32" else peak_bf16
        r["mfu"] = r["tflops"] * 1e12 / peak
        rows.append(r)
        for line in r.get("autotune", []):
            print(f"      {line}")
        print(f"{r['impl']:>5} ws{r['nprocs']} ep{r['ep']} h{r['hidden']} s{r['seq']}x{r['batch']} {r['objective']:>4} {r['dtype']:>11} compile={str(r['compile']):5} ac={r['ac']:9} adamw={r['optimizer']:12} "
              f"{r['tokens_per_s']:9,.0f} tok/s  {r['step_ms']:7.1f} ms  {r['tflops'] * 1e3:6.1f} GFLOP/s  "
              f"MFU {r['mfu']:5.1%}  peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    if a.side_by_side:
        ours = {r["objective"]: r for r in rows if r["impl"] == "rnd1"}
        best = max((r for r in rows if r["impl"] != "rnd1"), key=lambda r: r["tokens_per_s"])
        ceiling = peak_fp32 if ours["ar"]["dtype"] == "fp32" else peak_bf16
        print(f"same-work AR step vs the faster peer ({best['impl']}): "
              f"{ours['ar']['tokens_per_s'] / best['tokens_per_s']:.2f}x; "
              f"{ours['ar']['tflops'] * 1e12 / ceiling:.0%} of the measured matmul peak")
        print(f"A2D training step vs the faster peer's AR step at equal tokens: "
              f"{ours['a2d']['tokens_per_s'] / best['tokens_per_s']:.2f}x")
        return 0
    if len(rows) > 1 and not (a.table or a.scaling):
        for r in rows[1:]:
            print(f"speed-up vs {r['impl']}: {rows[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x, "
                  f"peak RSS {rows[0]['peak_rss_gib']:.2f} vs {r['peak_rss_gib']:.2f} GiB")
        best = max(rows[1:], key=lambda r: r["tokens_per_s"])
        print(f"speed-up vs the faster peer ({best['impl']}): {rows[0]['tokens_per_s'] / best['tokens_per_s']:.2f}x")
    if a.table:
        print("\n| WS | TP | PP | EP | DP | MBS | GBS | Seq | GAS | dispatcher | recompute | objective | compile "
              "| tok/s | TFLOP/s | memory (GiB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ws, ep = r["nprocs"], r["ep"]
            dispatcher = f"all-to-all ({r['grouped_mm']})" if ep > 1 else f"local sort ({r['grouped_mm']})"
            print(f"| {ws} | 1 | 1 | {ep} | {ws} | {a.batch} | {a.batch * ws} | {a.seq} | 1 | {dispatcher} | "
                  f"{r['ac']} | {r['objective']} | {r['compile']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | "
                  f"{r['peak_rss_gib']:.2f} |")
    if a.scaling:
        print("\n| hidden = expert width | heads q/kv | seq x batch | params | MFLOP/token | tok/s | GFLOP/s | MFU |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            c = model_config(argparse.Namespace(**{**vars(a), **{k: r[k] for k in ("hidden", "moe_inter", "heads",
                                                                                    "kv_heads", "seq")}}))
            print(f"| {r['hidden']} | {r['heads']}/{r['kv_heads']} | {r['seq']} x {r['batch']} | {c.param_counts()['total'] / 1e6:.1f}M | "
                  f"{c.flops_per_token(r['seq']) / 1e6:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops'] * 1e3:.0f} | "
                  f"{r['mfu']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
