"""A config's memory and communication per rank at full size, before the queue, on a laptop.

The trainer's own pieces run, at the configured size and world size, on tensors that hold no
data: a fake process group (``torch.distributed``'s ``fake`` backend over a ``FakeStore``, one
process standing for rank 0 of N) and ``FakeTensorMode`` (shapes, dtypes and storages, no
bytes). In order:

1. the model is built on the meta device and ``rnd1.parallel.parallelize_model`` applies EP,
   activation checkpointing and FSDP2 exactly as in training (compile is left out: the estimate
   is of the eager step; compiled code fuses some temporaries away, so it is an upper bound);
2. the parameters are materialised as fake tensors in ``model.dtype``, the trainer's optimizer
   builder makes AdamW (its state created by one step, as after the first real step: the peak
   of every later step includes it);
3. a batch of random ids is corrupted on the host by the run's objective (real values: noise,
   masks and targets are what the trainer would draw for that step), then ``run_prepared``
   runs forward and backward of up to two micro-batches (the second sees the first's
   gradients, as gradient accumulation does) under the configured autocast, followed by the
   gradient clip and the optimizer step;
4. ``rnd1.tools.memory_ledger.MemoryLedger`` counts every storage those ops create, by what it
   holds, and every collective.

Expert parallelism exchanges a data-dependent number of rows; fake tensors have no values, so
the estimate states the routing it assumes: every EP rank receives ``imbalance`` x the balanced
share (T x top-k / EP rows from each peer). ``imbalance = 1`` is a perfectly balanced router;
the busiest rank of a real run receives more (``--imbalance``).

What the estimate leaves out: the CUDA context and NCCL's own buffers (~1-2 GiB per GPU, kept
in the headroom), allocator fragmentation (the headroom again: ``headroom`` of the device is
kept free), and kernels' workspaces (cuBLAS, flash attention: small). Attention is costed as the
fused kernel PyTorch's SDPA runs (output + log-sum-exp saved, no L x L matrix).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from rnd1.tools.memory_ledger import LedgerReport, MemoryLedger
from rnd1.tools.sizes import parse_bytes

DEFAULT_HEADROOM = 0.10  # of device memory: CUDA context, NCCL buffers, allocator fragmentation


class EstimateError(ValueError):
    """Bad input to the estimate: one line naming the culprit."""


@dataclass
class Estimate:
    config: str
    world_size: int
    rank: int
    layout: str
    micro_batch: int
    seq_len: int
    grad_accum: int
    micro_batches_run: int
    imbalance: float
    autocast: str
    param_bytes: int  # this rank's parameter shards (exact)
    grad_bytes: int  # this rank's gradient shards at the end of the step (exact)
    optimizer_bytes: int  # AdamW state (exact)
    ledger: LedgerReport
    device_memory: int
    headroom: float
    a2a_rows_per_layer: int = 0  # rows this rank receives per MoE layer forward
    hf_read_bytes: int | None = None  # sliced HF import: bytes this rank reads
    hf_checkpoint_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.ledger.peak

    @property
    def usable(self) -> int:
        return int(self.device_memory * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    @property
    def static_bytes(self) -> int:
        """What does not scale with the micro-batch: parameters, gradients, optimizer state and
        the gathered parameters and their gradients at the peak."""
        c = self.ledger.peak_by_category
        return sum(v for k, v in c.items() if k in ("params", "optimizer", "grads", "all_gather"))

    def largest_micro_batch(self) -> int:
        """Largest micro-batch whose peak fits, with activations, token exchange and backward
        temporaries scaled linearly in the micro-batch (they are per-token) and the rest fixed."""
        per_sample = (self.peak - self.static_bytes) / max(self.micro_batch, 1)
        if per_sample <= 0:
            return self.micro_batch
        return max(0, int((self.usable - self.static_bytes) // per_sample))


def _gib(n: float) -> str:
    """GiB, or MiB below one GiB (the debug configs' sizes)."""
    return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _fake_group(world_size: int, rank: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def _assume_routing(model, tokens: int, top_k: int, imbalance: float) -> int:
    """Make every expert-parallel dispatcher use the stated routing instead of reading counts.
    Returns the rows one layer receives."""
    from rnd1.parallel.expert_parallel import AllToAllDispatcher

    from rnd1.parallel.fsdp import unwrap_block

    received = 0
    for block in model.layers:
        d = getattr(getattr(unwrap_block(block), "mlp", None), "dispatcher", None)
        if not isinstance(d, AllToAllDispatcher):
            continue
        sent = tokens * top_k
        send = [sent // d.ep + (i < sent % d.ep) for i in range(d.ep)]
        recv = [math.ceil(s * imbalance) for s in send]
        received = sum(recv)
        d.host_splits = lambda _send, _recv, s=send, r=recv: (list(s), list(r))
    return received


def estimate(cfg, *, world_size: int, rank: int = 0, config_name: str = "", imbalance: float = 1.0,
             device_memory: int | None = None, headroom: float = DEFAULT_HEADROOM, fake: bool = True,
             ledger_step: float = 0.002, before_step=None) -> Estimate:
    """One training step of ``cfg`` on rank ``rank`` of ``world_size``, counted. ``fake=False``
    runs the same on real CPU tensors in an already initialised process group (or alone): the
    test that checks the estimate does so, and passes ``before_step`` (called right before the
    counted step) to reset the process's own peak there."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mod_tracker import ModTracker

    from rnd1.model.qwen3 import Qwen3
    from rnd1.optim import set_adamw_implementation
    from rnd1.parallel import parallelize_model
    from rnd1.parallel.env import DistEnv
    from rnd1.training import build as B
    from rnd1.training.step import MicroBatch, prepare_step, run_prepared

    if imbalance < 1.0:
        raise EstimateError(f"--imbalance {imbalance}: must be >= 1 (1 is a balanced router)")
    if not 0 <= headroom < 1:
        raise EstimateError(f"--headroom {headroom}: must be in [0, 1)")
    device_memory = device_memory if device_memory is not None else parse_bytes(cfg.hardware.device_memory)
    cfg.compile.enable = False  # the eager step (see the module docstring)
    env = DistEnv(rank, rank, world_size, torch.device("cpu"), "fake" if fake else None)
    try:
        dims = B.build_parallel_dims(cfg, env)
        batch = B.batch_plan(cfg, dims)
    except B.StartupError as e:
        raise EstimateError(f"--world-size {world_size}: {e}") from e
    try:
        mcfg = B.model_architecture(cfg)
    except B.StartupError as e:
        raise EstimateError(str(e)) from e
    if fake and world_size > 1:
        _fake_group(world_size, rank)
    objective = B.build_objective(cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    autocast, why = B.resolve_autocast(cfg, torch.device("cuda"))  # the GPU the config is written for
    B.set_kernel_backends(cfg)

    with torch.device("meta"):
        model = Qwen3(mcfg, attention_mode=objective.attention)
    model = parallelize_model(model, cfg, dims, env)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    notes = [f"autocast {autocast} ({why}); compile off (eager step)"]
    # Masked attention is counted on dense-mask SDPA whatever model.attention_backend says: an
    # upper bound (FlexAttention holds a BlockMask of (L/128)^2 tiles, not the L x L mask), and
    # FlexAttention cannot differentiate on the CPU the estimate runs on.
    model.set_attention_backend("sdpa")
    if cfg.training.document_masking or getattr(objective, "block_size", 0):
        notes.append("masked attention counted as dense-mask SDPA (an upper bound for attention_backend "
                     "flex/auto)")
    with fake_mode:
        model.to_empty(device="cpu")
        if dtype != torch.float32:
            model.to(dtype)
        if not fake:
            model.init_weights(seed=cfg.training.seed)
        optimizer, _ = B.build_optimizer_and_schedule(cfg, model, batch)
        impl = cfg.optimizer.implementation
        if impl == "auto":
            impl = "fused"
            notes.append("AdamW fused (what 'auto' measures fastest on CUDA is not known here; fused keeps no "
                         "temporaries, foreach keeps a few)")
        set_adamw_implementation(optimizer, impl)
        params = [p for p in model.parameters()]
        for p in params:  # the optimizer state, as after the first step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    local = [p._local_tensor if type(p).__name__ == "DTensor" else p for p in params]
    param_bytes = sum(t.numel() * t.element_size() for t in local)
    opt_bytes = sum(v._local_tensor.numel() * v.element_size() if type(v).__name__ == "DTensor"
                    else v.numel() * v.element_size()
                    for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    if param_bytes + opt_bytes > device_memory:
        raise EstimateError(f"device memory {_gib(device_memory)} cannot hold even this rank's parameters and "
                            f"optimizer state ({_gib(param_bytes + opt_bytes)}) for {config_name or 'the config'} at "
                            f"world size {world_size}")

    # the step's data: random ids, corrupted on the host as the trainer does
    g = torch.Generator().manual_seed(cfg.training.seed)
    runs = min(batch.grad_accum, 2)
    micro = []
    for m in range(runs):
        x0 = torch.randint(0, mcfg.mask_token_id, (cfg.training.local_batch_size, cfg.training.seq_len), generator=g)
        doc = torch.zeros_like(x0) if cfg.training.document_masking else None
        loss_mask = torch.ones_like(x0, dtype=torch.bool) if objective.complementary else None
        ids = torch.arange(cfg.training.local_batch_size) + m * cfg.training.local_batch_size
        micro.append(MicroBatch(x0, ids, doc, seed=cfg.training.seed, loss_mask=loss_mask))
    prepared = prepare_step(objective, micro, mask_id=mcfg.mask_token_id,
                            samples_per_step=batch.global_batch_tokens // batch.seq_len)
    rows = prepared.items[0][0].numel()  # tokens of one micro-batch (complementary pairs doubled)
    rows *= 2 if getattr(objective, "block_size", 0) else 1  # the [x_t | x0] stream
    received = _assume_routing(model, rows, mcfg.num_experts_per_tok, imbalance) if dims.ep > 1 and fake else 0
    if received:
        notes.append(f"routing assumed: each EP rank receives {imbalance:g} x the balanced share "
                     f"({received:,} rows per MoE layer)")

    ledger = MemoryLedger(snapshot_every=ledger_step)
    ledger.mod_tracker = ModTracker()
    ledger.register(local, "params")
    ledger.register([v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)],
                    "optimizer")
    all_reduce = (lambda t: (dist.all_reduce(t), t)[1]) if world_size > 1 else (lambda t: t)
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast == "bfloat16" else nullcontext
    if before_step is not None:
        before_step()
    with fake_mode, ledger.mod_tracker, ledger:
        model.train()
        run_prepared(model, objective, prepared, all_reduce=all_reduce, backward=True,
                     aux_coef=B.aux_loss_coef(cfg, mcfg), aux_scale=1.0 / (batch.grad_accum * dims.dp_size),
                     autocast=ac, ce_backend=cfg.kernels.cross_entropy, device="cpu")
        ledger.phase = "optimizer_step"
        B.clip_grad_norm(model, cfg.training.max_norm)
        optimizer.step()
    grads = [p.grad for p in params]
    grad_bytes = sum((g._local_tensor if type(g).__name__ == "DTensor" else g).numel() * g.element_size()
                     for g in grads if g is not None)
    report = ledger.report(grads)
    layout = (f"dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} (EP {dims.ep} x FSDP "
              f"{dims.dp_shard // dims.ep} over experts)" if dims.ep > 1 else
              f"dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard}")
    est = Estimate(config_name, world_size, rank, layout, cfg.training.local_batch_size, cfg.training.seq_len,
                   batch.grad_accum, runs, imbalance, autocast, param_bytes, grad_bytes, opt_bytes, report,
                   device_memory, headroom, received, notes=notes)
    if cfg.checkpoint.initial_load_path or cfg.model.init == "pretrained":
        from rnd1.checkpoint.hf_plan import hf_read_plan

        plan = hf_read_plan(mcfg, world_size=world_size, ep=dims.ep, dp_shard=dims.dp_shard,
                            dp_replicate=dims.dp_replicate, dtype=torch.bfloat16)
        est.hf_read_bytes, est.hf_checkpoint_bytes = plan.per_rank[rank], plan.checkpoint_bytes
    if fake and world_size > 1:
        dist.destroy_process_group()
    return est


# ----------------------------------------------------------------------------- report
_CATEGORY_ORDER = ("params", "grads", "optimizer", "all_gather", "all_to_all", "backward", "optimizer_step")


def _wire_bytes(call) -> float:
    """Bytes one rank sends (= receives) on the wire for one call: a ring all-gather or
    reduce-scatter moves (n-1)/n of the full tensor through each rank, an all-to-all sends the
    (n-1)/n of its rows that go to other ranks, an all-reduce 2(n-1)/n."""
    n = max(call.group_size, 1)
    share = (n - 1) / n
    return call.nbytes * share * (2 if call.kind == "all_reduce" else 1)


def collective_table(est: Estimate) -> list[tuple[str, int, float, float]]:
    """(kind, calls per step, tensor bytes per step, wire bytes per rank per step), scaled from
    the micro-batches run to the step's ``grad_accum`` (FSDP gathers and reduces per micro-batch,
    as the trainer does)."""
    scale = est.grad_accum / est.micro_batches_run
    rows = []
    by_kind: dict[str, list[float]] = {}
    for c in est.ledger.collectives:
        b = by_kind.setdefault(c.kind, [0, 0.0, 0.0])
        b[0] += 1
        b[1] += c.nbytes
        b[2] += _wire_bytes(c)
    for kind, (calls, nbytes, wire) in sorted(by_kind.items()):
        rows.append((kind, round(calls * scale), nbytes * scale, wire * scale))
    return rows


def format_estimate(est: Estimate) -> str:
    c = est.ledger.peak_by_category
    lines = [f"{est.config}: rank {est.rank} of {est.world_size} ({est.layout}); micro-batch "
             f"{est.micro_batch} x {est.seq_len}, grad accum {est.grad_accum} "
             f"({est.micro_batches_run} micro-batch(es) run, then clip + AdamW step)"]
    lines += [f"  note: {n}" for n in est.notes]
    lines.append("  memory of this rank                     at the peak   exact / end of step")
    lines.append(f"    parameters (shards)                  {_gib(c.get('params', 0)):>12}   {_gib(est.param_bytes):>12}")
    lines.append(f"    gradients (shards)                   {_gib(c.get('grads', 0)):>12}   {_gib(est.grad_bytes):>12}")
    lines.append(f"    optimizer state (AdamW)              {_gib(c.get('optimizer', 0)):>12}   {_gib(est.optimizer_bytes):>12}")
    lines.append(f"    gathered parameters (FSDP)           {_gib(c.get('all_gather', 0)):>12}")
    acts = sorted(((k[4:], v) for k, v in c.items() if k.startswith("act:")), key=lambda kv: -kv[1])
    lines.append(f"    activations saved by forward         {_gib(sum(v for _, v in acts)):>12}")
    for kind, v in acts:
        lines.append(f"      {kind:<34} {_gib(v):>12}")
    lines.append(f"    all-to-all buffers (EP)              {_gib(c.get('all_to_all', 0)):>12}")
    lines.append(f"    backward temporaries                 {_gib(c.get('backward', 0)):>12}")
    if c.get("optimizer_step"):
        lines.append(f"    optimizer-step temporaries           {_gib(c['optimizer_step']):>12}")
    if c.get("(since snapshot)"):
        lines.append(f"    (after the last breakdown)           {_gib(c['(since snapshot)']):>12}")
    verdict = "fits" if est.fits else "DOES NOT FIT"
    lines.append(f"  peak {_gib(est.peak)} of {_gib(est.device_memory)} device memory, {est.headroom:.0%} kept as "
                 f"headroom (CUDA context, NCCL, fragmentation): {_gib(est.usable)} usable -> {verdict}")
    best = est.largest_micro_batch()
    lines.append(f"  largest micro-batch that fits: {best} (activations, token exchange and backward temporaries "
                 f"scaled linearly from {est.micro_batch}; parameters, gradients, optimizer state, gathered "
                 f"parameters fixed)")
    if est.a2a_rows_per_layer:
        lines.append(f"  all-to-all per MoE layer: {est.a2a_rows_per_layer:,} rows received (forward dispatch; the "
                     f"combine returns as many; backward repeats both)")
    lines.append("  collectives per optimizer step (this rank)      calls    tensor bytes   on the wire")
    for kind, calls, nbytes, wire in collective_table(est):
        lines.append(f"    {kind:<40} {calls:>8}   {_gib(nbytes):>12}  {_gib(wire):>12}")
    if est.hf_read_bytes is not None:
        lines.append(f"  Hugging Face import (sliced): this rank reads {_gib(est.hf_read_bytes)} of the "
                     f"{_gib(est.hf_checkpoint_bytes)} bf16 checkpoint")
    return "\n".join(lines)
