"""Rehearse a shipped config on CPU: the same run, shrunk only in size.

A config for a GPU cluster (Qwen3-30B-A3B, EP 8 on 64 ranks, selective recompute, compile, bf16
mixed precision) cannot be started here as it is, but every setting that decides *which code
runs* can: the objective and attention recipe, the schedule, compile and its ``fullgraph``,
activation checkpointing, mixed precision, expert parallelism under FSDP, checkpointing,
validation and export. A rehearsal keeps all of those and changes only sizes:

=====================  ==========================================================================
model                  the ``debug`` preset (MoE) or ``debug_dense`` (dense), byte tokenizer
initial weights        a pretrained config loads a tiny Hugging Face folder of that preset
batch                  sequences of 64 tokens, 2 per micro-batch and rank; 2 accumulation steps
                       if the config sets a global batch (cluster configs accumulate), 1 otherwise
                       (8 ranks: 32 sequences a step)
length                 4 optimiser steps, in the config's own unit (steps or a token budget);
                       token counts (grafting switch, warmup, sqrt-LR base batch) scaled by the
                       same ratio, so the grafting switch still happens mid-run
processes              the config's own EP degree, on EP ranks: EP 8 runs as EP 8 on 8 processes,
                       EP spanning every rank as on one 8-GPU node (the tiny MoE preset's 8 experts,
                       one per rank); a cluster config without EP on 2 ranks (FSDP); a debug preset
                       on EP ranks (how its run_train.sh line starts it). ``nproc`` / ``ep``
                       (``--nproc`` / ``--ep``) pick another layout: ``ep=4, nproc=8`` is EP 4 x
                       FSDP 2. The EP degree must divide the preset's 8 experts, the process
                       count must be a multiple of it
intervals              validation, task scoring and checkpoints every 2 steps; loss logged every step
data                   one small byte-level dataset in place of each of the config's datasets; a
                       chat (SFT) config gets its own chat source tokenised with the byte tokenizer,
                       in windows of 256 tokens (a conversation must fit one)
block diffusion        the block size as configured; its warm-up schedule's token counts scaled
RL                     16 prompts of its own, rewarded by the ``regex`` verifier; one prompt per
                       rank and step, G at most 4, mu at most 2, 16 generated tokens (blocks of 8 when the
                       config decodes in several blocks). Sampled rollouts move with float noise
                       (a token drawn at a cumulative-probability boundary flips), so an RL
                       rehearsal is checked for its exit, finite metrics and checkpoints, not
                       compared with the reference; ``tests/rl`` compares layouts in fp32
=====================  ==========================================================================

The reference is the same shrunken run in one process, eager, without expert parallelism: same
global batch, same samples and masks (noise is keyed by global sample index), so its losses
must match the rehearsal's up to float noise (bf16 noise when the config computes in bf16).
``scripts/rehearse_config.py`` runs one config; ``tests/test_shipped_configs.py`` runs all: the
30B-A3B config (EP 8) at EP 8 on 8 processes and at EP 4 x FSDP 2 on 8 processes, both against
one 1-process reference; every other config at its default layout when that takes at most 4
processes, and the 30B recipes derived from it (EP 8 too; 8 processes would add ~25 s to CI for
each of the six) at EP 2 x FSDP 2 on 4 processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rnd1.config import JobConfig, load_config
from rnd1.model.config import get_preset
from rnd1.tools.runs import read_run

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, MICRO_BATCH, STEPS = 64, 2, 4
CHAT_SEQ_LEN = 256
DEBUG_PRESETS = ("debug", "debug_dense")


@dataclass
class Rehearsal:
    config: Path
    preset: str  # the tiny preset standing in for the config's model
    nproc: int
    overrides: dict[str, object]  # the shrunk run: sizes only
    reference_overrides: dict[str, object]  # + 1 process, eager, no EP
    rel_tol: float  # float noise allowed between the two loss curves
    notes: list[str] = field(default_factory=list)


def _config_total_tokens(cfg: JobConfig) -> float:
    t = cfg.training
    if t.total_tokens > 0:
        return float(t.total_tokens)
    per_step = t.global_batch_tokens or t.local_batch_size * t.seq_len  # world size unknown: 1
    return float(t.steps * per_step)


class PlanError(ValueError):
    """A layout the rehearsal cannot run (one line: what and why)."""


def layout(config: str | Path, *, nproc: int | None = None, ep: int | None = None) -> tuple[int, int]:
    """(EP degree, processes) of the rehearsal of ``config``. The EP degree is the config's own;
    ``ep`` overrides it (``ep=4, nproc=8``: EP 4 x FSDP 2). ``nproc`` defaults to the EP degree (EP
    spans every rank, as EP 8 does on one 8-GPU node), or 2 (FSDP) for a cluster config without EP;
    it must be a multiple of the EP degree (times the config's replicate degree)."""
    config = Path(config)
    cfg = load_config(config)
    p = cfg.parallelism
    ep = p.expert_parallel_degree if ep is None else ep
    if ep < 1:
        raise PlanError(f"{config.name}: expert-parallel degree {ep} must be >= 1")
    preset = _preset(cfg)
    experts = get_preset(preset).num_experts
    if ep > 1 and (not experts or experts % ep):
        raise PlanError(f"{config.name}: EP {ep} does not divide the {experts} experts of the {preset!r} preset "
                        f"the rehearsal trains")
    rep = p.data_parallel_replicate_degree
    if nproc is None:
        nproc = ep * rep if ep > 1 or cfg.model.name in DEBUG_PRESETS else 2 * rep
    if nproc < 1 or nproc % (ep * rep):
        raise PlanError(f"{config.name}: {nproc} processes cannot hold EP {ep}"
                        + (f" x {rep} replicas" if rep > 1 else "")
                        + f": the process count must be a multiple of {ep * rep}")
    return ep, nproc


def _preset(cfg: JobConfig) -> str:
    base = get_preset(cfg.model.name) if not cfg.model.hf_config else None
    return "debug" if (base.is_moe if base is not None else True) else "debug_dense"


def plan(config: str | Path, *, data: str | Path, pretrained: dict[str, str | Path], out: str | Path,
         nproc: int | None = None, ep: int | None = None) -> Rehearsal:
    """The shrunk overrides for ``config``. ``pretrained`` maps a tiny preset name to a Hugging
    Face folder of it (see ``write_tiny_pretrained``); ``nproc`` and ``ep``: see ``layout``."""
    config = Path(config)
    cfg = load_config(config)
    preset = _preset(cfg)
    t, p, o, s = cfg.training, cfg.parallelism, cfg.objective, cfg.lr_schedule
    ep, nproc = layout(config, nproc=nproc, ep=ep)
    accum = 2 if t.global_batch_tokens > 0 else 1
    gbt = MICRO_BATCH * SEQ_LEN * nproc * accum
    total = STEPS * gbt
    ratio = total / _config_total_tokens(cfg)

    seq_len = SEQ_LEN
    if cfg.data.prepare.startswith("chat:"):  # SFT: the config's own conversations, byte-level
        data, seq_len = _chat_dataset(cfg.data.prepare, Path(out) / "chat_data"), CHAT_SEQ_LEN
        gbt = MICRO_BATCH * seq_len * nproc * accum
        total = STEPS * gbt
        ratio = total / _config_total_tokens(cfg)
    ov: dict[str, object] = {
        "job.dump_folder": str(Path(out) / "run"), "job.print_config": False,
        "model.name": preset, "model.hf_config": "", "model.tokenizer_path": "byte", "model.mask_token_id": -1,
        "training.seq_len": seq_len, "training.local_batch_size": MICRO_BATCH, "training.global_batch_tokens": gbt,
        "data.datasets": "[" + ", ".join(json.dumps(str(data)) for _ in cfg.data.datasets) + "]",
        "data.prepare": "", "metrics.log_freq": 1,
        "parallelism.expert_parallel_degree": ep,
    }
    if t.total_tokens > 0:
        ov["training.total_tokens"] = total
    else:
        ov["training.steps"] = STEPS
    if p.data_parallel_shard_degree > 0:
        ov["parallelism.data_parallel_shard_degree"] = nproc // p.data_parallel_replicate_degree
    if cfg.checkpoint.initial_load_path:
        ov["checkpoint.initial_load_path"] = str(pretrained[preset])
        ov["checkpoint.initial_load_format"] = "hf"
    if o.grafting_tokens > 0:
        ov["objective.grafting_tokens"] = max(1, round(o.grafting_tokens * ratio))
    if s.warmup_tokens > 0:
        ov["lr_schedule.warmup_tokens"] = max(1, round(s.warmup_tokens * ratio))
    if o.block_schedule_tokens:  # scaled, kept strictly increasing so every stage still exists
        scaled = [0]
        for tok in o.block_schedule_tokens[1:]:
            scaled.append(max(scaled[-1] + 1, round(tok * ratio)))
        ov["objective.block_schedule_tokens"] = "[" + ", ".join(map(str, scaled)) + "]"
    if s.base_batch_tokens > 0 and t.global_batch_tokens > 0:
        ov["lr_schedule.base_batch_tokens"] = max(1, round(s.base_batch_tokens * gbt / t.global_batch_tokens))
    if cfg.rl.enable:
        ov.update(_rl_overrides(cfg, Path(out), nproc))
    for key in ("eval.interval", "eval.task_interval", "checkpoint.interval"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) > 0:
            ov[key] = 2
    if cfg.eval.interval > 0:
        ov["eval.val_steps"] = 1

    ref = {**ov, "job.dump_folder": str(Path(out) / "reference"), "compile.enable": False,
           "parallelism.expert_parallel_degree": 1, "parallelism.data_parallel_shard_degree": -1,
           "parallelism.data_parallel_replicate_degree": 1}
    bf16 = (nproc > 1 and t.mixed_precision_param == "bfloat16") or t.autocast in ("bfloat16", "auto") \
        or cfg.model.dtype == "bfloat16"
    return Rehearsal(config, preset, nproc, ov, ref, rel_tol=3e-2 if bf16 else 2e-3)


RL_PROMPTS = 16
RL_PATTERN = "^[ -~]"  # the reply starts with printable ASCII: a random byte model earns it about a third of the time


def _rl_overrides(cfg: JobConfig, out: Path, nproc: int) -> dict[str, object]:
    """An RL config's shrunk run: a prompt file of its own, rewarded by the ``regex`` verifier
    (a tiny random-weight model scores near 0 on arithmetic, and all-zero rewards would leave
    every advantage 0), one prompt per rank and step, G at most 4, mu at most 2 (the path of
    mu > 1 still runs), 16 generated tokens in blocks of 8 when the config decodes in more than one
    block (the cache refresh at a block start still runs)."""
    r = cfg.rl
    out.mkdir(parents=True, exist_ok=True)
    tasks = out / "rl_prompts.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Say something about {i:02d}.", "pattern": RL_PATTERN,
                                         "verifier": "regex"}) + "\n" for i in range(RL_PROMPTS)))
    gen, block = (16, 8) if r.gen_length > r.block_length else (16, 16)
    ov: dict[str, object] = {"rl.tasks": str(tasks), "rl.prompts_per_step": nproc,
                             "rl.inner_steps": min(r.inner_steps, 2), "rl.group_size": min(r.group_size, 4),
                             "rl.gen_length": gen, "rl.block_length": block, "rl.sampler_steps": 0,
                             "training.global_batch_tokens": 0,
                             "training.seq_len": 128}  # a chat-template prompt (~90 byte tokens) + 16
    if r.eval_tasks:
        ov.update({"rl.eval_tasks": str(tasks), "rl.eval_limit": 4})
    return ov


