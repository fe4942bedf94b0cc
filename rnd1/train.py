"""The training loop: build -> parallelise -> load -> step -> log -> checkpoint.

``python -m rnd1.train --config train_configs/debug_model.toml [--section.key=value ...]``
(or ``./run_train.sh``, which wraps torchrun). One step, as data: packed token windows from the
loader -> corruption (x_t, t) -> model hidden states -> only the supervised positions reach the
LM head (masked cross-entropy, weight 1/t) -> sum / global target count -> backward -> clip ->
AdamW with per-group learning rates from the token-space schedule -> metrics -> checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from rnd1.checkpoint.dcp import CheckpointError, CheckpointManager, checkpoint_info
from rnd1.config import ConfigError, JobConfig, parse_args, validate
from rnd1.data.shards import DataError
from rnd1.diffusion.objective import get_objective
from rnd1.metrics import (MATMUL_PEAK_HOW, MetricsLogger, MetricsWriteError, Throughput, measure_matmul_peak,
                          peak_memory_bytes, router_balance)
from rnd1.parallel.env import (DistEnv, announce_bad_input, barrier, collective_timeout_message, destroy,
                               first_to_report, init_distributed, peer_had_bad_input)
from rnd1.parallel.fsdp import reshard_all
from rnd1.training import build as B
from rnd1.training.guards import NonFiniteGuard
from rnd1.training.preemption import PreemptionHandler, stop_with_parent
from rnd1.training.run_lock import RunLock, RunLockError
from rnd1.training.step import MicroBatch, run_step


def log0(env: DistEnv, msg: str) -> None:
    if env.is_rank0:
        print(f"[rnd1] {msg}", flush=True)



def _loss_mask(batch: dict):
    """The batch's loss mask (SFT data: response tokens), or None when every token counts."""
    m = batch.get("loss_mask")
    return None if m is None or bool(m.all()) else m


