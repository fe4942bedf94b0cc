"""Builders the trainer calls once at start-up, each turning one config section into objects.

Every check that can fail before training starts lives here and raises ``StartupError`` with a
one-line message naming the culprit (file, key, value) — nothing is written before they pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rnd1.model.config import ModelConfig, ModelConfigError, get_preset
from rnd1.model.qwen3 import Qwen3
from rnd1.parallel.dims import ParallelDims
from rnd1.parallel.env import DistEnv, barrier


class StartupError(RuntimeError):
    """Bad input detected before training: config, data, checkpoint or layout."""


# --------------------------------------------------------------------------- tokenizer + model config
def build_tokenizer(cfg):
    from rnd1.data.tokenizer import load_tokenizer

    mask_id = cfg.model.mask_token_id if cfg.model.mask_token_id >= 0 else None
    try:
        return load_tokenizer(cfg.model.tokenizer_path, mask_id=mask_id)
    except (OSError, ValueError) as e:
        raise StartupError(f"model.tokenizer_path={cfg.model.tokenizer_path!r}: {e}") from e


def model_architecture(cfg) -> ModelConfig:
    """The architecture the config asks for: ``model.hf_config``'s when set, else the preset (the
    memory estimate builds this without a tokenizer)."""
    try:
        if cfg.model.hf_config:
            path = Path(cfg.model.hf_config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise StartupError(f"model.hf_config: {path} does not exist")
            return ModelConfig.from_hf_config(json.loads(path.read_text()))
        return get_preset(cfg.model.name)
    except ModelConfigError as e:
        raise StartupError(str(e)) from e


def build_model_config(cfg, tokenizer) -> ModelConfig:
    try:
        # the tokenizer reserved the mask id (model.mask_token_id)
        mcfg = model_architecture(cfg).replace(mask_token_id=tokenizer.mask_id)
    except ModelConfigError as e:
        raise StartupError(str(e)) from e
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise StartupError(f"tokenizer {cfg.model.tokenizer_path!r} has {tokenizer.vocab_size} ids but model "
                           f"{cfg.model.name!r} has vocab_size {mcfg.vocab_size}")
    if cfg.training.seq_len > mcfg.max_position_embeddings:
        raise StartupError(f"training.seq_len={cfg.training.seq_len} exceeds the model's "
                           f"max_position_embeddings={mcfg.max_position_embeddings}")
    return mcfg


# --------------------------------------------------------------------------- data
def ensure_datasets(cfg, tokenizer, mcfg: ModelConfig, env: DistEnv) -> list:
    """Open (and, for ``data.prepare = "stdlib"``, first build) every dataset; check that it was
    built with this run's tokenizer and that its ids fit the model's vocabulary."""
    from rnd1.data.prepare import prepare
    from rnd1.data.shards import DataError, TokenDataset

    d = cfg.data
    # data.prepare builds the datasets it was configured with. A path given alone on the command
    # line is not one of them: a typo there would otherwise be tokenised into a new folder and
    # trained on without a word (every rank checks, so every rank refuses alike)
    if d.prepare and cfg.given_on_command_line("data.datasets") and not cfg.given_on_command_line("data.prepare"):
        missing = [f for f in d.datasets if not (Path(f) / "meta.json").is_file()]
        if missing:
            raise StartupError(f"data.datasets: {missing[0]} does not exist (no meta.json); data.prepare="
                               f"{d.prepare!r} builds only the datasets its config names: fix the path, or "
                               f"give --data.prepare=SOURCE too to build it there")
    if env.is_rank0:
        for folder in d.datasets:
            if not (Path(folder) / "meta.json").is_file() and d.prepare:
                print(f"[rnd1] dataset {folder} missing: preparing it from {d.prepare!r} with tokenizer "
                      f"{cfg.model.tokenizer_path!r}", flush=True)
                try:
                    prepare([d.prepare], cfg.model.tokenizer_path, folder, val_fraction=d.val_fraction,
                            workers=d.num_workers)
                except (DataError, OSError) as e:
                    raise StartupError(f"data.prepare={d.prepare!r}: {e}") from e
    barrier()
    try:
        datasets = [TokenDataset(f, expect_tokenizer=tokenizer.identity(), vocab_size=mcfg.vocab_size)
                    for f in d.datasets]
    except DataError as e:
        raise StartupError(str(e)) from e
    check_eval_splits(cfg, datasets)
    chat = [str(ds.folder) for ds in datasets if ds.has_flags]
    if chat and not cfg.training.document_masking:
        raise StartupError(f"data.datasets: {chat[0]} holds conversations with loss masks (SFT); packed "
                           f"conversations must not see each other: set training.document_masking=true")
    return datasets


def check_eval_splits(cfg, datasets: list) -> None:
    """``eval.interval > 0`` validates on every dataset's ``val`` split: refuse at start-up a dataset
    without one, rather than failing at the first evaluation (after the first checkpoint)."""
    if cfg.eval.interval <= 0:
        return
    for ds in datasets:
        if not ds.meta["splits"].get("val"):
            have = ", ".join(s for s, v in ds.meta["splits"].items() if v) or "none"
            raise StartupError(f"{ds.folder / 'meta.json'}: no 'val' split (has {have}) but eval.interval="
                               f"{cfg.eval.interval}; rebuild with data.val_fraction > 0 or set eval.interval=0")


def build_loader(cfg, datasets: list, split: str, batch: "BatchPlan", dims: ParallelDims, seed: int | None = None):
    from rnd1.data.loader import PackedLoader
    from rnd1.data.shards import DataError

    try:
        splits = [ds.split(split) for ds in datasets]
        if not cfg.data.pack_conversations and not any(getattr(s, "has_flags", False) for s in splits):
            raise StartupError(f"data.pack_conversations=false needs a chat dataset (one conversation per window); "
                               f"{', '.join(cfg.data.datasets)} hold(s) plain text: drop the key")
        if cfg.data.eos_tail_max and not any(getattr(s, "has_flags", False) for s in splits):
            raise StartupError(f"data.eos_tail_max={cfg.data.eos_tail_max} needs a chat dataset (EOS tails follow "
                               f"conversations); {', '.join(cfg.data.datasets)} hold(s) plain text: drop the key")
        if cfg.data.eos_tail_max and not cfg.data.pack_conversations:
            raise StartupError(f"data.eos_tail_max={cfg.data.eos_tail_max} with data.pack_conversations=false: a "
                               f"window of one conversation already ends in EOS padding; set one of them")
        return PackedLoader(splits, seq_len=cfg.training.seq_len, batch_size=cfg.training.local_batch_size,
                            eos_id=datasets[0].eos_id, weights=cfg.data.weights or None,
                            seed=cfg.training.seed if seed is None else seed, dp_rank=dims.dp_rank,
                            dp_world_size=dims.dp_size, supervise_eos=cfg.data.supervise_eos,
                            pack_conversations=cfg.data.pack_conversations, eos_tail_max=cfg.data.eos_tail_max)
    except DataError as e:
        raise StartupError(str(e)) from e


# --------------------------------------------------------------------------- layout + batch
def build_parallel_dims(cfg, env: DistEnv) -> ParallelDims:
    from rnd1.parallel import build_parallel_dims as _build

    try:
        return _build(cfg.parallelism, env)
    except ValueError as e:
        raise StartupError(str(e)) from e


@dataclass
class BatchPlan:
    local_batch_size: int
    seq_len: int
    grad_accum: int
    global_batch_tokens: int
    total_steps: int
    total_tokens: int


def batch_plan(cfg, dims: ParallelDims) -> BatchPlan:
    """Global batch in tokens -> gradient-accumulation steps; steps <-> token budget."""
    t = cfg.training
    per_micro = t.local_batch_size * t.seq_len * dims.dp_size
    gbt = t.global_batch_tokens if t.global_batch_tokens > 0 else per_micro
    if gbt % per_micro:
        raise StartupError(
            f"training.global_batch_tokens={gbt} is not a multiple of local_batch_size x seq_len x "
            f"data-parallel ranks = {t.local_batch_size} x {t.seq_len} x {dims.dp_size} = {per_micro}")
    if t.total_tokens > 0:
        steps = math.ceil(t.total_tokens / gbt)
    else:
        steps = t.steps
    return BatchPlan(t.local_batch_size, t.seq_len, gbt // per_micro, gbt, steps, steps * gbt)


def build_objective(cfg):
    """The run's ``Objective`` (rnd1/diffusion/objective.py): everything objective-specific."""
    from rnd1.diffusion.objective import get_objective

    o = cfg.objective
    kw = {"block_size": block_size_for(o, 0)} if o.block_size else {}
    return get_objective(o.name, eps=o.eps, low_discrepancy=o.low_discrepancy, normaliser=o.loss_normaliser,
                         complementary=o.complementary_masking, **kw)


