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

A full-attention diffusion model (every position sees every other) cannot use this: each step
changes tokens that every cached key depends on.
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
