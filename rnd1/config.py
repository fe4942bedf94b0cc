"""Run configuration: one TOML file describes a whole run; every key can be overridden on the
command line as ``--section.key=value`` (or ``--section.key value``).

Key names follow torchtitan wherever torchtitan has the same setting (job.dump_folder,
training.steps, training.seq_len, training.local_batch_size, training.max_norm, checkpoint.interval,
parallelism.data_parallel_shard_degree, activation_checkpoint.mode, compile.enable, ...).

A file may start with ``include = "base.toml"`` (path relative to the file): the base is loaded
first and this file's tables are merged over it, so a recipe is a few lines on top of a config.
Unknown sections or keys, wrong types and invalid values raise ``ConfigError`` naming the file,
the key and (for typos) the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem found at start-up."""


def _f(default, help: str, check=None, **kw):
    """A documented config field; ``check(value) -> error string | None``."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, "check": check}, **kw)
    return field(default=default, metadata={"help": help, "check": check}, **kw)


def _pos(v):
    return None if v > 0 else "must be > 0"


def _nonneg(v):
    return None if v >= 0 else "must be >= 0"


def _unit_open(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


def _unit_closed(v):
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _objective_name(v):
    from rnd1.diffusion.objective import OBJECTIVES

    return None if v in OBJECTIVES else f"is not an objective; expected one of {', '.join(map(repr, OBJECTIVES))}"


def _lr_or_inherit(v):
    return None if v >= 0 or v == -1 else "must be >= 0, or -1 to use the non-attention group"


def _pos_or_fill(v):
    return None if v > 0 or v == -1 else "must be > 0, or -1 to fill the remaining ranks"


# --------------------------------------------------------------------------- sections
@dataclass
class Job:
    """Where the run writes and what it prints."""
    dump_folder: str = _f("./outputs/run", "run folder: config.toml, metrics.jsonl, checkpoints, exports")
    description: str = _f("", "free text for people reading the run folder (kept in its config.toml, read by no code)")
    print_config: bool = _f(True, "print the resolved config once every start-up check has passed")


@dataclass
class Model:
    """Architecture, initial weights' dtype, tokenizer."""
    name: str = _f("debug", "model preset: debug, debug_dense, qwen3_0.6b, qwen3_4b, qwen3_30b_a3b")
    hf_config: str = _f("", "Hugging Face model folder or config.json whose architecture replaces the preset")
    init: Literal["pretrained", "random", "auto"] = _f(
        "pretrained", "pretrained: weights from checkpoint.initial_load_path (required); random: the random-init "
                      "baseline (refuses a path); auto: pretrained when checkpoint.initial_load_path is set, else random")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "dtype of the parameters (and optimiser state)")
    mask_token_id: int = _f(-1, "mask token id; -1: the tokenizer's (151669 for Qwen3, as RND1)")
    mask_embedding_init: Literal["keep", "mean"] = _f(
        "keep", "the [MASK] input embedding (its own parameter) after the initial weights: keep: the table's mask "
                "row (a Qwen3 checkpoint's untrained padding row; the random row under random init; a DCP "
                "checkpoint's saved value); mean: the mean of the trained rows (ids below the tokenizer's "
                "vocab_size, mask id excluded)")
    tokenizer_path: str = _f("byte", "'byte' (byte-level, for debug models) or a Qwen3 tokenizer folder / .tiktoken file")
    attention_backend: Literal["auto", "sdpa", "flex"] = _f(
        "auto", "masked attention (packed documents, block diffusion, the block sampler): sdpa: a dense bool mask; "
                "flex: FlexAttention with a BlockMask (no GPU backward on the CPU: refused for training there); "
                "auto: the faster by measurement, per mask kind and shape. Unmasked attention is always SDPA")