def _chat_dataset(source: str, out: Path) -> Path:
    """The config's chat source (``chat:PATH``, relative to the repository) tokenised byte-level;
    a cluster config's placeholder path gets the repository's own chat data instead."""
    from rnd1.data.prepare import prepare

    path = Path(source[len("chat:"):])
    path = path if path.is_absolute() else REPO / path
    if not path.is_file():
        path = REPO / "data" / "arith_chat.jsonl"
    if not (out / "meta.json").is_file():
        prepare([f"chat:{path}"], "byte", out, val_fraction=0.1, workers=1, quiet=True)
    return out


def write_tiny_pretrained(preset: str, out: str | Path) -> Path:
    """A Hugging Face folder of a tiny preset: what a pretrained config loads in a rehearsal."""
    from rnd1.checkpoint.hf import save_pretrained
    from rnd1.model.qwen3 import build_model

    out = Path(out)
    if not (out / "config.json").is_file():
        save_pretrained(build_model(get_preset(preset), seed=1234), out, overwrite=True)
    return out


def _args(overrides: dict[str, object]) -> list[str]:
    out = []
    for k, v in overrides.items():
        v = ("true" if v else "false") if isinstance(v, bool) else v
        out.append(f"--{k}={v}")
    return out


@dataclass
class RunResult:
    returncode: int
    losses: list[float]
    output: str


