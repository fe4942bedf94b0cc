"""Sampling from a masked diffusion LM (and greedy decoding for AR checkpoints).

Generation starts from the prompt followed by ``gen_length`` mask tokens and, over ``steps``
forward passes, commits predictions into masked positions until none is left:

- semi-autoregressive blocks: the masked region is filled block by block (``block_length``),
  ``steps`` split evenly over the blocks;
- which positions to commit at a step: the highest ``confidence`` (probability of the sampled
  token), ``margin`` (top-1 minus top-2 probability), lowest ``entropy``, or ``random``;
- how many: a fixed number per step (the block's masked positions spread evenly over its
  steps), or with ``threshold`` every position whose confidence exceeds it (at least one:
  parallel decoding); either way a block's last step commits everything still masked, so the
  output never holds the mask id;
- ``strategy="rnd1"``: RND1's released rule (``rnd1_keep_masked``), a linear schedule of how
  many positions stay masked, keeping the highest-entropy predictions masked, applied per block
  with that block's steps;
- infilling: a ``suffix`` after the masked region is kept fixed;
- temperature / top-k / top-p sampling (temperature 0 is greedy), stop at EOS, batched prompts of
  different lengths, a ``torch.Generator`` for reproducibility.

A2D models are read through their shift: the prediction for position j comes from the output at
j-1 (the AR head's next-token meaning). Ragged batches are left-padded; padding positions form a
separate "document" (``doc_ids``) so no real token attends to them, and positions restart at 0
after the padding, so a row computes exactly what it would alone.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field

import torch

from rnd1.diffusion.objective import Objective, get_objective

STRATEGIES = ("confidence", "margin", "entropy", "random", "rnd1")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per row (the masked region, EOS-truncated)
    sequences: torch.Tensor  # [B, L] full padded sequences (prompt + generated + suffix)
    nfe: int  # forward passes
    seconds: float
    commit_order: list[list[int]] = field(default_factory=list)  # per row: region offsets in commit order

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.tokens) / max(self.seconds, 1e-9)


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (round-half-even), returned as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def rnd1_keep_masked(n: int, steps: int, commit: int) -> int:
    """How many of ``n`` masked positions RND1's sampler leaves masked after its ``commit``-th
    commit (1-based) of ``steps``; 0 after the last one.

    RND1 (rnd/sampling.py) keeps ``(total_masked * (step / steps)).long()`` positions masked
    at loop index ``step = steps - commit``, where ``total_masked`` is an int64 tensor: torch
    computes that product in float32 (the Python-double ratio rounded to float32, times n, the
    product rounded to float32) and ``.long()`` truncates. This reproduces it without torch: two
    float32 values multiply exactly in a double (24 + 24 significant bits <= 53), so one more
    rounding gives float32's product. It is *not* ``n * step // steps``: for n, steps <= 64
    the two disagree at 57 (n, steps, commit) triples (n = steps = 22, step 13: RND1 keeps 12,
    exact arithmetic 13), and for n = steps in {41, 47, 55, 61} the second-to-last commit keeps
    none, so RND1 stops one forward pass early. Matching the released sampler exactly is the
    point of the ``rnd1`` strategy, hence float32.
    """
    if not 1 <= commit <= steps:
        raise ValueError(f"commit must be in [1, {steps}], got {commit}")
    step = steps - commit
    if step == 0:
        return 0  # RND1 commits whatever is left after its loop
    return max(0, math.trunc(_float32(_float32(float(n)) * _float32(step / steps))))


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def _allowed(logits: torch.Tensor, mask_id: int | None, vocab_limit: int | None) -> torch.Tensor:
    """Never sample the mask token, nor ids past the tokenizer's vocabulary (Qwen3's embedding
    is padded to 151,936 rows; the tokenizer stops at 151,670)."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_limit:] = float("-inf")
    if mask_id is not None and mask_id < logits.shape[-1]:
        logits = logits.clone() if vocab_limit is None else logits
        logits[..., mask_id] = float("-inf")
    return logits