@dataclass
class Objective:
    """Training objective and attention recipe."""
    name: str = _f(
        "a2d", "a2d: output i predicts masked x0[i+1] (RND1 eq. 2); mdlm: output i predicts masked x0[i] (eq. 1); "
               "ar: next-token prediction; block_a2d / block_mdlm: block diffusion, AR over blocks of "
               "block_size, diffusion inside each (the registry in rnd1/diffusion/objective.py)", _objective_name)
    block_size: int = _f(0, "block_a2d / block_mdlm: positions per block (> 0; the size once block_schedule_sizes "
                            "is over); must stay 0 for the other objectives", _nonneg)
    block_schedule_sizes: list[int] = _f([], "block-size warm-up (LLaDA 2.0: 1, 4, 32, 64, L, then down): block "
                                             "sizes in order, the last one equal to block_size; [] keeps block_size")
    block_schedule_tokens: list[int] = _f([], "training tokens at which each block_schedule_sizes entry starts "
                                              "(first 0, increasing)")
    complementary_masking: bool = _f(False, "each sequence twice per batch with complementary masks (LLaDA 2.0's "
                                            "SFT): every maskable token is supervised once per pair")
    loss_normaliser: Literal["maskable", "supervised"] = _f(
        "maskable", "maskable: divide the 1/t-weighted CE sum by the scored positions of the global batch (the "
                    "per-token NELBO, an upper bound on the NLL per token); supervised: by the masked positions")
    eps: float = _f(1e-3, "t ~ U[eps, 1]", _unit_open)
    low_discrepancy: bool = _f(False, "stratify t across the batch (lower-variance loss)")
    attention_recipe: Literal["scp", "grafting", "causal"] = _f(
        "scp", "scp: bidirectional from step 0; grafting: causal for grafting_tokens, then bidirectional; "
               "causal: AR attention throughout")
    grafting_tokens: int = _f(0, "tokens trained with causal attention before switching (grafting)", _nonneg)
    moe_aux_loss_coef: float = _f(-1.0, "load-balancing loss weight; -1: the model config's router_aux_loss_coef")


@dataclass
class Optimizer:
    """AdamW with separate attention / non-attention groups, optionally a third for the [MASK] embedding
    (lr 0 freezes a group)."""
    lr_attention: float = _f(3e-4, "peak lr of q/k/v/o projections and q/k norms", _nonneg)
    lr_non_attention: float = _f(3e-4, "peak lr of embeddings, norms, MLPs, routers, experts, LM head", _nonneg)
    weight_decay_attention: float = _f(0.1, "weight decay of the attention group", _nonneg)
    weight_decay_non_attention: float = _f(0.1, "weight decay of the non-attention group", _nonneg)
    lr_mask_embedding: float = _f(
        -1.0, "peak lr of the [MASK] input embedding, a group of its own so it can learn while the non-attention "
              "lr is 1e-8; -1: part of the non-attention group (its lr and decay); 0 freezes it", _lr_or_inherit)
    weight_decay_mask_embedding: float = _f(
        0.0, "weight decay of the [MASK] embedding's own group (lr_mask_embedding >= 0): 0 by default: one row "
             "seen at every masked position has nothing to overfit, and decay would pull it toward zero while the "
             "table rows it should resemble barely move", _nonneg)
    beta1: float = _f(0.9, "Adam beta1", _unit_closed)
    beta2: float = _f(0.95, "Adam beta2", _unit_closed)
    eps: float = _f(1e-8, "Adam epsilon", _pos)
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = _f(
        "auto", "AdamW kernel: auto (fused or foreach, whichever steps this run's parameters faster on this "
                "machine, measured at start-up and logged), fused (one pass per tensor), foreach, for-loop")


@dataclass
class LRSchedule:
    """Learning-rate schedule in token space."""
    warmup_fraction: float = _f(0.02, "linear warmup over this fraction of the token budget", _unit_closed)
    warmup_tokens: int = _f(0, "warmup length in tokens (> 0 overrides warmup_fraction)", _nonneg)
    decay_type: Literal["constant", "linear", "cosine", "wsd"] = _f("constant", "after warmup")
    decay_fraction: float = _f(0.1, "wsd: the final fraction of tokens that decays", _unit_closed)
    min_lr_ratio: float = _f(0.0, "final lr / peak lr for decaying schedules", _unit_closed)
    scale_with_batch: bool = _f(False, "scale peak lrs by sqrt(global_batch_tokens / base_batch_tokens)")
    base_batch_tokens: int = _f(0, "B0 of the sqrt scaling rule", _nonneg)