def run(config: Path, nproc: int, overrides: dict[str, object], timeout: int = 900) -> RunResult:
    """Start ``config`` through the real entry point (run_train.sh -> torchrun -> rnd1.train)."""
    env = {**os.environ, "CONFIG_FILE": str(config), "NPROC": str(nproc), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", str(REPO / "run_train.sh"), *_args(overrides)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    metrics = Path(str(overrides["job.dump_folder"])) / "metrics.jsonl"
    losses = []
    if metrics.is_file():
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in sorted((r for r in recs if "loss" in r), key=lambda r: r["step"])]
    return RunResult(proc.returncode, losses, proc.stdout + proc.stderr)


RL_METRICS = ("reward_mean", "reward_std", "accuracy", "zero_adv_frac", "completion_len", "rollout_tokens_per_s",
              "rollout_share", "verifier_errors")


def check_rl_metrics(run_dir: Path) -> str | None:
    """None when an RL rehearsal logged every RL metric, finite, at each of its steps."""
    try:
        steps = read_run(run_dir).train
    except FileNotFoundError:
        steps = []
    if len(steps) != STEPS:
        return f"expected {STEPS} logged RL steps, got {len(steps)}"
    for r in steps:
        missing = [k for k in RL_METRICS if not isinstance(r.get(k), (int, float)) or not math.isfinite(r[k])]
        if missing:
            return f"step {r['step']}: RL metrics missing or non-finite: {', '.join(missing)}"
    return None