def block_size_for(obj, tokens_seen: int) -> int:
    """Block diffusion's block size after ``tokens_seen`` training tokens: the warm-up schedule's
    entry (``block_schedule_sizes`` / ``_tokens``), or ``block_size``. In token space, like every
    schedule here, so it means the same at any batch size."""
    size = obj.block_size
    for start, s in zip(obj.block_schedule_tokens, obj.block_schedule_sizes):
        if tokens_seen >= start:
            size = s
    return size


def aux_loss_coef(cfg, mcfg: ModelConfig) -> float:
    if not mcfg.is_moe:
        return 0.0
    c = cfg.objective.moe_aux_loss_coef
    return mcfg.router_aux_loss_coef if c < 0 else c


def attention_mode_for(obj, tokens_seen: int) -> str:
    """SCP: bidirectional from step 0. Grafting: causal DLM for ``grafting_tokens``, then
    bidirectional. Causal: AR attention throughout (the ``ar`` objective)."""
    if obj.attention_recipe == "scp":
        return "bidirectional"
    if obj.attention_recipe == "grafting":
        return "causal" if tokens_seen < obj.grafting_tokens else "bidirectional"
    return "causal"


def resolve_autocast(cfg, device: torch.device) -> tuple[str, str]:
    """``training.autocast`` as run ("none" | "bfloat16") and why: ``auto`` uses bf16 where the
    hardware multiplies bf16 matrices (CUDA, or a CPU with bf16 matrix units), fp32 elsewhere."""
    a = cfg.training.autocast
    if a != "auto":
        return a, f"training.autocast={a!r}"
    if device.type == "cuda":
        return "bfloat16", "auto: CUDA"
    from rnd1.kernels.cpu import cpu_info

    info = cpu_info()
    if info.bf16_units:
        return "bfloat16", f"auto: the CPU has bf16 matrix units ({info.bf16_units}; {info.model})"
    if info.isa_caps and (info.flags & {"amx_bf16", "avx512_bf16"}):
        return "none", f"auto: fp32, the CPU's bf16 matrix units are turned off by {' '.join(info.isa_caps)} ({info.model})"
    return "none", f"auto: fp32, the CPU has no bf16 matrix units ({info.model})"