@dataclass
class Training:
    """Batch geometry, length of the run, numerics."""
    seq_len: int = _f(256, "tokens per sequence", _pos)
    local_batch_size: int = _f(8, "sequences per micro-batch per rank", _pos)
    global_batch_tokens: int = _f(0, "tokens per optimiser step over all ranks (0: one micro-batch per rank); "
                                     "gradient accumulation is derived", _nonneg)
    steps: int = _f(100, "optimiser steps (ignored when total_tokens > 0)", _pos)
    total_tokens: int = _f(0, "token budget; > 0 sets steps = ceil(total_tokens / global_batch_tokens)", _nonneg)
    max_norm: float = _f(1.0, "gradient clipping by global norm (<= 0: off)")
    mixed_precision_param: Literal["float32", "bfloat16"] = _f(
        "bfloat16", "FSDP2 compute dtype of parameters (multi-process runs)")
    autocast: Literal["none", "bfloat16", "auto"] = _f(
        "auto", "torch.autocast dtype for forward/backward; auto: bfloat16 on CUDA and on a CPU with bf16 matrix "
                "units (AMX-BF16, AVX512-BF16, Arm BF16), none elsewhere (bf16 is emulated there, far slower than "
                "fp32); the start-up log says which units it found")
    document_masking: bool = _f(False, "attend only within each packed document")
    seed: int = _f(0, "seed of init, data order and masking noise", _nonneg)
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms")
    max_nonfinite_skips: int = _f(10, "steps with non-finite loss/grad skipped before the run stops", _nonneg)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: CUDA when available")
    collective_timeout_s: float = _f(
        300.0, "seconds a collective waits for the other ranks before the run fails with a line naming the "
               "rank that stopped answering (gloo; on CUDA, NCCL's watchdog aborts after this long)", _pos)
    cpu_keep_freed_memory: bool = _f(
        True, "CPU runs: glibc malloc keeps freed memory instead of unmapping it (faster steps, RSS stays at "
              "the high-water mark; rnd1/training/cpu_malloc.py)")


@dataclass
class Data:
    """Token datasets (built by scripts/prepare_data.py) and their mixture."""
    datasets: list[str] = _f(["./outputs/data/stdlib_byte"], "dataset folders (meta.json + shards)")
    weights: list[float] = _f([], "mixture weights, one per dataset (default: equal)")
    prepare: str = _f("stdlib", "build a missing dataset from this source ('stdlib' or '' to never build)")
    val_fraction: float = _f(0.01, "held-out fraction when preparing", _unit_closed)
    num_workers: int = _f(2, "tokenizer worker processes when preparing", _nonneg)
    supervise_eos: bool = _f(True, "chat (SFT) datasets: mask and supervise each conversation's trailing EOS and "
                                   "the window's EOS padding (LLaDA's SFT: the model learns to end a response); "
                                   "datasets without loss masks supervise every token anyway")
    pack_conversations: bool = _f(True, "chat (SFT) datasets: pack whole conversations into each window (no "
                                        "compute on padding); false: one conversation per window, EOS-padded to "
                                        "seq_len (LLaDA's SFT: the model learns to answer into a long masked "
                                        "region, as at a long gen length)")
    eos_tail_max: int = _f(0, "chat (SFT) datasets, packed: follow each conversation with k more EOS, k "
                              "log-uniform in 0..eos_tail_max-1 per conversation, so packed SFT also shows long "
                              "EOS tails (0: none)", _nonneg)


