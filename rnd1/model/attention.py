"""The attention backend switch: dense-mask SDPA or FlexAttention, per mask kind.

``model.attention_backend`` (``Qwen3.set_attention_backend``):

- ``sdpa``: every pattern becomes a dense boolean mask for ``F.scaled_dot_product_attention``.
- ``flex``: every masked pattern (``rnd1.model.attention_masks``) becomes a ``BlockMask`` for
  ``torch.nn.attention.flex_attention``, which skips the tiles no query may attend and never
  reads an L x L mask.
- ``auto``: per pattern kind and shape, the faster of the two by measurement (below).

Unmasked causal or bidirectional attention always runs on SDPA, with no mask at all: on a GPU
that is the flash kernel, which FlexAttention does not beat.

Why this matters on a GPU: SDPA given a dense mask cannot use its flash kernel; it falls back to
the memory-efficient or math kernel, reads the mask from memory and computes every fully masked
tile. Block diffusion's [x_t | x0] stream leaves about 70% of its tiles empty at L = 2048 with
blocks of 32, and packed documents leave most of them empty too.

The mask is prepared once per batch by ``Qwen3.forward`` (``prepare``), outside any compiled
region, and the same tensor or BlockMask reaches every layer. BlockMasks whose pattern depends
on the shape alone (block diffusion without documents, the sampler's block-causal prefix) are
kept and reused (``_CACHE``).

``auto`` measures, it does not guess: the first batch of a (kind, shape, heads, dtype, forward
or forward+backward) runs both backends on random inputs of that shape with this batch's mask
(``rnd1.kernels.autotune.measure``), keeps the faster for the rest of the process and records a
line saying so (``choice_lines``; the trainer measures its training shape at start-up on rank 0
and gives every rank the answer, ``set_choice``). Two cases are decided without timing, and the
line says why:

- on the CPU with gradients: torch's FlexAttention has no CPU backward (torch 2.13 refuses it),
  so training on the CPU uses SDPA; ``flex`` refuses to train there;
- on the CPU below ``CPU_MEASURE_MIN`` mask entries: the dense mask is at most a few MiB and
  compiling a FlexAttention kernel for a new shape costs seconds, more than it can save;
- after ``MEASURED_SHAPES_MAX`` shapes of one kind were measured, a new shape of that kind gets
  SDPA. A training run has one or two shapes; a loop whose every forward has a new shape (AR
  decoding of a ragged batch grows the keys by one per step) would otherwise pay a measurement
  and a FlexAttention compile per step, then hit Dynamo's recompile limit, whose eager fallback
  materialises every score and warns on every run.

Precision: FlexAttention needs q, k and v in one dtype. Under autocast SDPA casts them to the
autocast dtype; the flex path does the same (RMSNorm's fp32 weight leaves q and k in fp32).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from rnd1.model.attention_masks import Explicit, Pattern

ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
CPU_MEASURE_MIN = 1 << 20  # mask entries (B x Lq x Lk) below which CPU `auto` keeps SDPA unmeasured
COMPILE_MASK_MIN = 1 << 22  # entries above which the BlockMask builder is compiled (eager is O(L^2) memory)
MEASURED_SHAPES_MAX = 4  # shapes of one kind `auto` measures; later new shapes of it take SDPA
_CACHE_SIZE = 8

log = logging.getLogger("rnd1.attention")

_compiled: dict[str, object] = {}
_CACHE: "OrderedDict[tuple, BlockMask]" = OrderedDict()
_choices: dict[str, str] = {}
_lines: list[str] = []
_measured: dict[tuple, int] = {}  # (kind, device type, needs_grad) -> shapes measured


def check_backend(name: str) -> str | None:
    """None when ``name`` is an attention backend, else a one-line reason (config validation)."""
    return None if name in ATTENTION_BACKENDS else f"expected one of {', '.join(ATTENTION_BACKENDS)}"


# ----------------------------------------------------------------------------- FlexAttention
def flex_backward_supported(device: torch.device) -> bool:
    """Whether torch's FlexAttention can differentiate on ``device`` (not on the CPU in torch 2.13)."""
    return torch.device(device).type != "cpu"


def _flex():
    """flex_attention compiled once per process (uncompiled it materialises every score). Static
    shapes: after two shapes Dynamo would recompile with symbolic sizes, and torch 2.13's CPU
    FlexAttention kernel then fails to build (C++ compile error, ``cur_kvSplitSize``); one graph
    per shape is what a training run has anyway."""
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["flex"]


def _builder(entries: int):
    if entries < COMPILE_MASK_MIN:
        return create_block_mask
    if "mask" not in _compiled:
        _compiled["mask"] = torch.compile(create_block_mask)
    return _compiled["mask"]


def block_mask(pattern: Pattern, device) -> BlockMask:
    """The pattern's BlockMask (128 x 128 tiles), from the cache when it depends on the shape only."""
    key = pattern.cache_key()
    if key is not None:
        key = (*key, str(device))
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    B, Lq, Lk = pattern.shape
    bm = _builder((B or 1) * Lq * Lk)(pattern.mask_mod(), B, None, Lq, Lk, device=device)
    if key is not None:
        _CACHE[key] = bm
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return bm


def block_mask_bytes(bm: BlockMask) -> int:
    """Bytes the BlockMask holds (its tile counts and indices, both directions)."""
    seen, total = set(), 0
    for t in bm.as_tuple()[2:]:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- the choice
def set_choice(key: str, impl: str) -> None:
    """Record a measured choice (the trainer broadcasts rank 0's)."""
    if impl not in ("sdpa", "flex"):
        raise ValueError(f"attention choice {impl!r}: expected 'sdpa' or 'flex'")
    _choices[key] = impl