class Trainer:
    def __init__(self, cfg: JobConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.job.dump_folder)
        torch.manual_seed(cfg.training.seed)
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)

        self.objective = B.build_objective(cfg)
        self.tokenizer = B.build_tokenizer(cfg)
        self.model_cfg = B.build_model_config(cfg, self.tokenizer)
        if cfg.checkpoint.export_hf_at_end:  # a bad export setting fails now, not after the whole run
            B.export_config(cfg, self.model_cfg, self.tokenizer)
        self.parallel = B.build_parallel_dims(cfg, env)
        if cfg.hardware.world_size and cfg.hardware.world_size != env.world_size:
            log0(env, f"hardware.world_size={cfg.hardware.world_size}: this config is written (and its memory "
                      f"estimated) for {cfg.hardware.world_size} ranks; running on {env.world_size}")
        self.batch = self._build_data()
        L = cfg.training.seq_len
        for bs in sorted({b for b in (cfg.objective.block_size, *cfg.objective.block_schedule_sizes)
                          if 0 < b < L and L % b}):
            log0(env, f"objective block size {bs} does not divide training.seq_len {L}: the last block of each row "
                      f"has {L % bs} positions (a shorter block: its own t, scored like the others)")
        B.set_kernel_backends(cfg)
        self.autocast, why = B.resolve_autocast(cfg, env.device)
        B.check_attention_backend(cfg, env.device)
        if cfg.training.autocast == "auto":
            log0(env, f"precision: {'bf16 autocast' if self.autocast == 'bfloat16' else 'fp32'} ({why})")

        self.model = B.build_and_load_model(cfg, self.model_cfg, self.parallel, env, tokenizer=self.tokenizer)
        self.optimizer, self.schedule = B.build_optimizer_and_schedule(cfg, self.model, self.batch)
        self.train_loader = self._build_train_loader()
        self.ckpt = CheckpointManager(self.run_dir / cfg.checkpoint.folder, cfg.checkpoint.keep_latest_k)
        self.step, self.tokens_seen = 0, 0
        self.guard = NonFiniteGuard(cfg.training.max_nonfinite_skips)
        dtype = torch.bfloat16 if self.autocast == "bfloat16" or self.model_dtype == torch.bfloat16 \
            else torch.float32
        # a configured peak is trusted; a measured one is measured again if MFU ever reads > 100%
        remeasure = None if cfg.metrics.peak_flops else (lambda: measure_matmul_peak(dtype, device=env.device))
        self.peak_flops = cfg.metrics.peak_flops or remeasure()
        self.throughput = Throughput(self.model_cfg.flops_per_token(cfg.training.seq_len), self.peak_flops,
                                     env.world_size, remeasure_peak=remeasure)
        self._resume()
        self._update_attention_mode(starting=True)
        # Every start-up check has passed, the resume checks included (they read the folder as the
        # last run left it): only now is the run folder written, so a failed start leaves nothing,
        # and only now is the config printed, so a refusal is the one line a failed start prints.
        if env.is_rank0:
            if cfg.job.print_config:
                print(cfg.to_toml(), flush=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(cfg.to_toml())
        self.metrics = MetricsLogger(self.run_dir, enabled=env.is_rank0, tensorboard=cfg.metrics.enable_tensorboard,
                                     save_jsonl=cfg.metrics.save_jsonl)
        for line in B.autotune_kernels(cfg, self.model_cfg, self.batch, self.parallel, env, self.objective,
                                       self._compute_dtype, self.run_dir / "autotune.json", optimizer=self.optimizer,
                                       peak_flops=None if cfg.metrics.peak_flops else self.peak_flops):
            log0(env, line)

    def _build_data(self) -> B.BatchPlan:
        """The token datasets (prepared if missing) and the batch geometry they are read in."""
        self.datasets = B.ensure_datasets(self.cfg, self.tokenizer, self.model_cfg, self.env)
        return B.batch_plan(self.cfg, self.parallel)

    def _build_train_loader(self):
        """What ``train_step`` reads and the checkpoint keeps the position of (``state_dict``)."""
        return B.build_loader(self.cfg, self.datasets, "train", self.batch, self.parallel)

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def _compute_dtype(self) -> torch.dtype:
        """What the matmuls run in: bf16 under autocast or bf16 parameters, else the parameters'."""
        return torch.bfloat16 if self.autocast == "bfloat16" else self.model_dtype

    # ----------------------------------------------------------------- checkpoints
    def _resume(self):
        if not self.cfg.checkpoint.enable:
            return
        for stale in self.ckpt.incomplete_checkpoints():
            log0(self.env, f"ignoring incomplete checkpoint {stale} (interrupted save)")
        latest = self.ckpt.latest_intact(log=lambda msg: log0(self.env, msg))
        if latest is None:
            damaged = sorted(p.name for p in self.ckpt.folder.glob("step-*.damaged*")) \
                if self.ckpt.folder.is_dir() else []
            if damaged:  # a run that had checkpoints and has none intact: never retrain from 0 on its own
                raise B.StartupError(
                    f"{self.ckpt.folder}: no intact checkpoint left (set aside as damaged: {', '.join(damaged)}); "
                    f"refusing to train this run again from step 0. To start over on purpose, move "
                    f"{self.ckpt.folder} away (or set job.dump_folder to a new folder)")
            return
        step, path = latest
        self._refuse_other_run(path)
        self._note_resume_changes(path)
        extra = self.ckpt.load(path, self.model, self.optimizer)
        self.step = step
        same_layout = bool(extra)
        if not same_layout:
            # counters, schedule, guard and the loader's global position are the same on every
            # rank, so rank 0's copy continues any layout; only the per-rank RNG state is lost
            extra = self.ckpt.rank0_extra(path)
        self.tokens_seen = extra["tokens_seen"]
        self.schedule.load_state_dict(extra["schedule"])
        try:
            self.train_loader.load_state_dict(extra["loader"])
        except DataError as e:
            raise B.StartupError(f"{path}: {e}") from e
        self.guard.load_state_dict(extra.get("guard", {}))
        self._load_extra_state(extra)
        if same_layout:
            torch.set_rng_state(extra["rng_cpu"])
        else:
            log0(self.env, f"{path} was written by another world size: model, optimiser and data position "
                           f"restored (data continues at global sample {extra['loader']['global_samples']})")
        log0(self.env, f"resumed from {path} at step {step} ({self.tokens_seen:,} tokens)")

    def _refuse_other_run(self, path: Path):
        """A resume continues THIS run. A checkpoint trained with another objective, model,
        tokenizer, sequence length, seed or parameter dtype belongs to another run: loading it
        would fail deep inside DCP, or train the wrong thing (another data and noise stream),
        or (a finished run) train nothing and exit 0 as if it had worked."""
        info = checkpoint_info(path)
        cfg = self.cfg
        mine = {"objective.name": ("objective", cfg.objective.name),
                "model": ("model_config", json.loads(json.dumps(self.model_cfg.to_hf_config()))),
                "tokenizer": ("tokenizer", self.tokenizer.identity()),
                **{key: (key, value) for key, value in _resume_invariants(cfg).items()}}
        for key, (meta_key, want) in mine.items():
            have = info.get(meta_key)
            if have is None or have == want:  # None: written before the key was recorded
                continue
            if isinstance(have, dict):  # name the first differing model config field
                field = min(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                key, have, want = f"model config {field}", have.get(field), want.get(field)
            raise B.StartupError(
                f"{self.run_dir}: checkpoint {path.name} was trained with {key}={have!r} but this config "
                f"gives {want!r}; a resume must continue the same run: set job.dump_folder to a new folder "
                f"(or run with the checkpoint's settings)")

    def _note_resume_changes(self, path: Path) -> None:
        """What a resume may change, said in one line each (see ``RESUME_MAY_CHANGE``)."""
        info = checkpoint_info(path)
        for key, value in _resume_changeable(self.cfg).items():
            have = info.get(key)
            if have is not None and have != value:
                log0(self.env, f"resume changes {key}: {have!r} -> {value!r} ({RESUME_MAY_CHANGE[key]})")

    def _extra_state(self) -> dict:
        """What a run type adds to the checkpoint's counters (the same on every rank)."""
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def save_checkpoint(self):
        extra = {
            "tokens_seen": self.tokens_seen,
            "schedule": self.schedule.state_dict(),
            "loader": self.train_loader.state_dict(),
            "guard": self.guard.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            **self._extra_state(),
        }
        try:
            path = self.ckpt.save(self.step, self.model, self.optimizer, extra,
                                  meta={"tokens_seen": self.tokens_seen, "model_config": self.model_cfg.to_hf_config(),
                                        "objective": self.cfg.objective.name, "tokenizer": self.tokenizer.identity(),
                                        "block_size": self.cfg.objective.block_size,
                                        **_resume_invariants(self.cfg), **_resume_changeable(self.cfg)})
        except CheckpointError as e:
            if str(e).startswith("no space left on device"):  # one line (exit 2), not a traceback
                raise B.StartupError(str(e)) from e
            raise
        log0(self.env, f"saved checkpoint {path}")

    # ----------------------------------------------------------------- recipe
    def _update_attention_mode(self, starting: bool = False):
        """Set the attention the recipe's schedule gives at ``tokens_seen``; log a switch when it
        happens in training. At start-up the model is set to where the schedule already is: a
        fresh start says nothing (the start-up line names the recipe), a resume says which mode
        it resumes in and since when, not that it switched now."""
        if self.cfg.objective.block_size:  # block diffusion's block-size warm-up, in token space
            size = B.block_size_for(self.cfg.objective, self.tokens_seen)
            if size != self.objective.block_size:
                if not starting or self.step == 0:
                    log0(self.env, f"block size {self.objective.block_size} -> {size} at step {self.step} "
                                   f"({self.tokens_seen:,} tokens)")
                self.objective.block_size = size
        obj = self.cfg.objective
        mode = B.attention_mode_for(obj, self.tokens_seen)
        if starting and self.step > 0:
            since = (f"since {obj.grafting_tokens:,} tokens" if obj.attention_recipe == "grafting"
                     and mode == "bidirectional" else "since step 0")
            blocks = f", block size {self.objective.block_size}" if obj.block_size else ""
            log0(self.env, f"resumed at step {self.step} with {mode} attention ({obj.attention_recipe} recipe, "
                           f"{since}){blocks}")
        elif getattr(self.model, "attention_mode", None) != mode and (self.step > 0 or obj.attention_recipe == "grafting"):
            log0(self.env, f"attention -> {mode} at step {self.step} ({self.tokens_seen:,} tokens)")
        if getattr(self.model, "attention_mode", None) != mode:
            self.model.set_attention_mode(mode)

    def _autocast(self):
        if self.autocast == "bfloat16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ----------------------------------------------------------------- one step
    def _log_attention_choices(self) -> None:
        """The choices attention ``auto`` made since the last call (a new shape: validation's,
        a new block size's), each once."""
        from rnd1.model.attention import choice_lines

        lines = choice_lines()
        for line in lines[getattr(self, "_attention_lines_logged", 0):]:
            log0(self.env, line)
        self._attention_lines_logged = len(lines)

    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        micro = [MicroBatch(b["input_ids"], b["sample_ids"],
                            b["doc_ids"] if cfg.training.document_masking else None, seed=cfg.training.seed,
                            loss_mask=_loss_mask(b))
                 for b in (next(self.train_loader) for _ in range(self.batch.grad_accum))]
        # The aux loss of one micro-batch is a mean over its tokens. Like the CE term (divided by the
        # global normaliser), it is summed over micro-batches here and over data-parallel ranks by
        # FSDP, so each micro-batch's share is 1 / (grad_accum * dp_size): the term is then the mean
        # over the global batch's micro-batches whatever the split (= local / global tokens, as every
        # micro-batch holds local_batch_size x seq_len tokens), and aux_coef means the same on 1 rank or 64.
        out = run_step(self.model, self.objective, micro, mask_id=self.model_cfg.mask_token_id,
                       samples_per_step=self.batch.global_batch_tokens // self.batch.seq_len,
                       all_reduce=self.parallel.all_reduce_dp, backward=True,
                       aux_coef=B.aux_loss_coef(cfg, self.model_cfg),
                       aux_scale=1.0 / (self.batch.grad_accum * self.parallel.dp_size),
                       loss_scale=self.parallel.dp_loss_scale, autocast=self._autocast,
                       ce_backend=cfg.kernels.cross_entropy, device=self.env.device)
        grad_norm = B.clip_grad_norm(self.model, cfg.training.max_norm)
        lrs = self.schedule.apply(self.optimizer, self.tokens_seen)
        if self.guard.check(out.loss, grad_norm, self.step + 1, self.ckpt.latest):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.batch.global_batch_tokens
        self.throughput.update(self.batch.global_batch_tokens)
        return {"loss": out.loss.item(), "grad_norm": grad_norm.item(), "masked_frac": out.masked_frac,
                **{f"lr/{k}": v for k, v in lrs.items()}, "tokens": self.tokens_seen,
                "skipped_steps": self.guard.skipped}

    # ----------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict:
        """Per-token NELBO on the first ``eval.val_steps`` validation batches, by a fixed
        quadrature over t: every batch at every ``eval.val_t_grid`` point (equal weights), with a
        fixed masking seed per grid point, all weighted CE summed and divided once by the total
        number of scored positions. ``exp`` of it bounds the perplexity ("PPL <="). The AR
        objective reports its exact NLL per token on the same positions. Fixed batches, grid and
        seeds make runs (and branches of a sweep) comparable."""
        cfg = self.cfg
        loader = B.build_loader(cfg, self.datasets, "val", self.batch, self.parallel, seed=cfg.eval.val_seed)
        self.model.eval()
        grid = list(cfg.eval.val_t_grid) if self.objective.masks else [None]
        micro = []
        for _ in range(cfg.eval.val_steps):
            b = next(loader)
            docs = b["doc_ids"] if cfg.training.document_masking else None  # the attention training uses
            micro += [MicroBatch(b["input_ids"], b["sample_ids"], docs, seed=cfg.eval.val_seed + j, fixed_t=t,
                                 loss_mask=_loss_mask(b))
                      for j, t in enumerate(grid)]
        out = run_step(self.model, self.objective, micro, mask_id=self.model_cfg.mask_token_id, samples_per_step=1,
                       all_reduce=self.parallel.all_reduce_dp, backward=False, autocast=self._autocast,
                       ce_backend=cfg.kernels.cross_entropy, device=self.env.device)
        self.model.train()
        nelbo = out.loss.item()
        bound = "val_ppl_bound" if self.objective.masks else "val_ppl"  # exp(NELBO) bounds the PPL
        return {"val_loss": nelbo, bound: math.exp(min(nelbo, 700.0))}

    def score_tasks(self) -> dict:
        """In-training retention check: the configured JSONL tasks (rnd1.eval.tasks). Every rank
        runs the same examples, so sharded forwards stay in step."""
        from rnd1.eval.tasks import score_tasks

        # during a grafting run's causal phase the model is scored the way it then works: as AR
        objective = self.objective if self.model.attention_mode == "bidirectional" else get_objective("ar")
        return score_tasks(self.model, self.tokenizer, self.cfg.eval.tasks, objective=objective,
                           mask_id=self.model_cfg.mask_token_id, seed=self.cfg.eval.val_seed)

    # ----------------------------------------------------------------- loop
    def train(self, preempt: PreemptionHandler | None = None):
        """Train to the end, or until a stop signal (``preempt``, installed by ``main`` before
        start-up so a signal during start-up is not fatal either)."""
        cfg, env = self.cfg, self.env
        total_steps = self.batch.total_steps
        log0(env, f"model {cfg.model.name}: {self.model_cfg.param_counts()['total']:,} params "
                  f"({self.model_cfg.param_counts()['active']:,} active); objective {cfg.objective.name}, "
                  f"recipe {cfg.objective.attention_recipe}; {total_steps} steps x "
                  f"{self.batch.global_batch_tokens:,} tokens (micro-batch {cfg.training.local_batch_size} x "
                  f"{cfg.training.seq_len}, grad accum {self.batch.grad_accum}, dp {self.parallel.dp_size}); "
                  f"peak {self.peak_flops / 1e12:.2f} TFLOP/s per process "
                  f"({'metrics.peak_flops' if cfg.metrics.peak_flops else MATMUL_PEAK_HOW})")
        own_handler = preempt is None  # main's handler stays until the process exits (a failure after
        preempt = preempt or PreemptionHandler(watch_parent=_under_torchrun())  # this one is not fatal)
        t_start = time.perf_counter()
        start_step = self.step
        try:
            if self.step < total_steps and preempt.should_stop(env.device):
                log0(env, f"{preempt.reason} before step {self.step + 1}: nothing new to save "
                          f"(the run resumes from step {self.step}); exiting")
                return
            while self.step < total_steps:
                self._update_attention_mode()
                m = self.train_step()
                last = self.step == total_steps
                if self.step % cfg.metrics.log_freq == 0 or last or self.step == 1:
                    m.update(self.throughput.report())
                    m["memory_gib"] = peak_memory_bytes(env.device) / 2**30
                    m.update(router_balance(self.model.tokens_per_expert()))
                    done = self.step - start_step
                    eta = (time.perf_counter() - t_start) / max(done, 1) * (total_steps - self.step)
                    self.metrics.log(self.step, m, eta_s=eta)
                if cfg.eval.tasks and cfg.eval.task_interval and (self.step % cfg.eval.task_interval == 0 or last):
                    self.metrics.log(self.step, {**self.score_tasks(), "tokens": self.tokens_seen}, prefix="[tasks] ")
                if cfg.eval.interval and (self.step % cfg.eval.interval == 0 or last):
                    self.metrics.log(self.step, {**self.validate(), "tokens": self.tokens_seen}, prefix="[val] ")
                self._log_attention_choices()
                if self.parallel.world_size > 1:
                    reshard_all(self.model)  # after forwards without backward (rnd1/parallel/fsdp.py)
                interval_hit = cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0
                stop = preempt.should_stop(env.device)
                if cfg.checkpoint.enable and (interval_hit or last or stop):
                    self.save_checkpoint()
                if stop:
                    log0(env, f"preempted: checkpoint saved at step {self.step}; exiting")
                    return
        finally:
            if own_handler:
                preempt.restore()
            self.metrics.close()
        if cfg.checkpoint.export_hf_at_end:
            path = B.export_hf(cfg, self.model, self.run_dir, self.model_cfg, self.tokenizer)
            log0(env, f"exported Hugging Face checkpoint to {path}")
        log0(env, f"done: {self.step} steps, {self.tokens_seen:,} tokens in "
                  f"{time.perf_counter() - t_start:.1f}s")


# What a resume must keep: the data order and the masking noise are drawn per sequence of
# training.seq_len from training.seed, so another length or seed silently trains a different
# stream (no longer the run the checkpoint belongs to); parameters and optimiser state are stored
# in model.dtype, so another dtype silently casts them.
def _resume_invariants(cfg) -> dict:
    return {"training.seq_len": cfg.training.seq_len, "training.seed": cfg.training.seed,
            "model.dtype": cfg.model.dtype}


# What a resume may change, and why it is safe (said in one line when it changes).
RESUME_MAY_CHANGE = {
    "training.local_batch_size": "the data continues at the same global sample; the lr schedule is in tokens",
    "training.global_batch_tokens": "the data continues at the same global sample; the lr schedule is in tokens",
}


def _resume_changeable(cfg) -> dict:
    return {"training.local_batch_size": cfg.training.local_batch_size,
            "training.global_batch_tokens": cfg.training.global_batch_tokens}


def _bad_input(message: str) -> int:
    """Exit code 2, after one line that names the culprit. Every rank may meet the same bad input
    (same config, same files) and copies from several ranks interleave, so the first rank of the
    job to report prints (``first_to_report``, through the rendezvous store; local rank 0 when
    there is none) and the others exit with the same code, silently (rnd1.launch relies on it).
    The other ranks are told (``announce_bad_input``): one waiting for this rank in a collective
    then exits 2 quietly when this rank leaves, instead of with the transport's traceback."""
    announce_bad_input()
    if dist.is_available() and dist.is_initialized():
        first = first_to_report()
    else:
        first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first:
        print(message, file=sys.stderr, flush=True)
    return 2


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def main(argv: list[str] | None = None) -> int:
    if _under_torchrun():
        stop_with_parent()  # kill -9 on the launcher: SIGTERM here, a graceful save, not an orphan
    # Stop signals are caught from here on: one during start-up (loading a checkpoint) is not
    # fatal, the run stops before its first step (exit 0).
    preempt = PreemptionHandler(watch_parent=_under_torchrun())
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        env = init_distributed(cfg.training.device, timeout_s=cfg.training.collective_timeout_s)
        validate(cfg, env.world_size)
    except ConfigError as e:
        code = _bad_input(f"config error: {e}")
        destroy()
        return code
    if env.device.type == "cpu" and cfg.training.cpu_keep_freed_memory:
        from rnd1.training.cpu_malloc import keep_freed_memory

        log0(env, "glibc malloc keeps freed memory (training.cpu_keep_freed_memory)" if keep_freed_memory()
             else "training.cpu_keep_freed_memory: glibc mallopt unavailable here; allocator left as is")
    # One trainer per run folder: rank 0 takes the lock before anything is written (the other
    # ranks of this job are covered by it); a live holder elsewhere is refused in one line.
    lock = RunLock(Path(cfg.job.dump_folder)) if env.is_rank0 else None
    try:
        if lock is not None:
            lock.acquire()
        trainer_cls = Trainer
        if cfg.rl.enable:  # an RL run: the same loop, rollouts instead of token windows
            from rnd1.rl.trainer import RLTrainer as trainer_cls
        trainer_cls(cfg, env).train(preempt)
    except (B.StartupError, RunLockError, MetricsWriteError) as e:
        # no barrier: a rank that did not fail may be waiting in a collective (it is told, below)
        code = _bad_input(f"error: {e}")
        destroy()
        return code
    except RuntimeError as e:  # after StartupError, which is a RuntimeError too
        if peer_had_bad_input():  # a peer stopped on bad input and said so: its line is the story
            return 2  # no destroy(): the peer is gone
        msg = collective_timeout_message(e)  # a peer stopped answering or died: name it in one line
        if msg is None:
            raise
        if first_to_report():
            print(f"error: {msg}", file=sys.stderr, flush=True)
        return 3  # no destroy(): it can block after a timeout
    finally:
        if lock is not None:
            lock.release()
    barrier()
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