@dataclass
class Checkpoint:
    """DCP checkpoints, initial weights and Hugging Face export."""
    enable: bool = _f(True, "save checkpoints and resume from the newest complete one")
    folder: str = _f("checkpoint", "checkpoint folder inside job.dump_folder")
    interval: int = _f(100, "save every N steps (and at the end)", _nonneg)
    keep_latest_k: int = _f(2, "complete checkpoints kept (0: all)", _nonneg)
    initial_load_path: str = _f("", "Hugging Face folder or DCP checkpoint to take initial weights from")
    initial_load_format: Literal["auto", "hf", "dcp"] = _f("auto", "format of initial_load_path")
    export_hf_at_end: bool = _f(False, "write a Hugging Face checkpoint to <dump_folder>/hf_export at the end")
    export_hf_format: Literal["rnd1", "rnd1_release"] = _f(
        "rnd1", "rnd1: config records attention/objective; rnd1_release: the layout RND1's released inference expects")


@dataclass
class Parallelism:
    """Device mesh: FSDP x HSDP, with expert parallelism borrowed from the FSDP ranks."""
    data_parallel_shard_degree: int = _f(-1, "FSDP degree (-1: world size / replicate degree)", _pos_or_fill)
    data_parallel_replicate_degree: int = _f(1, "HSDP replicas (across nodes)", _pos)
    expert_parallel_degree: int = _f(1, "ranks the experts are split over (divides the FSDP degree)", _pos)
    tensor_parallel_degree: int = _f(1, "tensor parallelism is not implemented: must be 1", _pos)
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = _f(
        "default", "free gathered parameters after forward (default: all blocks but the last)")


@dataclass
class Compile:
    """torch.compile per transformer block."""
    enable: bool = _f(False, "compile each transformer block")
    backend: str = _f("inductor", "torch.compile backend")
    fullgraph: bool = _f(True, "fail on graph breaks")


@dataclass
class ActivationCheckpoint:
    """Recomputation to save activation memory."""
    mode: Literal["none", "full", "selective"] = _f(
        "none", "selective: save matmul outputs, recompute norms and MoE activations")


@dataclass
class Metrics:
    """Logging."""
    log_freq: int = _f(10, "log every N steps", _pos)
    save_jsonl: bool = _f(True, "write metrics.jsonl in the run folder (read by rnd1.tools.runs, the plot and "
                                "compare scripts, scripts/fault_drill.py); false: console lines only")
    enable_tensorboard: bool = _f(False, "also write TensorBoard events (if installed)")
    peak_flops: float = _f(0.0, "per-process peak FLOP/s for MFU (0: measure a matmul)", _nonneg)


@dataclass
class Eval:
    """Validation loss (fixed t grid and seed) and in-training task scoring."""
    interval: int = _f(0, "validate every N steps (0: never)", _nonneg)
    val_steps: int = _f(4, "validation micro-batches", _pos)
    val_seed: int = _f(1234, "seed of the validation masks", _nonneg)
    # midpoint_grid(8) of rnd1/eval/perplexity.py, which scripts/eval_ppl.py uses too: one checkpoint,
    # one bound (tests/eval/test_perplexity.py keeps them equal)
    val_t_grid: list[float] = _f([0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375],
                                 "noise levels the validation NELBO averages over (default: the midpoints of 8 "
                                 "equal strata of (0, 1], the quadrature scripts/eval_ppl.py uses)")
    tasks: list[str] = _f([], "JSONL task files scored during training (rnd1.eval.tasks)")
    task_interval: int = _f(0, "score tasks every N steps (0: never)", _nonneg)