def _layout(prompts, suffixes, gen_length, mask_id, pad_id):
    """Left-padded [B, L] ids, the doc ids isolating padding, positions, and the region start."""
    suffixes = suffixes or [[] for _ in prompts]
    lens = [len(p) + gen_length + len(s) for p, s in zip(prompts, suffixes)]
    L = max(lens)
    B = len(prompts)
    x = torch.full((B, L), pad_id, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    region_start = []
    for b, (p, s) in enumerate(zip(prompts, suffixes)):
        off = L - lens[b]
        row = list(p) + [mask_id] * gen_length + list(s)
        x[b, off:] = torch.tensor(row, dtype=torch.long)
        real[b, off:] = True
        region_start.append(off + len(p))
    doc_ids = real.to(torch.int32)  # padding = document 0, the row = document 1
    positions = (real.long().cumsum(1) - 1).clamp_min(0)
    return x, doc_ids, positions, region_start


@torch.no_grad()
def diffusion_generate(model, prompts: list[list[int]], *, gen_length: int, steps: int, mask_id: int,
                       objective: "str | Objective" = "a2d", block_length: int | None = None, strategy: str = "confidence",
                       threshold: float | None = None, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, eos_id: int | None = None, suffixes: list[list[int]] | None = None,
                       generator: torch.Generator | None = None, pad_id: int | None = None,
                       vocab_limit: int | None = None) -> GenerationOutput:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} unknown; expected one of {STRATEGIES}")
    objective = get_objective(objective)
    if not objective.masks:
        raise ValueError(f"objective {objective.name!r} does not mask: diffusion sampling needs a diffusion "
                         f"objective (a2d, mdlm)")
    if objective.shift and any(len(p) == 0 for p in prompts):
        raise ValueError(f"{objective.name} sampling needs a non-empty prompt (position 0 has no prediction)")
    block_length = block_length or gen_length
    n_blocks = math.ceil(gen_length / block_length)
    if steps < n_blocks:
        raise ValueError(f"steps ({steps}) must be >= the number of blocks ({n_blocks})")
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    pad_id = eos_id if pad_id is None and eos_id is not None else (pad_id or 0)
    x, doc_ids, positions, starts = _layout(prompts, suffixes, gen_length, mask_id, pad_id)
    x, doc_ids, positions = x.to(device), doc_ids.to(device), positions.to(device)
    B, L = x.shape
    offsets = torch.arange(gen_length, device=device)
    region = torch.tensor(starts, device=device)[:, None] + offsets  # [B, G] absolute positions
    rows = torch.arange(B, device=device)[:, None]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    order: list[list[int]] = [[] for _ in range(B)]
    nfe, t0 = 0, time.perf_counter()
    steps_left = steps
    for blk in range(n_blocks):
        lo, hi = blk * block_length, min((blk + 1) * block_length, gen_length)
        blk_steps = steps_left // (n_blocks - blk)
        steps_left -= blk_steps
        n_block = hi - lo
        for s in range(blk_steps):
            pos = region[:, lo:hi]
            still = (x[rows, pos] == mask_id) & ~done[:, None]
            if not still.any():
                break
            logits = model(x, doc_ids=doc_ids, positions=positions)
            nfe += 1
            read = objective.output_index(pos)  # the output that predicts each position (the shift)
            lg = _allowed(logits[rows, read].float(), mask_id, vocab_limit)
            lg = _filter_logits(lg, temperature, top_k, top_p)  # [B, n, V]
            probs = torch.softmax(lg, dim=-1)
            if temperature > 0:
                flat = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator)
                pred = flat.view(B, -1)
            else:
                pred = probs.argmax(-1)
            conf = probs.gather(-1, pred[..., None]).squeeze(-1)
            if strategy in ("confidence",):
                score = conf
            elif strategy == "margin":
                top2 = torch.topk(probs, 2, dim=-1).values
                score = top2[..., 0] - top2[..., 1]
            elif strategy in ("entropy", "rnd1"):
                score = (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # -entropy
            else:
                score = torch.rand(conf.shape, generator=generator).to(device)
            score = score.masked_fill(~still, float("-inf"))
            n_still = still.sum(1)
            if s == blk_steps - 1:
                pick = still  # the block's last step: commit the rest, whatever the rule (no mask id left)
            elif threshold is not None:
                pick = (conf > threshold) & still
                best = score.argmax(1)
                pick[torch.arange(B), best] |= n_still > 0  # at least one per step
            else:
                if strategy == "rnd1":  # RND1's linear schedule of positions that stay masked
                    keep = rnd1_keep_masked(n_block, blk_steps, s + 1)
                    k = (n_still - keep).clamp_min(0)
                else:
                    k = torch.ceil(n_still.float() / (blk_steps - s)).long()
                ranked = torch.argsort(score, dim=1, descending=True)
                rank_of = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(ranked.shape[1], device=device)
                                                           .expand_as(ranked))
                pick = (rank_of < k[:, None]) & still
            for b in range(B):
                for j in torch.nonzero(pick[b]).flatten().tolist():
                    order[b].append(lo + j)
            x[rows, pos] = torch.where(pick, pred, x[rows, pos])
            if eos_id is not None:
                _stop_at_eos(x, region, mask_id, eos_id, done)
    seconds = time.perf_counter() - t0
    tokens = []
    for b in range(B):
        gen = x[b, region[b]].tolist()
        if eos_id is not None and eos_id in gen:
            gen = gen[:gen.index(eos_id) + 1]
        tokens.append(gen)
    return GenerationOutput(tokens, x.cpu(), nfe, seconds, order)


def _stop_at_eos(x, region, mask_id, eos_id, done):
    """A row whose generated region contains EOS with no mask before it is finished: every later
    position becomes EOS and the row takes no more commits."""
    vals = x.gather(1, region)
    for b in range(x.shape[0]):
        if done[b]:
            continue
        row = vals[b].tolist()
        if eos_id in row:
            first = row.index(eos_id)
            if mask_id not in row[:first]:
                x[b, region[b, first:]] = eos_id
                done[b] = True


@torch.no_grad()
def ar_generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None = None,
                pad_id: int = 0, vocab_limit: int | None = None) -> GenerationOutput:
    """Greedy decoding for AR (causal) checkpoints, a full forward per token (no KV cache): for
    comparison, not speed."""
    device = next(model.parameters()).device
    seqs = [list(p) for p in prompts]
    done = [False] * len(prompts)
    t0, nfe = time.perf_counter(), 0
    for _ in range(max_new_tokens):
        x, doc_ids, positions, _ = _layout(seqs, None, 0, 0, pad_id)
        logits = model(x.to(device), doc_ids=doc_ids.to(device), positions=positions.to(device))
        nfe += 1
        nxt = _allowed(logits[:, -1].float(), None, vocab_limit).argmax(-1).tolist()
        for b, t in enumerate(nxt):
            if not done[b]:
                seqs[b].append(t)
                done[b] = eos_id is not None and t == eos_id
        if all(done):
            break
    tokens = [s[len(p):] for s, p in zip(seqs, prompts)]
    return GenerationOutput(tokens, torch.tensor([]), nfe, time.perf_counter() - t0)
