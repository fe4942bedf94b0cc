"""Rollouts: which prompts a step trains on, G completions of each from the current policy, and
their rewards.

Everything random is keyed, not drawn from a running stream, so a resumed run repeats exactly
what the uninterrupted run would have done (as the training noise is keyed by sample index):

- the prompts of step s: epochs of seeded permutations of the task file, ``prompts_per_step`` a
  step, each data-parallel rank taking a contiguous share (``PromptStream``);
- the sampling of rollout k (its global index: step, prompt, member of the group): a generator of
  its own, seeded from (training.seed, step, k), which the sampler draws from only while that
  row is still decoding (``rnd1.generate``'s per-row generators);
- d1's random prompt mask of the policy-loss forward: likewise per (step, inner step, k).

A sharded policy (FSDP, expert parallelism) makes every forward a collective, so the ranks
sample in lockstep: at each step of a block they agree whether any rank still has masked
positions (``any_rank``) and all run that forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rnd1.rl import verifiers

_ROLLOUT, _PROMPT_MASK, _ORDER = 1, 2, 3  # what a keyed generator is for


def keyed_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``seed`` and integer ``keys`` (a fixed mix, the same on every
    machine and rank), e.g. (purpose, step, global rollout index)."""
    h = (seed * 0x9E3779B1 + 0x632BE5AB) % (2**63 - 1)
    for k in keys:
        h = (h * 0x85EBCA77 + k * 0xC2B2AE3D + 0x27D4EB2F) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(h)


class PromptStream:
    """The prompts of each step: epoch e is a permutation of the task's rows seeded by (seed, e);
    step s (1-based) takes positions [(s - 1) P, s P) of the concatenated epochs, and data-parallel
    rank r the r-th contiguous P / dp of them. A function of the step, so a resume needs only the
    step; ``state_dict`` keeps the trainer's checkpoint layout (``global_samples``)."""

    def __init__(self, n_rows: int, per_step: int, *, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if per_step % dp_size:
            raise ValueError(f"{per_step} prompts per step do not split over {dp_size} data-parallel ranks")
        self.n, self.per_step, self.seed = n_rows, per_step, seed
        self.local = per_step // dp_size
        self.offset = dp_rank * self.local
        self.global_samples = 0
        self._perms: dict[int, list[int]] = {}

    def _row(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=keyed_generator(self.seed, _ORDER, epoch)).tolist()}
        return self._perms[epoch][i]

    def first_position(self, step: int) -> int:
        """Global index of this rank's first prompt of ``step`` (its rollouts are G times that on)."""
        return (step - 1) * self.per_step + self.offset

    def rows(self, step: int) -> list[int]:
        """Task-file row indices of this rank's prompts at ``step``."""
        start = self.first_position(step)
        return [self._row(start + i) for i in range(self.local)]

    def state_dict(self) -> dict:
        return {"global_samples": self.global_samples}

    def load_state_dict(self, state: dict) -> None:
        self.global_samples = int(state["global_samples"])


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (an all-reduce of one int; ``flag`` alone in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@dataclass
class Rollouts:
    """One rank's rollouts of one step: ``P`` prompts x ``G`` completions, row p * G + g."""

    sequences: torch.Tensor  # [P G, L] left-padded prompt + generated region
    doc_ids: torch.Tensor  # [P G, L] 0 on padding, 1 on the row (padding is attended by nothing)
    positions: torch.Tensor  # [P G, L] positions restarting at 0 after the padding
    prompt: torch.Tensor  # [P G, L] bool: prompt tokens
    region: torch.Tensor  # [P G, L] bool: the generated region (gen_length positions)
    completion: torch.Tensor  # [P G, L] bool: the generated tokens up to and including the first EOS
    rewards: torch.Tensor  # [P, G] float32
    replies: list[str]
    errors: list[str]  # verifier errors (each scored 0)
    tokens: int  # generated tokens, EOS-truncated
    seconds: float  # sampling time (scoring excluded)
    nfe: int


def prompt_ids(rows: list[dict], tokenizer) -> list[list[int]]:
    """Each prompt as a user turn of the chat template, as the SFT model was trained and is
    evaluated (``scripts/eval_task.py``)."""
    from rnd1.data.chat import encode_chat_prompt

    return [encode_chat_prompt([{"role": "user", "content": r["prompt"]}], tokenizer) for r in rows]


def sample_rollouts(model, rows: list[dict], tokenizer, *, group_size: int, gen_length: int, sampler: dict,
                    mask_id: int, objective, seed: int, step: int, first_rollout: int, device: torch.device,
                    lockstep: bool) -> Rollouts:
    """G completions of each of ``rows`` with ``rnd1.generate.diffusion_generate`` (``sampler``:
    its keyword settings), rollout k seeded by (seed, step, first_rollout + k), then scored by
    each row's verifier (``verifiers.reward``: an error scores 0 and is returned, never raised)."""
    from rnd1.generate import _layout, diffusion_generate

    prompts = [p for p in prompt_ids(rows, tokenizer) for _ in range(group_size)]
    gens = [keyed_generator(seed, _ROLLOUT, step, first_rollout + k, device=device) for k in range(len(prompts))]
    out = diffusion_generate(model, prompts, gen_length=gen_length, mask_id=mask_id, objective=objective,
                             eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size, generator=gens,
                             sync=(lambda flag: any_rank(flag, device)) if lockstep else None, **sampler)
    seq = out.sequences
    _, doc_ids, positions, starts = _layout(prompts, None, gen_length, mask_id, tokenizer.eos_id)
    B, L = seq.shape
    cols = torch.arange(L)[None, :]
    start = torch.tensor(starts)[:, None]
    region = (cols >= start) & (cols < start + gen_length)
    lengths = torch.tensor([len(t) for t in out.tokens])[:, None]
    completion = (cols >= start) & (cols < start + lengths)
    prompt = doc_ids.bool() & (cols < start)
    replies, values, errors = [], [], []
    for k, toks in enumerate(out.tokens):
        text = tokenizer.decode([t for t in toks if t != tokenizer.eos_id])
        r = verifiers.reward(text, rows[k // group_size])
        replies.append(text)
        values.append(r.value)
        if r.error:
            errors.append(r.error)
    rewards = torch.tensor(values, dtype=torch.float32).view(len(rows), group_size)
    return Rollouts(seq, doc_ids, positions, prompt, region, completion, rewards, replies, errors,
                    sum(len(t) for t in out.tokens), out.seconds, out.nfe)