@dataclass
class RL:
    """Reinforcement learning with verifiable rewards (rnd1/rl, docs/rl.md): each step samples
    group_size completions of each prompt with the project's sampler, scores them with the task
    row's verifier and takes diffu-GRPO steps (d1) on them. An RL run reads its prompts from
    rl.tasks, not token windows: the [data] section is not read; training.seq_len is the
    length of the longest rollout (prompt + gen_length: a longer prompt is refused at start-up),
    and training.local_batch_size the completions per policy-loss forward: the shape the memory
    estimate and the kernels' autotuning use."""
    enable: bool = _f(False, "an RL run: rollouts from rl.tasks scored by verifiers, diffu-GRPO policy loss")
    tasks: str = _f("", "JSONL prompts, one per line ({\"prompt\"|\"question\", \"answer\"} for the number "
                        "verifier; rnd1/rl/tasks.py)")
    eval_tasks: str = _f("", "JSONL held-out prompts whose greedy accuracy is the validation of an RL run (every "
                             "eval.interval steps; '' : none)")
    eval_limit: int = _f(0, "score the first N eval_tasks prompts (0: all)", _nonneg)
    prompts_per_step: int = _f(8, "prompts per optimiser step over all ranks (a multiple of the data-parallel "
                                  "ranks)", _pos)
    group_size: int = _f(8, "G: completions sampled per prompt (>= 2: the advantage is relative to the group)", _pos)
    gen_length: int = _f(64, "tokens generated per completion", _pos)
    block_length: int = _f(32, "the sampler's semi-autoregressive block length", _pos)
    sampler_steps: int = _f(0, "forwards per rollout at most (0: gen_length, one token per forward at worst)",
                            _nonneg)
    kv_cache: Literal["none", "prefix", "dual"] = _f("dual", "the sampler's cache (rnd1/generate.py)")
    suffix_window: int = _f(0, "DPad's window: a rollout's forwards see only this many masked positions past the "
                               "block (0: all; docs/sampling.md)", _nonneg)
    decoding: Literal["fixed", "threshold", "factor"] = _f(
        "threshold", "how many tokens a forward commits: fixed (gen_length / sampler_steps), threshold (every one "
                     "above rl.threshold), factor (Fast-dLLM's factor rule, rl.factor)")
    threshold: float = _f(0.9, "decoding = threshold: commit every position whose probability exceeds it", _unit_open)
    factor: float = _f(1.0, "decoding = factor: Fast-dLLM's factor", _pos)
    temperature: float = _f(1.0, "sampling temperature of the rollouts (> 0: a group needs different "
                                 "completions)", _pos)
    p_mask: float = _f(0.15, "d1's random prompt masking: each prompt token is masked with this probability in "
                             "the policy-loss forward", lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    inner_steps: int = _f(1, "mu: gradient steps per batch of rollouts (each with a new prompt mask)", _pos)
    clip_eps: float = _f(0.2, "PPO clipping of the ratio pi / pi_old (inert when inner_steps = 1)", _unit_open)
    kl_beta: float = _f(0.0, "weight of the k3 KL to the frozen initial policy (0: no reference model, as DAPO)",
                        _nonneg)
    scale_advantages: bool = _f(True, "divide each group's centred rewards by their std (GRPO); false: Dr. GRPO")


KernelBackend = Literal["auto", "reference", "triton"]  # rnd1.kernels.backend.BACKENDS (a test keeps them equal)


@dataclass
class Kernels:
    """Backends of the hot ops, one vocabulary for all three: auto (Triton on CUDA, the PyTorch
    reference on CPU), reference, triton (on CPU only under TRITON_INTERPRET=1). Set once at
    start-up through rnd1/kernels/backend.py (rnd1.training.build.set_kernel_backends)."""
    grouped_mm: KernelBackend = _f("auto", "expert matmul backend (the old values: loop is now reference, "
                                   "kernels is auto; torch is gone)")
    cross_entropy: KernelBackend = _f("auto", "masked cross-entropy backend")
    dispatch: KernelBackend = _f("auto", "MoE token dispatch / combine backend (the local dispatcher and the "
                                 "receiving side of the expert-parallel one)")


def _memory_size(v):
    from rnd1.tools.sizes import NOT_A_SIZE, parse_bytes

    try:
        return None if parse_bytes(v) > 0 else "must be > 0"
    except ValueError:
        return NOT_A_SIZE


@dataclass
class Hardware:
    """The cluster this config is written for. scripts/estimate_memory.py takes its defaults from
    here (the test suite estimates every shipped config at them); the trainer says at start-up
    when a launch differs."""
    world_size: int = _f(0, "ranks the config is written for (0: not stated; the estimate then needs "
                            "--world-size)", _nonneg)
    device_memory: str = _f("80GiB", "memory of one accelerator, e.g. 80GiB (H100), 141GB (H200); a config "
                                     "the estimate says does not fit it fails the test suite", _memory_size)


SECTIONS: dict[str, type] = {
    "job": Job, "model": Model, "objective": Objective, "optimizer": Optimizer, "lr_schedule": LRSchedule,
    "training": Training, "data": Data, "checkpoint": Checkpoint, "parallelism": Parallelism,
    "compile": Compile, "activation_checkpoint": ActivationCheckpoint, "metrics": Metrics, "eval": Eval,
    "kernels": Kernels, "hardware": Hardware, "rl": RL,
}


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    objective: Objective = field(default_factory=Objective)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    parallelism: Parallelism = field(default_factory=Parallelism)
    compile: Compile = field(default_factory=Compile)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    metrics: Metrics = field(default_factory=Metrics)
    eval: Eval = field(default_factory=Eval)
    kernels: Kernels = field(default_factory=Kernels)
    hardware: Hardware = field(default_factory=Hardware)
    rl: RL = field(default_factory=RL)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def given_on_command_line(self, key: str) -> bool:
        """Whether ``section.key`` was set by a ``--section.key`` override (not the file or the default)."""
        return key in getattr(self, "_cli_keys", ())

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# --------------------------------------------------------------------------- conversion
def _closest(name: str, options) -> str:
    m = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {m[0]!r}?" if m else f"; valid: {', '.join(sorted(options))}"


def _convert(value: Any, tp, where: str, from_cli: bool) -> Any:
    """Check (TOML) or parse (CLI string) ``value`` as type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError as e:
                    raise ConfigError(f"{where}: cannot parse list {text!r}: {e}") from e
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {inner.__name__}, got {value!r}")
        return [_convert(v, inner, where, from_cli) for v in value]
    if tp is bool:
        if from_cli and isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if from_cli and isinstance(value, str):
            try:
                f = float(value.replace("_", "")) if any(c in value.lower() for c in ".e") else None
                value = int(f) if f is not None and f == int(f) else int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{where}: expected int, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return value
    if tp is float:
        if from_cli and isinstance(value, str):
            try:
                value = float(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{where}: expected float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")  # pragma: no cover (a bug in this file)


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _set(cfg: JobConfig, section: str, key: str, value: Any, origin: str, from_cli: bool) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}]{_closest(section, SECTIONS)}")
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ConfigError(f"{origin}: unknown key {section}.{key}{_closest(key, fields)}")
    where = f"{section}.{key} ({origin})"
    value = _convert(value, _hints(cls)[key], where, from_cli)
    check = fields[key].metadata.get("check")
    if check is not None:
        vals = value if isinstance(value, list) else [value]
        for v in vals:
            err = check(v)
            if err:
                raise ConfigError(f"{where}: {v!r} {err}")
    setattr(getattr(cfg, section), key, value)
    if from_cli:  # not a dataclass field: it is not part of the config (to_dict / to_toml leave it out)
        cfg._cli_keys = getattr(cfg, "_cli_keys", frozenset()) | {f"{section}.{key}"}


# --------------------------------------------------------------------------- loading
def _read_toml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: include cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        where = f" (included from {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{where}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    base_name = data.pop("include", None) or data.pop("base", None)
    if base_name is None:
        return {"__file__": str(path), **data}
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: include must be a path string, got {base_name!r}")
    base = _read_toml(path.parent / base_name, chain + (path,))
    return _merge(base, {"__file__": str(path), **data})


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    cfg = JobConfig()
    if path is not None:
        data = _read_toml(Path(path))
        fname = data.pop("__file__")
        for section, table in data.items():
            if not isinstance(table, dict):
                if section in SECTIONS:
                    raise ConfigError(f"{fname}: [{section}] must be a table, got {table!r}")
                raise ConfigError(f"{fname}: unknown top-level key {section!r}"
                                  f"{_closest(section, list(SECTIONS) + ['include'])}")
            for key, value in table.items():
                _set(cfg, section, key, value, fname, from_cli=False)
    apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: JobConfig, args: list[str]) -> None:
    """``--section.key=value`` or ``--section.key value``."""
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            name, value = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {arg} needs a value")
            name, value = body, args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        _set(cfg, section, key, value, f"from {arg.split('=')[0]}", from_cli=True)
        i += 1


def parse_args(argv: list[str]) -> JobConfig:
    """``[--config FILE] [--section.key=value ...]`` -> JobConfig."""
    argv = list(argv)
    path = None
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print(config_reference_markdown())
        raise SystemExit(0)
    for i, a in enumerate(argv):
        if a == "--config" or a == "--job.config_file":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            path = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--config=") or a.startswith("--job.config_file="):
            path = a.split("=", 1)[1]
            del argv[i]
            break
    return load_config(path, argv)


# --------------------------------------------------------------------------- cross-field checks
def validate(cfg: JobConfig, world_size: int = 1) -> None:
    """Checks that involve several keys or the world size."""
    o, t, p = cfg.objective, cfg.training, cfg.parallelism
    from rnd1.diffusion.objective import OBJECTIVES

    if OBJECTIVES[o.name].attention == "causal" and o.attention_recipe != "causal":
        raise ConfigError(f"objective.name={o.name!r} needs objective.attention_recipe='causal' "
                          f"(got {o.attention_recipe!r}: bidirectional attention would see the target)")
    if o.attention_recipe == "grafting" and o.grafting_tokens <= 0:
        raise ConfigError("objective.attention_recipe='grafting' needs objective.grafting_tokens > 0")
    _validate_blocks(o, t.seq_len)
    if o.complementary_masking and not OBJECTIVES[o.name].masks:
        raise ConfigError(f"objective.complementary_masking=true needs a masking objective, not {o.name!r}")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.datasets):
        raise ConfigError(f"data.weights has {len(cfg.data.weights)} entries but data.datasets has "
                          f"{len(cfg.data.datasets)}")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty")
    if p.tensor_parallel_degree != 1:
        raise ConfigError(f"parallelism.tensor_parallel_degree={p.tensor_parallel_degree}: tensor parallelism "
                          f"is not implemented (the RND1 recipe uses EP + FSDP); set it to 1")
    rep = p.data_parallel_replicate_degree
    shard = p.data_parallel_shard_degree if p.data_parallel_shard_degree > 0 else world_size // max(rep, 1)
    if rep * shard != world_size:
        raise ConfigError(f"parallelism: data_parallel_replicate_degree x data_parallel_shard_degree = {rep} x "
                          f"{shard} = {rep * shard}, but the world size is {world_size}")
    if shard % p.expert_parallel_degree:
        raise ConfigError(f"parallelism.expert_parallel_degree={p.expert_parallel_degree} must divide the FSDP "
                          f"degree {shard} (world size {world_size})")
    if cfg.rl.enable:
        _validate_rl(cfg, shard * rep)
    per_step = t.local_batch_size * t.seq_len * world_size
    if t.global_batch_tokens and t.global_batch_tokens % per_step:
        raise ConfigError(f"training.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                          f"local_batch_size x seq_len x world size = {t.local_batch_size} x {t.seq_len} x "
                          f"{world_size} = {per_step}")


def _validate_rl(cfg: JobConfig, dp: int) -> None:
    from rnd1.diffusion.objective import OBJECTIVES

    r, o = cfg.rl, cfg.objective
    if not OBJECTIVES[o.name].masks or o.name.startswith("block_"):
        raise ConfigError(f"rl.enable=true needs objective.name 'a2d' or 'mdlm' (the policy's diffusion objective), "
                          f"got {o.name!r}")
    if o.attention_recipe != "scp":
        raise ConfigError(f"rl.enable=true needs objective.attention_recipe='scp' (a diffusion policy attends "
                          f"bidirectionally), got {o.attention_recipe!r}")
    if not r.tasks:
        raise ConfigError("rl.enable=true needs rl.tasks, a JSONL file of prompts")
    if r.group_size < 2:
        raise ConfigError(f"rl.group_size={r.group_size}: GRPO's advantage compares completions of one prompt; "
                          f"expected >= 2")
    if r.prompts_per_step % dp:
        raise ConfigError(f"rl.prompts_per_step={r.prompts_per_step} is not a multiple of the {dp} data-parallel "
                          f"ranks")
    if r.sampler_steps and r.sampler_steps < -(-r.gen_length // r.block_length):
        raise ConfigError(f"rl.sampler_steps={r.sampler_steps} is fewer than the {-(-r.gen_length // r.block_length)} "
                          f"blocks of gen_length {r.gen_length} / block_length {r.block_length}")
    if cfg.training.global_batch_tokens or cfg.training.total_tokens:
        raise ConfigError("training.global_batch_tokens / total_tokens: an RL step's batch is rl.prompts_per_step x "
                          "rl.group_size completions and its length training.steps; leave both 0")
    if r.gen_length >= cfg.training.seq_len:
        raise ConfigError(f"rl.gen_length={r.gen_length} leaves no room for a prompt in training.seq_len="
                          f"{cfg.training.seq_len} (the longest rollout, prompt + completion)")


def _validate_blocks(o, seq_len: int) -> None:
    block = o.name.startswith("block_")
    sizes, tokens = o.block_schedule_sizes, o.block_schedule_tokens
    if not block:
        if o.block_size or sizes or tokens:
            raise ConfigError(f"objective.block_size / block_schedule_*: only for block_a2d / block_mdlm, but "
                              f"objective.name={o.name!r}")
        return
    if o.block_size < 1:
        raise ConfigError(f"objective.block_size={o.block_size}: objective.name={o.name!r} needs a block size "
                          f">= 1 (e.g. 32)")
    if o.attention_recipe != "scp":
        raise ConfigError(f"objective.attention_recipe={o.attention_recipe!r}: block diffusion is block-causal "
                          f"from step 0; use 'scp' (warm up with block_schedule_sizes instead of grafting)")
    if len(sizes) != len(tokens):
        raise ConfigError(f"objective.block_schedule_sizes has {len(sizes)} entries but block_schedule_tokens "
                          f"has {len(tokens)}")
    if sizes:
        if tokens[0] != 0 or any(b <= a for a, b in zip(tokens, tokens[1:])):
            raise ConfigError(f"objective.block_schedule_tokens={tokens}: expected increasing token counts "
                              f"starting at 0")
        if any(s < 1 for s in sizes):
            raise ConfigError(f"objective.block_schedule_sizes={sizes}: every size must be >= 1")
        if sizes[-1] != o.block_size:
            raise ConfigError(f"objective.block_schedule_sizes ends at {sizes[-1]} but objective.block_size="
                              f"{o.block_size}: the schedule's last size is the run's block size")


# --------------------------------------------------------------------------- writing
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_toml(d: dict) -> str:
    lines = []
    for section, table in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def config_reference_markdown() -> str:
    """The config reference (docs/config.md), generated from the dataclasses."""
    out = ["# Config reference", "",
           "Generated by `rnd1.config.config_reference_markdown()`; every key can be overridden as "
           "`--section.key=value`.", ""]
    for name, cls in SECTIONS.items():
        out += [f"## [{name}]", "", (cls.__doc__ or "").strip(), "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                tname = " \\| ".join(map(str, typing.get_args(tp)))
            elif typing.get_origin(tp) is list:
                tname = f"list[{typing.get_args(tp)[0].__name__}]"
            else:
                tname = tp.__name__
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `{f.name}` | {tname} | `{_toml_value(default)}` | {f.metadata.get('help', '')} |")
        out.append("")
    return "\n".join(out)