def check_attention_backend(cfg, device: torch.device) -> None:
    """``model.attention_backend='flex'`` cannot train where FlexAttention has no backward."""
    from rnd1.model.attention import flex_backward_supported

    if cfg.model.attention_backend == "flex" and not flex_backward_supported(device):
        raise StartupError(f"model.attention_backend='flex': torch's FlexAttention has no backward on "
                           f"{device.type} (torch {torch.__version__}), so it cannot train there; use 'auto' "
                           f"(dense-mask SDPA for training on {device.type}) or 'sdpa'")


def training_attention(cfg, objective, batch: "BatchPlan", mcfg: ModelConfig, device: torch.device):
    """The masked pattern the training forward uses, at its shape, or None (unmasked attention).
    Packed documents are stood in for by four equal documents per row: what ``auto`` measures
    at start-up, before any batch exists."""
    from rnd1.model.attention_masks import Documents, TwoStream

    B, L = batch.local_batch_size * (2 if objective.complementary else 1), batch.seq_len
    docs = None
    if cfg.training.document_masking:
        docs = (torch.arange(L, device=device) * 4 // L).expand(B, L)
    if getattr(objective, "block_size", 0) and objective.two_streams(L):
        return TwoStream(L, objective.block_size, docs, device=device)
    if docs is not None:
        return Documents(docs, causal=objective.attention == "causal")
    return None


def autotune_kernels(cfg, mcfg: ModelConfig, batch: "BatchPlan", dims: ParallelDims, env: DistEnv, objective,
                     dtype: torch.dtype, cache_file: Path | None, optimizer=None,
                     peak_flops: float | None = None) -> list[str]:
    """``auto`` kernels choose their implementation by measurement (``rnd1.kernels.autotune``), at this
    run's shapes: the expert matmul (per-expert loop, ``F.grouped_mm``, Triton on CUDA), the
    masked cross-entropy's chunk size and, given the ``optimizer``, AdamW's kernel (fused or
    foreach, stepping copies of this rank's parameters). Rank 0 measures (a few milliseconds per
    candidate, or reads ``cache_file``, keyed by machine and shape) and every rank takes its
    answer, so all ranks run the same code. Returns the lines to log. Every candidate computes the
    same function within the tolerance the kernel tests state. Called after a resume: a configured
    AdamW kernel is set again here, over the flags the checkpoint's param groups brought back."""
    import torch.distributed as dist

    from rnd1.kernels import grouped_gemm, masked_cross_entropy
    from rnd1.kernels.autotune import Autotuner, shared_cache_file
    from rnd1.kernels.backend import set_op_impl

    k = cfg.kernels
    # rows the step really feeds: the two-stream block forward and complementary pairs double them
    rows = batch.local_batch_size * batch.seq_len
    rows *= 2 if getattr(objective, "block_size", 0) else 1
    rows *= 2 if objective.complementary else 1
    jobs = []
    if k.grouped_mm == "auto" and mcfg.is_moe:
        experts = mcfg.num_experts // max(dims.ep, 1)
        n = rows * mcfg.num_experts_per_tok
        key = f"rows {n}, experts {experts}, hidden {mcfg.hidden_size}, inter {mcfg.moe_intermediate_size}, {dtype}"
        jobs.append(("grouped_mm", key, lambda: grouped_gemm.tuning_candidates(
            n, experts, mcfg.hidden_size, mcfg.moe_intermediate_size, dtype=dtype, device=env.device)))
    if mcfg.is_moe and env.device.type == "cuda" and grouped_gemm.triton is not None:
        # The Triton grouped GEMM's tiles, per problem of one expert layer: measured by rank 0
        # here, never during training (ranks would otherwise tune different buckets and could
        # pick different tiles); a problem not measured gets the deterministic pick.
        experts = mcfg.num_experts // max(dims.ep, 1)
        n = rows * mcfg.num_experts_per_tok
        for tkey in grouped_gemm.tile_problems(n, experts, mcfg.hidden_size, mcfg.moe_intermediate_size, dtype):
            jobs.append(("grouped_mm_tile", " ".join(map(str, tkey)),
                         lambda tkey=tkey: grouped_gemm.tile_candidates(tkey, n, experts, env.device)))
    if k.cross_entropy == "auto" and env.device.type == "cpu":  # the Triton kernel tiles by itself
        n = max(1, rows // 2 if objective.masks else rows)  # diffusion: about half the rows are supervised
        key = f"rows {n}, hidden {mcfg.hidden_size}, vocab {mcfg.vocab_size}, {dtype}"
        jobs.append(("cross_entropy", key, lambda: masked_cross_entropy.tuning_candidates(
            n, mcfg.hidden_size, mcfg.vocab_size, dtype=dtype, device=env.device)))
    if optimizer is not None:
        from rnd1.optim import adamw_tuning_candidates, set_adamw_implementation

        if cfg.optimizer.implementation != "auto":
            try:
                set_adamw_implementation(optimizer, cfg.optimizer.implementation)
            except ValueError as e:
                raise StartupError(str(e)) from e
        else:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            key, names, make = adamw_tuning_candidates(params)
            jobs.append(("adamw", key, make, names))
    if cfg.model.attention_backend == "auto" and env.device.type == "cuda":
        from rnd1.model import attention

        pattern = training_attention(cfg, objective, batch, mcfg, env.device)
        if pattern is not None:
            shape = (mcfg.num_attention_heads, mcfg.num_key_value_heads, mcfg.head_dim, dtype, env.device, True)
            jobs.append(("attention", attention.choice_key(pattern, *shape),
                         lambda: attention.tuning_candidates(pattern, *shape)))
    if not jobs:
        return []
    answers, lines = [None] * len(jobs), []
    if env.is_rank0:
        tuner = Autotuner(cache_file, shared_file=shared_cache_file(), peak_flops=peak_flops)
        for i, (op, key, make, *names) in enumerate(jobs):
            # named candidates are made only if not cached (AdamW's copy the parameters)
            choice = tuner.choose(op, key, make if names else make(), device=env.device.type,
                                  names=names[0] if names else ())
            answers[i] = choice.chosen
            lines.append(choice.line())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answers, src=0)
    for (op, key, *_), chosen in zip(jobs, answers):
        if op == "grouped_mm":
            set_op_impl("grouped_mm", chosen)
        elif op == "grouped_mm_tile":
            kind, rows_bucket, K, M, dt, layout = key.split()
            grouped_gemm.set_tuned_tile((kind, int(rows_bucket), int(K), int(M), dt, layout), chosen)
        elif op == "adamw":
            set_adamw_implementation(optimizer, chosen)
        elif op == "attention":
            from rnd1.model.attention import set_choice

            set_choice(key, chosen)
        else:
            masked_cross_entropy.set_tuned_chunk_tokens(int(chosen))
    return lines


def set_kernel_backends(cfg) -> None:
    """``[kernels]`` -> rnd1.kernels.backend's per-op settings, read by the model's expert matmul and
    token dispatcher (the loss also gets ``cross_entropy`` passed explicitly). Bad values fail
    here with one line (config loading already rejects them; this covers configs built in code)."""
    from rnd1.kernels.backend import set_op_backend

    k = cfg.kernels
    for op, name in (("grouped_mm", k.grouped_mm), ("dispatch", k.dispatch), ("cross_entropy", k.cross_entropy)):
        try:
            set_op_backend(op, name)
        except ValueError as e:
            raise StartupError(f"kernels.{op}: {e}") from e


# --------------------------------------------------------------------------- model
def build_and_load_model(cfg, mcfg: ModelConfig, dims: ParallelDims, env: DistEnv, tokenizer=None) -> torch.nn.Module:
    """Meta-device build -> parallelise -> materialise -> random init or load weights -> the
    [MASK] embedding's init (``model.mask_embedding_init``; ``mean`` averages the rows of the ids
    ``tokenizer`` produces, built from the config when not given)."""
    from rnd1.parallel import parallelize_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    with torch.device("meta"):
        model = Qwen3(mcfg)
    try:
        model = parallelize_model(model, cfg, dims, env)
    except ValueError as e:
        raise StartupError(f"parallelism: {e}") from e
    model.to_empty(device=env.device)
    model.to(dtype)
    model.set_attention_backend(cfg.model.attention_backend)
    src = cfg.checkpoint.initial_load_path
    init = cfg.model.init
    if init == "auto":  # the debug configs: one flag (the path) turns a random-init run into a conversion
        init = "pretrained" if src else "random"
    if init == "random":
        if src:
            raise StartupError(f"model.init='random' but checkpoint.initial_load_path={src!r} is set; choose "
                               f"one (model.init='auto' or 'pretrained' loads the path)")
        model.init_weights(seed=cfg.training.seed)
    else:
        if not src:
            raise StartupError("model.init='pretrained' needs checkpoint.initial_load_path (a Hugging Face "
                               "directory or a DCP checkpoint)")
        load_initial_weights(model, src, cfg.checkpoint.initial_load_format)
    if cfg.model.mask_embedding_init == "mean":
        rows = (tokenizer or build_tokenizer(cfg)).vocab_size
        try:
            model.init_mask_embedding("mean", trained_rows=rows)
        except ValueError as e:
            raise StartupError(f"model.mask_embedding_init='mean': {e}") from e
    elif cfg.model.mask_embedding_init != "keep":
        raise StartupError(f"model.mask_embedding_init={cfg.model.mask_embedding_init!r}: expected 'keep' or 'mean'")
    return model


def load_initial_weights(model, src: str, fmt: str) -> None:
    from rnd1.checkpoint.dcp import CheckpointError, is_dcp_checkpoint, load_model_weights

    path = Path(src)
    if not path.exists():
        raise StartupError(f"checkpoint.initial_load_path: {src} does not exist")
    if fmt == "auto":
        fmt = "dcp" if is_dcp_checkpoint(path) else "hf"
    try:
        if fmt == "dcp":
            load_model_weights(model, path)
        else:
            from rnd1.checkpoint.hf import load_state_dict_from_hf

            load_state_dict_from_hf(path, model)
    except (CheckpointError, ValueError, OSError, KeyError) as e:
        raise StartupError(f"checkpoint.initial_load_path={src} ({fmt}): {e}") from e


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    from rnd1.parallel.grad_norm import clip_grad_norm_

    return clip_grad_norm_(list(model.parameters()), max_norm)


# --------------------------------------------------------------------------- optimiser
def build_optimizer_and_schedule(cfg, model, batch: BatchPlan):
    from rnd1.optim import GroupSpec, TokenSchedule, build_optimizer, scale_lr

    o, s = cfg.optimizer, cfg.lr_schedule
    lr_attn, lr_rest, lr_mask = o.lr_attention, o.lr_non_attention, o.lr_mask_embedding
    if lr_mask < 0 and lr_mask != -1:
        raise StartupError(f"optimizer.lr_mask_embedding={lr_mask}: must be >= 0, or -1 to use the non-attention group")
    if s.scale_with_batch:
        if s.base_batch_tokens <= 0:
            raise StartupError("lr_schedule.scale_with_batch needs lr_schedule.base_batch_tokens > 0")
        lr_attn = scale_lr(lr_attn, batch.global_batch_tokens, s.base_batch_tokens)
        lr_rest = scale_lr(lr_rest, batch.global_batch_tokens, s.base_batch_tokens)
        if lr_mask > 0:
            lr_mask = scale_lr(lr_mask, batch.global_batch_tokens, s.base_batch_tokens)
    optimizer = build_optimizer(
        model,
        attention=GroupSpec(lr=lr_attn, weight_decay=o.weight_decay_attention),
        non_attention=GroupSpec(lr=lr_rest, weight_decay=o.weight_decay_non_attention),
        mask_embedding=GroupSpec(lr=lr_mask, weight_decay=o.weight_decay_mask_embedding) if lr_mask >= 0 else None,
        betas=(o.beta1, o.beta2), eps=o.eps, implementation=o.implementation,
    )
    warmup = s.warmup_tokens if s.warmup_tokens > 0 else int(s.warmup_fraction * batch.total_tokens)
    schedule = TokenSchedule(warmup_tokens=warmup, total_tokens=batch.total_tokens, decay=s.decay_type,
                             decay_fraction=s.decay_fraction, min_lr_ratio=s.min_lr_ratio)
    return optimizer, schedule


# --------------------------------------------------------------------------- export
def export_config(cfg, mcfg: ModelConfig, tokenizer):
    """What the Hugging Face export writes besides the weights (``rnd1.checkpoint.hf.plan_export``
    for ``checkpoint.export_hf_format``): config.json entries, generation_config.json, the run's
    tokenizer files. Cheap and collective-free, so it can also run at start-up to fail early."""
    from rnd1.checkpoint.hf import HFCheckpointError, plan_export

    fmt = cfg.checkpoint.export_hf_format
    attention = build_objective(cfg).attention
    try:
        return plan_export(mcfg, fmt, tokenizer, cfg.model.tokenizer_path, attention=attention,
                           objective=cfg.objective.name, block_size=cfg.objective.block_size)
    except HFCheckpointError as e:
        raise StartupError(f"checkpoint.export_hf_format={fmt!r} (model.tokenizer_path="
                           f"{cfg.model.tokenizer_path!r}): {e}") from e


def export_hf(cfg, model, run_dir: Path, mcfg: ModelConfig, tokenizer) -> Path:
    """Collective under FSDP (every rank calls it; rank 0 writes)."""
    from rnd1.checkpoint.hf import save_pretrained

    out = run_dir / "hf_export"
    save_pretrained(model, out, overwrite=True, **export_config(cfg, mcfg, tokenizer).save_kwargs())
    return out
