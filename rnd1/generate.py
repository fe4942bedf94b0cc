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
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from rnd1.diffusion.objective import Objective, get_objective
from rnd1.model.attention_masks import Explicit

STRATEGIES = ("confidence", "margin", "entropy", "random", "rnd1")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per row (the masked region, EOS-truncated)
    sequences: torch.Tensor  # [B, L] full padded sequences (prompt + generated + suffix)
    nfe: int  # forward passes
    seconds: float
    commit_order: list[list[int]] = field(default_factory=list)  # per row: region offsets in commit order
    row_forwards: list[int] = field(default_factory=list)  # per row: forwards while the row was still decoding
    cache_nfe: int = 0  # of nfe, forwards that only write a block-diffusion KV cache (prompt prefill, finished blocks)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.tokens) / max(self.seconds, 1e-9)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens (EOS-truncated) per forward a row took part in, over the batch: how many
        tokens one forward decodes (LLaDA 2.0's "tokens per forward pass"); ``nfe`` per row when the
        sampler did not count per row."""
        forwards = sum(self.row_forwards) if self.row_forwards else self.nfe * len(self.tokens)
        return sum(len(t) for t in self.tokens) / max(forwards, 1)


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


CACHE_MODES = ("none", "prefix", "dual")
# What scripts/generate.py and the lm-eval adapter sample with unless told otherwise, measured by
# scripts/bench_sampler.py against today's sampler (one token per forward, no cache) on the task
# model (docs/sampling.md, 500 questions each, 2026-12-07): dual cache + the confidence threshold
# 0.9 + blocks of 32 + DPad's suffix window of 32: 14.3x / 37.7x / 247x at gen lengths 64 / 256 /
# 1,024, accuracy +1.4 / +4.4 / +18.0 points (without the window the dual cache lost 4.0 points
# at 1,024: the long masked suffix costs this model accuracy). The factor rule with the same
# cache and window was 6-9% faster there and lost nothing either, but on the previous task model
# (no window measured) it lost 4.2-5.8 points with the dual cache where the threshold rule lost at
# most 2.6: the default keeps the rule that lost less on both. A block-diffusion model keeps its exact cache of committed blocks and its own
# block size, and no window. diffusion_generate's own defaults stay the exact ones.
FAST_DEFAULTS = {"kv_cache": "dual", "threshold": 0.9, "factor": None, "block_length": 32, "suffix_window": 32}


def parallel_rule(threshold: float | None = None, factor: float | None = None, *,
                  parallel: bool = True) -> tuple[float | None, float | None]:
    """(threshold, factor) for the scripts: the rule given (one of them), else FAST_DEFAULTS'
    rule; ``parallel=False`` is the fixed schedule (gen length / steps per forward)."""
    if threshold is not None and factor is not None:
        raise ValueError(f"give a threshold ({threshold}) or a factor ({factor}), not both")
    if not parallel:
        if threshold is not None or factor is not None:
            raise ValueError("a fixed schedule (no parallel decoding) takes no threshold or factor")
        return None, None
    if threshold is None and factor is None:
        return FAST_DEFAULTS["threshold"], FAST_DEFAULTS["factor"]
    return threshold, factor


def fast_kv_cache(objective: "str | Objective") -> str:
    """The default cache of the scripts: dual for A2D / MDLM, the exact one for block diffusion."""
    return "prefix" if getattr(get_objective(objective), "block_size", None) is not None else FAST_DEFAULTS["kv_cache"]


@torch.no_grad()
def diffusion_generate(model, prompts: list[list[int]], *, gen_length: int, steps: int, mask_id: int,
                       objective: "str | Objective" = "a2d", block_length: int | None = None, strategy: str = "confidence",
                       threshold: float | None = None, factor: float | None = None, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
                       suffixes: list[list[int]] | None = None, generator: torch.Generator | None = None,
                       pad_id: int | None = None, vocab_limit: int | None = None,
                       kv_cache: "bool | str | None" = None, cache_refresh: int = 0, suffix_window: int = 0,
                       sync=None) -> GenerationOutput:
    """Sample ``gen_length`` tokens after each prompt (see the module docstring).

    ``kv_cache``: ``"none"``, ``"prefix"`` or ``"dual"`` (``True`` is ``"prefix"``, ``False`` is
    ``"none"``; ``None``, the default, is each objective's exact setting).

    - A block-diffusion objective (``block_a2d`` / ``block_mdlm``, one with a ``block_size``)
      decodes block by block under block-causal attention (``_block_generate``); ``block_length``
      must be None or its block size. Its cache of committed blocks is exact (same tokens at
      temperature 0 as ``"none"``) and the default; ``"dual"`` has no meaning there.
    - A2D / MDLM (full attention) decode semi-autoregressively over the whole sequence
      (``_semi_ar_generate``); ``"prefix"`` / ``"dual"`` are Fast-dLLM's approximate caches
      (``rnd1.model.kv_cache.SequenceKVCache``), refreshed when a block starts and every
      ``cache_refresh`` steps within it (0: only at block starts; 1: every step, which gives
      exactly the uncached tokens). The default there is ``"none"``.

    ``threshold`` and ``factor`` are the parallel decoding rules (``_choose``); with either,
    ``steps`` bounds the forwards per block rather than fixing them.

    ``suffix_window`` (A2D / MDLM, > 0): DPad's sliding window (Chen et al. 2025, "DPad: Efficient
    Diffusion Language Models with Suffix Dropout", arXiv:2508.14148, section 4.1): while a block
    decodes, the model sees the prompt, the blocks before it, the block, and only the next
    ``suffix_window`` masked positions; the masked positions beyond are left out of every
    forward (cache or not) until the window reaches them. They are all mask tokens, whose
    outputs are discarded anyway: DPad finds that attention to them decays with distance and that
    a short window of them keeps accuracy. It is an approximation (the model no longer sees how
    much room is left beyond the window); 0, the default, keeps the whole masked suffix.
    DPad's second part, distance-decay dropout of positions inside the window, is not built.

    ``generator``: one ``torch.Generator`` for the batch, or a list of one per row; with a list,
    each row draws its samples from its own generator, and only at the steps it is still decoding,
    so a row's random draws depend on its own seed, not on which rows share its batch (the RL
    trainer keys each rollout's seed by step and sample, like the training noise). Its logits
    still see its batch through float noise (the padding width, bf16 expert routing).

    ``sync``: for a sharded model (FSDP / expert parallelism), whose every forward is a
    collective: called at each step with whether this rank still has masked positions in the
    block, it returns whether any rank has (an all-reduce), so all ranks run the same forwards; a
    rank that has finished runs its forwards too and commits nothing. None: this process alone
    decides (A2D / MDLM only)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} unknown; expected one of {STRATEGIES}")
    if threshold is not None and factor is not None:
        raise ValueError("give threshold or factor, not both: they are two rules for how many tokens to commit")
    if factor is not None and not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    if cache_refresh < 0:
        raise ValueError(f"cache_refresh must be >= 0, got {cache_refresh}")
    if suffix_window < 0:
        raise ValueError(f"suffix_window must be >= 0 (0: the whole masked suffix), got {suffix_window}")
    if suffix_window and suffixes and any(suffixes):
        raise ValueError("suffix_window leaves out what follows the window, which with suffixes (infilling) would "
                         "include the suffix text: give one or the other")
    objective = get_objective(objective)
    if not objective.masks:
        raise ValueError(f"objective {objective.name!r} does not mask: diffusion sampling needs a diffusion "
                         f"objective (a2d, mdlm)")
    if objective.shift and any(len(p) == 0 for p in prompts):
        raise ValueError(f"{objective.name} sampling needs a non-empty prompt (position 0 has no prediction)")
    block_model = getattr(objective, "block_size", None) is not None
    mode = {True: "prefix", False: "none", None: "prefix" if block_model else "none"}.get(kv_cache, kv_cache)
    if mode not in CACHE_MODES:
        raise ValueError(f"kv_cache {kv_cache!r} unknown; expected one of {CACHE_MODES} (or a bool)")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts: give one per row (or one)")
    if sync is not None and block_model:
        raise ValueError(f"sync (lockstep across ranks) is implemented for A2D / MDLM sampling, not {objective.name}")
    kw = dict(gen_length=gen_length, steps=steps, mask_id=mask_id, objective=objective, block_length=block_length,
              strategy=strategy, threshold=threshold, factor=factor, temperature=temperature, top_k=top_k,
              top_p=top_p, eos_id=eos_id, suffixes=suffixes, generator=generator, pad_id=pad_id,
              vocab_limit=vocab_limit)
    with _attention_of(model, objective):
        if block_model:
            if mode == "dual":
                raise ValueError(f"{objective.name} attends block-causally: no later block is ever read, so there "
                                 f"is no suffix to cache (kv_cache 'prefix' or 'none')")
            if suffix_window:
                raise ValueError(f"{objective.name} attends block-causally: no later block is ever read, so there "
                                 f"is no suffix to window (suffix_window 0)")
            return _block_generate(model, prompts, kv_cache=mode == "prefix", **kw)
        return _semi_ar_generate(model, prompts, cache=mode, cache_refresh=cache_refresh,
                                 suffix_window=suffix_window, sync=sync, **kw)


@contextmanager
def _attention_of(model, objective):
    """Run the model with the attention its objective was trained with, whatever mode it was left
    in (``build_model`` builds causal models): in causal mode a cached block forward (fewer queries
    than keys, no mask) would get SDPA's top-left causal triangle and see only the first cached
    keys, and the cached and uncached samplers would disagree. The mode is restored afterwards."""
    before = getattr(model, "attention_mode", None)
    switch = hasattr(model, "set_attention_mode") and before is not None and before != objective.attention
    if switch:
        model.set_attention_mode(objective.attention)
    try:
        yield
    finally:
        if switch:
            model.set_attention_mode(before)


def _semi_ar_generate(model, prompts, *, gen_length, steps, mask_id, objective, block_length, strategy, threshold,
                      factor, temperature, top_k, top_p, eos_id, suffixes, generator, pad_id, vocab_limit, cache,
                      cache_refresh, suffix_window=0, sync=None) -> GenerationOutput:
    """A2D / MDLM sampling over the whole sequence, ``block_length`` positions at a time.

    Every forward is either *full* (the whole sequence; with a cache it also refreshes it) or,
    with ``cache`` "prefix" / "dual", a *window* (``SequenceKVCache``): the columns from the block's
    first read output (A2D reads position j from output j - 1, so the window starts one column
    before the block) to the end of the sequence (prefix) or of the block (dual). The logits are
    computed only at the outputs that predict the block (``_outputs_at``). With ``suffix_window``
    W > 0, "the sequence" of a block is its columns up to W past the block's end (DPad's window):
    the cache is refreshed over those columns at each block start, so it slides with the window."""
    from rnd1.model.kv_cache import SequenceKVCache

    block_length = block_length or gen_length
    n_blocks = math.ceil(gen_length / block_length)
    if steps < n_blocks:
        raise ValueError(f"steps ({steps}) must be >= the number of blocks ({n_blocks})")
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    pad_id = eos_id if pad_id is None and eos_id is not None else (pad_id or 0)
    x, doc_ids, positions, starts = _layout(prompts, suffixes, gen_length, mask_id, pad_id)
    if cache != "none" and len(set(starts)) > 1:
        raise ValueError(f"kv_cache {cache!r} needs the generated region at the same columns in every row: "
                         f"give suffixes of one length (or none)")
    x, doc_ids, positions = x.to(device), doc_ids.to(device), positions.to(device)
    B, L = x.shape
    offsets = torch.arange(gen_length, device=device)
    region = torch.tensor(starts, device=device)[:, None] + offsets  # [B, G] absolute positions
    rows = torch.arange(B, device=device)[:, None]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    order: list[list[int]] = [[] for _ in range(B)]
    row_forwards = [0] * B
    kv = SequenceKVCache() if cache != "none" else None
    real = doc_ids.bool()
    key_mask = None if bool(real.all()) else real[:, None, None, :]  # window forwards: padding is never a key
    nfe, t0 = 0, time.perf_counter()
    steps_left = steps
    for blk in range(n_blocks):
        lo, hi = blk * block_length, min((blk + 1) * block_length, gen_length)
        blk_steps = steps_left // (n_blocks - blk)
        steps_left -= blk_steps
        n_block = hi - lo
        # the columns this block's forwards see: all, or up to suffix_window past the block (the
        # region starts at one column in every row when suffix_window is set: no suffixes)
        end = L if not suffix_window else min(L, max(starts) + hi + suffix_window)
        xs, docs, poss = x[:, :end], doc_ids[:, :end], positions[:, :end]  # views: commits to x show in xs
        keys = None if key_mask is None else key_mask[..., :end]
        for s in range(blk_steps):
            pos = region[:, lo:hi]
            still = (x[rows, pos] == mask_id) & ~done[:, None]
            if not (still.any() if sync is None else sync(bool(still.any()))):
                break
            read = objective.output_index(pos)  # [B, n] the output that predicts each position (the shift)
            full = kv is None or s == 0 or (cache_refresh > 0 and s % cache_refresh == 0)
            if full:
                with kv.refreshing() if kv is not None else _nothing():
                    lg = _outputs_at(model, xs, None, doc_ids=docs, positions=poss,
                                     kv_cache=kv, rows=read)
            else:
                a = int(read.min())
                b = end if cache == "prefix" else int(pos.max()) + 1
                mask = None if keys is None else Explicit(keys.expand(B, 1, b - a, end))
                with kv.window(a):
                    lg = _outputs_at(model, xs[:, a:b], None, positions=poss[:, a:b], attn_mask=mask,
                                     kv_cache=kv, rows=read - a)
            nfe += 1
            for b_ in torch.nonzero(still.any(1)).flatten().tolist():
                row_forwards[b_] += 1
            pred, pick = _choose(lg, still, s, blk_steps, n_block, mask_id=mask_id, vocab_limit=vocab_limit,
                                 strategy=strategy, threshold=threshold, factor=factor, temperature=temperature,
                                 top_k=top_k, top_p=top_p, generator=generator)
            for b_ in range(B):
                for j in torch.nonzero(pick[b_]).flatten().tolist():
                    order[b_].append(lo + j)
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
    return GenerationOutput(tokens, x.cpu(), nfe, seconds, order, row_forwards)


@contextmanager
def _nothing():
    yield


def _choose(logits, still, s, blk_steps, n_block, *, mask_id, vocab_limit, strategy, threshold, temperature,
            top_k, top_p, generator, factor=None):
    """One denoising step's decision for a block: ``logits`` [B, n, V] predict its ``n``
    positions, ``still`` [B, n] marks those still masked (and in a live row). Returns the
    predicted tokens and which of them to commit now (step ``s`` of ``blk_steps``).

    How many (a row's last step of a block always commits the rest):

    - fixed: the still-masked positions spread evenly over the remaining steps, the best by
      ``strategy`` first (``rnd1``: RND1's schedule);
    - ``threshold`` (Fast-dLLM's confidence-aware parallel decoding, Wu et al. 2025,
      arXiv:2505.22618, section 3.3): every position whose confidence exceeds it;
    - ``factor`` (the same paper's factor-based rule): with the still-masked confidences sorted,
      c_1 >= c_2 >= ..., the largest n with (n + 1) * (1 - c_n) < factor. It commits many tokens
      when the model is sure of many, few when it is not: Fast-dLLM derives it from the bound on
      the error of decoding n tokens independently (their Theorem 1).

    Both parallel rules commit at least one position per row and step (the best by ``strategy``),
    so a block always finishes within its steps."""
    B = logits.shape[0]
    device = logits.device
    lg = _allowed(logits.float(), mask_id, vocab_limit)
    lg = _filter_logits(lg, temperature, top_k, top_p)  # [B, n, V]
    probs = torch.softmax(lg, dim=-1)
    per_row = isinstance(generator, (list, tuple))
    if temperature > 0 and per_row:  # each row from its own generator, only while it decodes
        pred = probs.argmax(-1)
        for b in torch.nonzero(still.any(1)).flatten().tolist():
            pred[b] = torch.multinomial(probs[b], 1, generator=generator[b]).squeeze(-1)
    elif temperature > 0:
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
    elif per_row:  # only the rows still decoding draw, as for the tokens
        score = torch.zeros(conf.shape, device=device)
        for b in torch.nonzero(still.any(1)).flatten().tolist():
            score[b] = torch.rand(conf.shape[1:], generator=generator[b], device=generator[b].device).to(device)
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
    elif factor is not None:
        c = conf.masked_fill(~still, -1.0)
        ranked = torch.argsort(c, dim=1, descending=True)
        c_sorted = c.gather(1, ranked)
        n = torch.arange(1, c.shape[1] + 1, device=device)
        ok = ((n + 1) * (1 - c_sorted) < factor) & (c_sorted >= 0)  # a prefix: (n + 1)(1 - c_n) grows with n
        pick = _top(ranked, ok.sum(1), still)
        best = score.argmax(1)
        pick[torch.arange(B), best] |= n_still > 0  # at least one per step
    else:
        if strategy == "rnd1":  # RND1's linear schedule of positions that stay masked
            keep = rnd1_keep_masked(n_block, blk_steps, s + 1)
            k = (n_still - keep).clamp_min(0)
        else:
            k = torch.ceil(n_still.float() / (blk_steps - s)).long()
        pick = _top(torch.argsort(score, dim=1, descending=True), k, still)
    return pred, pick


def _top(ranked: torch.Tensor, k: torch.Tensor, still: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: each row's first ``k`` positions of ``ranked`` (indices, best first), among ``still``."""
    rank_of = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(ranked.shape[1], device=ranked.device)
                                                .expand_as(ranked))
    return (rank_of < k[:, None]) & still


# --------------------------------------------------------------------------- block diffusion
def _outputs_at(model, ids: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor | None = None,
                **kw) -> torch.Tensor:
    """Logits [B, len(idx), V] of the outputs ``idx`` of one forward (``rows`` [B, n]: per-row
    indices instead): a ``Qwen3`` applies its LM head only there (a 151,936-token vocabulary over
    a long prefix is the biggest tensor otherwise); any other module is called plainly and its
    logits indexed."""
    from rnd1.model.qwen3 import Qwen3

    kw = {k: v for k, v in kw.items() if v is not None}  # stand-in models need not know every keyword
    if isinstance(model, Qwen3):
        h = model(ids, return_hidden=True, **kw)
        return model.lm_head(h[:, idx] if rows is None else h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1])))
    out = model(ids, **kw)
    return out[:, idx] if rows is None else out.gather(1, rows[..., None].expand(-1, -1, out.shape[-1]))