def choice_lines() -> list[str]:
    """One line per choice ``auto`` made in this process, in order."""
    return list(_lines)


def reset_choices() -> None:
    _choices.clear()
    _lines.clear()
    _measured.clear()


def choice_key(pattern: Pattern, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
               needs_grad: bool) -> str:
    B, Lq, Lk = pattern.shape
    return (f"{pattern.kind} B {B or 1} q {Lq} k {Lk} heads {heads}/{kv_heads} dim {head_dim} "
            f"{str(dtype).replace('torch.', '')} {torch.device(device).type} {'fwd+bwd' if needs_grad else 'fwd'}")


def _record(key: str, impl: str, why: str) -> str:
    _choices[key] = impl
    line = f"attention auto [{key}]: {impl} ({why})"
    _lines.append(line)
    log.info(line)
    return impl


def tuning_candidates(pattern: Pattern, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                      needs_grad: bool) -> dict:
    """Closures running SDPA with the dense mask and FlexAttention with the BlockMask on random
    q/k/v of this shape (each mask built once, outside the timing, as in a step)."""
    B, Lq, Lk = pattern.shape
    B = B or 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, heads, Lq, head_dim, generator=g).to(device, dtype).requires_grad_(needs_grad)
    k = torch.randn(B, kv_heads, Lk, head_dim, generator=g).to(device, dtype).requires_grad_(needs_grad)
    v = torch.randn(B, kv_heads, Lk, head_dim, generator=g).to(device, dtype).requires_grad_(needs_grad)
    masks = {"sdpa": pattern.to(device).dense(), "flex": block_mask(pattern.to(device), device)}

    def run(impl):
        def f():
            out = attend(q, k, v, masks[impl], False, kv_heads != heads)
            if needs_grad:
                out.sum().backward()
                q.grad = k.grad = v.grad = None
        return f

    return {impl: run(impl) for impl in masks}


def measure_choice(pattern: Pattern, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                   needs_grad: bool) -> tuple[str, dict[str, float]]:
    """-> (the faster backend, median ms of each) at this pattern and shape."""
    from rnd1.kernels.autotune import measure

    ms = measure(tuning_candidates(pattern, heads, kv_heads, head_dim, dtype, device, needs_grad),
                 device=torch.device(device).type)
    return min(ms, key=ms.get), ms


def choose(pattern: Pattern, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device,
           needs_grad: bool) -> str:
    """``auto``'s backend for this pattern and shape: the recorded choice, else decided now."""
    key = choice_key(pattern, heads, kv_heads, head_dim, dtype, device, needs_grad)
    if key in _choices:
        return _choices[key]
    if needs_grad and not flex_backward_supported(device):
        return _record(key, "sdpa", "FlexAttention has no backward on this device in this torch")
    B, Lq, Lk = pattern.shape
    if torch.device(device).type == "cpu" and (B or 1) * Lq * Lk < CPU_MEASURE_MIN:
        return _record(key, "sdpa", f"CPU mask of {(B or 1) * Lq * Lk} entries < {CPU_MEASURE_MIN}: "
                                    f"a flex compile would cost more than it saves")
    family = (pattern.kind, torch.device(device).type, needs_grad)
    if _measured.get(family, 0) >= MEASURED_SHAPES_MAX:
        return _record(key, "sdpa", f"{MEASURED_SHAPES_MAX} shapes of this kind measured already: a new shape "
                                    f"per forward (a decoding loop) cannot repay a measurement and a compile")
    _measured[family] = _measured.get(family, 0) + 1
    impl, ms = measure_choice(pattern, heads, kv_heads, head_dim, dtype, device, needs_grad)
    return _record(key, impl, "measured: " + ", ".join(f"{k} {v:.3g} ms" for k, v in ms.items()))


# ----------------------------------------------------------------------------- per batch, per layer
def prepare(pattern: Pattern | None, backend: str, *, heads: int, kv_heads: int, head_dim: int,
            dtype: torch.dtype, device, needs_grad: bool) -> torch.Tensor | BlockMask | None:
    """What every layer of this forward receives: None (unmasked: SDPA, flash on a GPU), a dense
    bool mask (SDPA) or a BlockMask (FlexAttention). Called once per forward, outside compiled code."""
    if pattern is None:
        return None
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; {check_backend(backend)}")
    if backend == "auto":
        backend = choose(pattern, heads, kv_heads, head_dim, dtype, device, needs_grad)
    if backend == "sdpa":
        return pattern.dense().to(device)
    if needs_grad and not flex_backward_supported(device):
        raise ValueError(f"attention backend 'flex' cannot train on {torch.device(device).type}: torch's "
                         f"FlexAttention has no backward there; use 'auto' or 'sdpa'")
    return block_mask(pattern, device)


def as_pattern(attn_mask) -> Pattern | None:
    """A caller's ``attn_mask``: a pattern as is, a bool tensor as an ``Explicit`` pattern."""
    if attn_mask is None or not isinstance(attn_mask, torch.Tensor):
        return attn_mask
    return Explicit(attn_mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
           is_causal: bool, enable_gqa: bool) -> torch.Tensor:
    """q [B, heads, Lq, hd], k/v [B, kv_heads, Lk, hd] -> [B, heads, Lq, hd]."""
    if isinstance(mask, BlockMask):
        dtype = v.dtype  # autocast's dtype when autocast is on (v comes straight from a Linear)
        return _flex()(q.to(dtype), k.to(dtype), v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                          enable_gqa=enable_gqa)
