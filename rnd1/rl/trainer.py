"""The RL run: ``rnd1.train``'s loop with rollouts in place of token windows (``[rl] enable``).

One step, as data::

    the step's prompts (PromptStream, keyed by step)          P / dp per rank
      -> G completions each, from the current policy          rnd1.generate: cached, parallel decoding
      -> rewards (each row's verifier)                        rnd1.rl.verifiers, an error scores 0
      -> group-relative advantages                            diffu_grpo.group_advantages
      -> mu = rl.inner_steps optimiser steps, each on a new   diffu_grpo.masked_view / policy_loss
         random prompt mask (d1)

Everything else is the trainer's: the model is built, sharded (FSDP2, EP), compiled and
checkpointed as for pre-training, the learning rates follow the token-space schedule (an RL step
counts ``prompts_per_step x group_size x gen_length`` tokens, the completion slots it trains), a
stop signal saves, and a resume continues bit-exactly because every random draw is keyed by step
and rollout (``rnd1/rl/rollout.py``). Rollouts and validation run the blocks eagerly
(``torch.compiler.set_stance("force_eager")``): the sampler's window shapes change every step, so
compiling them would recompile, not speed up.

Per step it logs the reward's mean and standard deviation, the accuracy (share of rollouts with
reward 1), the share of groups whose rewards are all equal (zero advantage: no signal), the mean
completion length, the rollouts' tokens per second and their share of the step's time, the
verifier errors so far (kept in checkpoints), the clipped share of completion tokens and the
mean KL per token (over every rank, micro-batch and inner step); loss and gradient norm are means
over the inner steps.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from rnd1.rl import diffu_grpo
from rnd1.rl.rollout import _PROMPT_MASK, PromptStream, any_rank, keyed_generator, prompt_ids, sample_rollouts
from rnd1.rl.tasks import TaskSetError, load_prompts
from rnd1.train import Trainer, log0
from rnd1.training import build as B


@contextmanager
def _eager():
    """Compiled blocks run eagerly inside (the sampler's shapes change at every step)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # pragma: no cover - older torch: compiled as configured
        yield
        return
    with set_stance("force_eager"):
        yield


class _RolloutSlots:
    """The trainer's throughput meter, reporting tokens/s and step time only: an RL step's
    tokens are the completion slots it trains (``prompts_per_step x G x gen_length``), and its
    FLOPs (sampling, mu policy passes over prompt + completion, the old / reference forwards) are
    not ``flops_per_token`` times them, so no TFLOP/s or MFU is claimed."""

    def __init__(self, meter):
        self.meter = meter

    def update(self, tokens: int) -> None:
        self.meter.update(tokens)

    def report(self) -> dict:
        out = self.meter.report()
        return {k: out[k] for k in ("tokens_per_s", "step_time_s") if k in out}


class RLTrainer(Trainer):
    """diffu-GRPO (``rnd1/rl/diffu_grpo.py``) on prompts with verifiable rewards."""

    # ----------------------------------------------------------------- data: prompts, not windows
    def _build_data(self) -> B.BatchPlan:
        r = self.cfg.rl
        try:
            self.prompts = load_prompts(r.tasks)
            self.eval_prompts = load_prompts(r.eval_tasks) if r.eval_tasks else []
        except TaskSetError as e:
            raise B.StartupError(str(e)) from e
        if r.eval_limit:
            self.eval_prompts = self.eval_prompts[:r.eval_limit]
        room = self.cfg.training.seq_len - r.gen_length
        for path, rows in ((r.tasks, self.prompts), (r.eval_tasks, self.eval_prompts)):
            for line, ids in enumerate(prompt_ids(rows, self.tokenizer), 1):
                if len(ids) > room:
                    raise B.StartupError(f"{path}:{line}: the prompt is {len(ids)} tokens in the chat template; "
                                         f"training.seq_len {self.cfg.training.seq_len} - rl.gen_length "
                                         f"{r.gen_length} leaves {room}")
        self.datasets = []
        tokens = r.prompts_per_step * r.group_size * r.gen_length  # the completion slots a step trains
        steps = self.cfg.training.steps
        return B.BatchPlan(self.cfg.training.local_batch_size, self.cfg.training.seq_len, 1, tokens, steps,
                           steps * tokens)

    def _build_train_loader(self) -> PromptStream:
        return PromptStream(len(self.prompts), self.cfg.rl.prompts_per_step, seed=self.cfg.training.seed,
                            dp_rank=self.parallel.dp_rank, dp_size=self.parallel.dp_size)

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        r = cfg.rl
        self.sampler = {"steps": r.sampler_steps or r.gen_length, "block_length": min(r.block_length, r.gen_length),
                        "kv_cache": r.kv_cache, "suffix_window": r.suffix_window,
                        "threshold": r.threshold if r.decoding == "threshold" else None,
                        "factor": r.factor if r.decoding == "factor" else None}
        self.verifier_errors = getattr(self, "verifier_errors", 0)  # a resume has set it already
        self.throughput = _RolloutSlots(self.throughput)
        self.reference = None
        if r.kl_beta > 0:  # the frozen initial policy: the same build and initial weights
            self.reference = B.build_and_load_model(cfg, self.model_cfg, self.parallel, env, tokenizer=self.tokenizer)
            self.reference.set_attention_mode(self.objective.attention)
            self.reference.requires_grad_(False).eval()
        log0(env, f"rl: diffu-GRPO, {len(self.prompts):,} prompts ({r.tasks}); {r.prompts_per_step} prompts x "
                  f"G {r.group_size} per step, gen length {r.gen_length}, {r.kv_cache} cache, {r.decoding} decoding, "
                  f"temperature {r.temperature}; p_mask {r.p_mask}, mu {r.inner_steps}, clip {r.clip_eps}, "
                  f"KL beta {r.kl_beta}")

    def _extra_state(self) -> dict:
        return {"verifier_errors": self.verifier_errors}

    def _load_extra_state(self, extra: dict) -> None:
        self.verifier_errors = int(extra.get("verifier_errors", 0))

    @property
    def _lockstep(self) -> bool:
        return self.parallel.world_size > 1

    def _sync_done(self) -> None:
        if self.parallel.world_size > 1:
            from rnd1.parallel.fsdp import reshard_all

            reshard_all(self.model)
            if self.reference is not None:
                reshard_all(self.reference)

    # ----------------------------------------------------------------- one step
    def _rollouts(self, step: int):
        cfg, r = self.cfg, self.cfg.rl
        rows = [self.prompts[i] for i in self.train_loader.rows(step)]
        self.model.eval()
        with torch.no_grad(), _eager(), self._autocast():
            out = sample_rollouts(self.model, rows, self.tokenizer, group_size=r.group_size, gen_length=r.gen_length,
                                  sampler={**self.sampler, "temperature": r.temperature},
                                  mask_id=self.model_cfg.mask_token_id, objective=self.objective,
                                  seed=cfg.training.seed, step=step,
                                  first_rollout=self.train_loader.first_position(step) * r.group_size,
                                  device=self.env.device, lockstep=self._lockstep)
        self._sync_done()
        self.model.train()
        return out

    def _logprobs(self, model, view, ro, rows: slice) -> torch.Tensor:
        dev = self.env.device
        with self._autocast():
            return diffu_grpo.completion_logprobs(model, self.objective, view[rows].to(dev),
                                                  ro.sequences[rows].to(dev), ro.completion[rows].to(dev),
                                                  doc_ids=ro.doc_ids[rows].to(dev),
                                                  positions=ro.positions[rows].to(dev))

    def train_step(self) -> dict:
        cfg, r = self.cfg, self.cfg.rl
        step = self.step + 1
        t0 = time.perf_counter()
        ro = self._rollouts(step)
        t_rollout = time.perf_counter() - t0

        adv = diffu_grpo.group_advantages(ro.rewards, scale=r.scale_advantages).flatten()
        B_local = ro.sequences.shape[0]
        B_global = B_local * self.parallel.dp_size
        first = self.train_loader.first_position(step) * r.group_size
        views = [diffu_grpo.masked_view(ro.sequences, ro.prompt, ro.region, self.model_cfg.mask_token_id, r.p_mask,
                                        [keyed_generator(cfg.training.seed, _PROMPT_MASK, step, k, first + b)
                                         for b in range(B_local)], self.objective)
                 for k in range(r.inner_steps)]
        chunk = max(1, min(cfg.training.local_batch_size, B_local))
        parts = [slice(i, min(i + chunk, B_local)) for i in range(0, B_local, chunk)]
        # pi_old (the policy that sampled) and pi_ref, under each inner step's mask, before any update
        old, ref = [], []
        with torch.no_grad():
            for view in views:
                old.append([self._logprobs(self.model, view, ro, p) for p in parts] if r.inner_steps > 1 else None)
                ref.append([self._logprobs(self.reference, view, ro, p) for p in parts]
                           if self.reference is not None else None)
        self._sync_done()

        lrs = self.schedule.apply(self.optimizer, self.tokens_seen)
        losses, norms = [], []
        dev = self.env.device
        # clipped tokens, KL sum and completion tokens over every inner step, micro-batch and rank
        token_stats = torch.zeros(3, dtype=torch.float64)
        for k, view in enumerate(views):
            loss_sum = torch.zeros((), device=dev)
            for j, p in enumerate(parts):
                logp = self._logprobs(self.model, view, ro, p)
                old_logp = old[k][j] if old[k] is not None else logp.detach()
                loss, stats = diffu_grpo.policy_loss(logp, old_logp, adv[p].to(dev), ro.completion[p].to(dev),
                                                     clip_eps=r.clip_eps, beta=r.kl_beta,
                                                     ref_logp=ref[k][j] if ref[k] is not None else None)
                share = (p.stop - p.start) / B_global  # policy_loss averages its rows; the step averages all
                (loss * share * self.parallel.dp_loss_scale).backward()
                loss_sum += loss.detach() * share
                n_tok = float(ro.completion[p].sum())
                token_stats += torch.tensor([stats.clipped_fraction * n_tok, stats.kl * n_tok, n_tok],
                                            dtype=torch.float64)
            grad_norm = B.clip_grad_norm(self.model, cfg.training.max_norm)
            total = self.parallel.all_reduce_dp(loss_sum)
            if self.guard.check(total, grad_norm, step, self.ckpt.latest):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(total.item())
            norms.append(grad_norm.item())
        self.step = step
        self.tokens_seen += self.batch.global_batch_tokens
        self.throughput.update(self.batch.global_batch_tokens)
        self.train_loader.global_samples = step * r.prompts_per_step
        t_step = time.perf_counter() - t0
        clipped, kl, n_tok = self.parallel.all_reduce_dp(token_stats.to(dev)).cpu().tolist()
        # loss and gradient norm: means over the mu inner steps (each one optimiser step)
        return {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
                **{f"lr/{k}": v for k, v in lrs.items()}, "tokens": self.tokens_seen,
                "skipped_steps": self.guard.skipped, **self._rollout_metrics(ro, t_rollout, t_step),
                "clipped_frac": clipped / max(n_tok, 1), "kl": kl / max(n_tok, 1)}

    def _rollout_metrics(self, ro, t_rollout: float, t_step: float) -> dict:
        """Reward statistics over every rank's rollouts (sums all-reduced), and timings of this rank."""
        rw = ro.rewards.flatten().double()
        equal = diffu_grpo.zero_advantage_groups(ro.rewards).double()
        lengths = ro.completion.sum(1).double()
        stats = torch.tensor([rw.numel(), rw.sum(), (rw * rw).sum(), (rw == 1).sum(), equal.numel(), equal.sum(),
                              lengths.sum(), len(ro.errors), ro.tokens, ro.seconds], dtype=torch.float64)
        stats = self.parallel.all_reduce_dp(stats.to(self.env.device)).cpu().tolist()
        n, s, s2, ones, groups, zero, length, errors, tokens, seconds = stats
        if errors and self.verifier_errors == 0:  # the first time any rank's verifier raised
            first = ro.errors[0] if ro.errors else "on another rank"
            log0(self.env, f"rl: a verifier raised; the rollout scores 0 and is counted in verifier_errors "
                           f"(first: {first})")
        self.verifier_errors += int(errors)
        mean = s / n
        return {"reward_mean": mean, "reward_std": math.sqrt(max(s2 / n - mean * mean, 0.0)), "accuracy": ones / n,
                "zero_adv_frac": zero / groups, "completion_len": length / n, "verifier_errors": self.verifier_errors,
                "rollout_tokens_per_s": tokens / max(seconds, 1e-9) * self.parallel.dp_size,
                "rollout_share": t_rollout / max(t_step, 1e-9)}

    # ----------------------------------------------------------------- validation: held-out accuracy
    @torch.no_grad()
    def validate(self) -> dict:
        """Greedy accuracy on ``rl.eval_tasks`` with the rollout sampler's settings, each rank a
        share of the prompts (padded to equal shares, the padding not counted)."""
        if not self.eval_prompts:
            return {}
        from rnd1.generate import diffusion_generate
        from rnd1.rl import verifiers

        r, dp, rank = self.cfg.rl, self.parallel.dp_size, self.parallel.dp_rank
        n = len(self.eval_prompts)
        per_rank = -(-n // dp)
        mine = [i for i in range(rank * per_rank, (rank + 1) * per_rank)]
        batch = max(1, self.cfg.training.local_batch_size)
        correct = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        with _eager(), self._autocast():
            for i in range(0, per_rank, batch):
                idx = mine[i:i + batch]
                rows = [self.eval_prompts[j % n] for j in idx]
                out = diffusion_generate(self.model, prompt_ids(rows, self.tokenizer), gen_length=r.gen_length,
                                         mask_id=self.model_cfg.mask_token_id, objective=self.objective,
                                         eos_id=self.tokenizer.eos_id, vocab_limit=self.tokenizer.vocab_size,
                                         temperature=0.0, **self.sampler,
                                         sync=(lambda f: any_rank(f, self.env.device)) if self._lockstep else None)
                for j, row, toks in zip(idx, rows, out.tokens):
                    if j < n:
                        text = self.tokenizer.decode([t for t in toks if t != self.tokenizer.eos_id])
                        correct[0] += verifiers.reward(text, row).value == 1.0
                        correct[1] += 1
        self._sync_done()
        self.model.train()
        hit, total = self.parallel.all_reduce_dp(correct.to(self.env.device)).cpu().tolist()
        p = hit / max(total, 1)
        return {"val_accuracy": p, "val_accuracy_stderr": math.sqrt(p * (1 - p) / max(total, 1)), "val_n": int(total)}