def _block_generate(model, prompts, *, gen_length, steps, mask_id, objective, block_length, strategy, threshold,
                    factor, temperature, top_k, top_p, eos_id, suffixes, generator, pad_id, vocab_limit,
                    kv_cache) -> GenerationOutput:
    """Block diffusion sampling: one sequence under block-causal attention, blocks at absolute
    positions (multiples of ``block_size`` from the row's position 0), each denoised with the
    usual commit rules and ``steps`` split over the blocks the generated region touches. The
    block holding the prompt's tail is denoised with those prompt tokens fixed.

    Predictions: MDLM blocks read position j from output j; A2D blocks from output j - 1, and a
    block's first position s (when no prompt token precedes it inside the block) from the clean
    output s - 1, computed with the committed prefix only.

    ``kv_cache=True``: the prompt's complete blocks are prefilled once (one forward, counted in
    ``nfe``); every step forwards the current block only, against the cache; a finished block is
    forwarded once more, clean, in commit mode (counted), and its last output kept as the A2D
    prediction for the next block's first position. ``kv_cache=False``: every step forwards the
    whole prefix [0, end of the current block) under the block-causal pattern (``BlockCausal``).
    Rows are decoded in groups of equal prompt length (a ragged batch needs no padding inside a group)."""
    bs = objective.block_size
    if block_length is not None and block_length != bs:
        raise ValueError(f"block_length {block_length} does not match the {objective.name} model's block size {bs}"
                         f" (pass None or {bs})")
    if suffixes and any(len(s) for s in suffixes):
        raise ValueError(f"{objective.name} decodes left to right block by block: suffixes (infilling) are not "
                         f"supported")
    need = max(((len(p) + gen_length - 1) // bs - len(p) // bs + 1 for p in prompts), default=0)
    if gen_length > 0 and steps < need:
        raise ValueError(f"steps ({steps}) must be >= the number of blocks ({need})")
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    pad_id = eos_id if pad_id is None and eos_id is not None else (pad_id or 0)
    x, _, _, starts = _layout(prompts, None, gen_length, mask_id, pad_id)
    B, L = x.shape
    order: list[list[int]] = [[] for _ in range(B)]
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(b)
    nfe, cache_nfe, t0 = 0, 0, time.perf_counter()
    kw = dict(mask_id=mask_id, vocab_limit=vocab_limit, strategy=strategy, threshold=threshold, factor=factor,
              temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    for P, rows in groups.items():
        seq = torch.tensor([list(prompts[b]) + [mask_id] * gen_length for b in rows], dtype=torch.long,
                           device=device)
        if gen_length > 0:
            n, c, o = _decode_blocks(model, seq, P, steps, objective, eos_id, kv_cache, kw)
            nfe, cache_nfe = nfe + n, cache_nfe + c
            for i, b in enumerate(rows):
                order[b] = o[i]
        x[rows, L - seq.shape[1]:] = seq.cpu()
    seconds = time.perf_counter() - t0
    tokens = []
    for b in range(B):
        gen = x[b, starts[b]:starts[b] + gen_length].tolist()
        if eos_id is not None and eos_id in gen:
            gen = gen[:gen.index(eos_id) + 1]
        tokens.append(gen)
    return GenerationOutput(tokens, x, nfe, seconds, order, cache_nfe=cache_nfe)


def _decode_blocks(model, seq: torch.Tensor, P: int, steps: int, objective, eos_id, use_cache: bool,
                   kw: dict) -> tuple[int, int, list[list[int]]]:
    """Denoise ``seq`` [n, T] (prompts of length ``P``, then mask ids) in place, block by block.
    Returns the forward count, how many of those only wrote the cache, and each row's commit
    order (offsets from ``P``)."""
    from rnd1.model.attention_masks import BlockCausal
    from rnd1.model.kv_cache import KVCache

    mask_id, bs, shift = kw["mask_id"], objective.block_size, objective.shift
    n, T = seq.shape
    device = seq.device
    first, last = P // bs, (T - 1) // bs
    n_blocks = last - first + 1
    region = (P + torch.arange(T - P, device=device)).expand(n, T - P)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    order: list[list[int]] = [[] for _ in range(n)]
    nfe = cache_nfe = 0
    cache = KVCache() if use_cache else None
    carry = None  # A2D with the cache: the clean output just before the current block
    if use_cache and first > 0:  # prefill the prompt's complete blocks (block-causal among themselves)
        pos = torch.arange(first * bs, device=device).expand(n, first * bs)
        with cache.committing():
            carry = _outputs_at(model, seq[:, :first * bs], torch.tensor([first * bs - 1], device=device),
                                kv_cache=cache, positions=pos,
                                attn_mask=BlockCausal.prefix(first * bs, bs, n, device))[:, 0]
        nfe += 1
        cache_nfe += 1
    steps_left = steps
    for k in range(n_blocks):
        s0 = (first + k) * bs
        e = min(s0 + bs, T)
        lo = max(s0, P)  # the block's first generated position
        blk_steps = steps_left // (n_blocks - k)
        steps_left -= blk_steps
        read = torch.arange(lo, e, device=device) - shift  # the output that predicts each position
        from_carry = use_cache and shift > 0 and lo == s0  # a block start with no prompt token before it
        for s in range(blk_steps):
            still = (seq[:, lo:e] == mask_id) & ~done[:, None]
            if not still.any():
                break
            if use_cache:  # the current block only, against the committed blocks
                if from_carry and e - s0 == 1:  # a one-position block: the kept output is all it needs
                    lg = carry[:, None]
                    nfe -= 1  # no forward this step
                elif from_carry:
                    lg = torch.cat([carry[:, None], _outputs_at(model, seq[:, s0:e], read[1:] - s0,
                                                                kv_cache=cache)], dim=1)
                else:
                    lg = _outputs_at(model, seq[:, s0:e], read - s0, kv_cache=cache)
            else:  # the whole prefix, block-causal
                pos = torch.arange(e, device=device).expand(n, e)
                lg = _outputs_at(model, seq[:, :e], read, positions=pos,
                                 attn_mask=BlockCausal.prefix(e, bs, n, device))
            nfe += 1
            pred, pick = _choose(lg, still, s, blk_steps, e - lo, **kw)
            for i in range(n):
                for j in torch.nonzero(pick[i]).flatten().tolist():
                    order[i].append(lo - P + j)
            seq[:, lo:e] = torch.where(pick, pred, seq[:, lo:e])
            if eos_id is not None:
                _stop_at_eos(seq, region, mask_id, eos_id, done)
        if k == n_blocks - 1 or bool(done.all()):
            break
        if use_cache:  # the block is final: cache it, clean
            with cache.committing():
                carry = _outputs_at(model, seq[:, s0:e], torch.tensor([e - s0 - 1], device=device),
                                    kv_cache=cache)[:, 0]
            nfe += 1
            cache_nfe += 1
    return nfe, cache_nfe, order


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
