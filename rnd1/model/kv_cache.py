"""A key/value cache of committed clean blocks, for sampling a block-diffusion model.

A block-diffusion model attends block-causally: a block sees itself (both ways) and every
earlier block, never a later one. So once a block is committed (all its tokens decided), its
keys and values in every layer are final: no later token can change them. The sampler runs the
committed block once more, clean, in ``commit`` mode (its keys/values are appended here), and
every denoising step of the next block then runs only that block's tokens against the cache:
each step costs one block, not the whole sequence so far.

Usage::

    cache = KVCache()
    with cache.committing():
        model(prefix_ids, kv_cache=cache)          # cache the clean prefix
    logits = model(block_ids, kv_cache=cache)       # a denoising step: reads the cache only

A full-attention diffusion model (every position sees every other) cannot use this exactly: each
step changes tokens that every cached key depends on. ``SequenceKVCache`` is the approximation
such models are sampled with (Fast-dLLM's prefix and dual caches), below.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class KVCache:
    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [B, kv_heads, cached, head_dim]
        self.values: dict[int, torch.Tensor] = {}
        self.commit = False  # whether a forward appends its keys/values

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if not self.keys else next(iter(self.keys.values())).shape[2]

    @contextmanager
    def committing(self):
        """Forwards inside this block append their keys/values to the cache."""
        self.commit = True
        try:
            yield self
        finally:
            self.commit = False

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's keys/values [B, kv_heads, L, hd] -> the cached prefix's followed by them
        (stored when committing)."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        if self.commit:
            self.keys[layer], self.values[layer] = k, v
        return k, v


class SequenceKVCache:
    """The keys/values of a whole sequence from its last full forward, reused while a window of it
    is recomputed: the approximate prefix and dual caches of Fast-dLLM (Wu et al., 2025,
    arXiv:2505.22618, section 3.2) for bidirectional (A2D / MDLM) models.

    In a bidirectional model every key depends on every token, so after a denoising step commits
    tokens in the current block, the keys of the prompt, of the committed blocks and of the masked
    suffix all change a little. Fast-dLLM observed that they change little between adjacent steps
    and reuses them: a *refresh* forward runs the whole sequence and stores every layer's keys and
    values (``refreshing``); the following steps forward only a window of columns ``[a, b)`` (the
    current block, and in prefix mode everything after it) and attend to the stored keys outside
    the window, in column order: ``cached[:, :, :a] | this forward's | cached[:, :, b:]``.

    - prefix cache: the window runs to the end of the sequence (``b = L``): only the prompt's and
      the committed blocks' keys are stale;
    - dual cache: the window is the current block; the masked suffix's keys are stale too.

    Stale keys make it an approximation: tokens can differ from uncached sampling. Refreshing at
    every step makes every forward a full one, and the tokens are exactly the uncached ones (the
    sampler's tests check it). Keys keep their rotary positions from the forward that made them,
    so a window forward must pass its columns' positions.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [B, kv_heads, L, hd]
        self.values: dict[int, torch.Tensor] = {}
        self.window_start: int | None = None  # first column of the window; None: a refresh forward
        self.refresh = False

    @property
    def length(self) -> int:
        return 0 if not self.keys else next(iter(self.keys.values())).shape[2]

    @contextmanager
    def refreshing(self):
        """A forward inside this block runs the whole sequence and replaces the stored keys/values."""
        self.refresh = True
        try:
            yield self
        finally:
            self.refresh = False

    @contextmanager
    def window(self, start: int):
        """A forward inside this block computes the columns from ``start`` (as many as it has ids)
        and reads every other column from the cache."""
        self.window_start = start
        try:
            yield self
        finally:
            self.window_start = None

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.refresh:
            self.keys[layer], self.values[layer] = k, v
            return k, v
        if self.window_start is None:
            raise RuntimeError("SequenceKVCache: a forward outside refreshing() or window()")
        a, b = self.window_start, self.window_start + k.shape[2]
        K, V = self.keys[layer], self.values[layer]
        return (torch.cat([K[:, :, :a], k, K[:, :, b:]], dim=2), torch.cat([V[:, :, :a], v, V[:, :, b:]], dim=2))