def compare(a: list[float], b: list[float], rel_tol: float) -> str | None:
    """None when the two loss curves agree; otherwise a one-line reason."""
    if len(a) != STEPS or len(b) != STEPS:
        return f"expected {STEPS} logged losses, got {len(a)} (rehearsal) and {len(b)} (reference)"
    if not all(math.isfinite(x) for x in a + b):
        return f"non-finite loss: rehearsal {a}, reference {b}"
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    if worst > rel_tol:
        return f"losses differ by {worst:.2e} relative (> {rel_tol:.0e}): rehearsal {a}, reference {b}"
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="TOML files under train_configs/")
    ap.add_argument("--out", default="", help="work folder (default: a temporary one)")
    ap.add_argument("--data", default="", help="a byte-level dataset folder (default: built from the stdlib)")
    ap.add_argument("--nproc", type=int, default=None,
                    help="processes (default: the EP degree, or 2 for a cluster config without EP)")
    ap.add_argument("--ep", type=int, default=None,
                    help="expert-parallel degree in place of the config's, e.g. --ep 4 --nproc 8: EP 4 x FSDP 2")
    args = ap.parse_args(argv)
    try:  # a layout that cannot run: one line before any work
        for c in args.configs:
            layout(c, nproc=args.nproc, ep=args.ep)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = Path(args.out or tempfile.mkdtemp(prefix="rnd1-rehearsal-"))
    data = Path(args.data) if args.data else work / "data"
    if not (data / "meta.json").is_file():
        from rnd1.data.prepare import prepare

        prepare(["stdlib"], "byte", data, val_fraction=0.05, workers=1, max_docs=300, quiet=True)
    pretrained = {p: write_tiny_pretrained(p, work / f"pretrained_{p}") for p in DEBUG_PRESETS}
    failed = 0
    for c in args.configs:
        r = plan(c, data=data, pretrained=pretrained, out=work / Path(c).stem, nproc=args.nproc, ep=args.ep)
        ep = r.overrides["parallelism.expert_parallel_degree"]
        for ov in (r.overrides, r.reference_overrides):  # a reused --out: no resume from an earlier rehearsal
            shutil.rmtree(str(ov["job.dump_folder"]), ignore_errors=True)
        got = run(r.config, r.nproc, r.overrides)
        if got.returncode != 0:
            print(f"FAIL {c}: exit {got.returncode} on {r.nproc} processes\n{got.output[-3000:]}")
            failed += 1
            continue
        if load_config(c).rl.enable:  # sampled rollouts are not compared (see RL in the table above)
            why = check_rl_metrics(Path(str(r.overrides["job.dump_folder"])))
            print(f"{'FAIL' if why else 'ok  '} {c}: {r.nproc} processes (EP {ep}), RL metrics"
                  + (f": {why}" if why else f" logged, losses {[round(x, 4) for x in got.losses]}"))
            failed += bool(why)
            continue
        ref = run(r.config, 1, r.reference_overrides)
        why = compare(got.losses, ref.losses, r.rel_tol) if ref.returncode == 0 else \
            f"reference run exited {ref.returncode}\n{ref.output[-3000:]}"
        print(f"{'FAIL' if why else 'ok  '} {c}: {r.nproc} processes (EP {ep}), "
              f"losses {[round(x, 4) for x in got.losses]}"
              + (f": {why}" if why else f", reference {[round(x, 4) for x in ref.losses]}"))
        failed += bool(why)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
