"""Packed fixed-length sequences from a weighted mixture of token datasets, sharded over
data-parallel ranks, with a resumable state.

Each source is cut into non-overlapping windows of ``seq_len`` tokens (documents are packed
back to back with EOS between them, so a window may span documents; ``doc_ids`` numbers the
documents inside each window for optional per-document attention masking). Windows are visited
in a seeded random order per epoch; rank r of W takes every W-th window, so ranks never see the
same window. For every sequence the source is drawn with probability proportional to its
weight (the paper mixes web, math, code, instruction and encyclopedic data this way).

Everything is a pure function of (seed, rank, counters), so the state is just the counters:
a loader restored from ``state_dict()`` yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

from rnd1.data.shards import DataError, TokenSplit


class _Source:
    def __init__(self, split: TokenSplit, seq_len: int, eos_id: int, seed: int, index: int,
                 rank: int, world: int):
        self.split, self.seq_len, self.eos_id = split, seq_len, eos_id
        self.num_windows = len(split) // seq_len
        if self.num_windows < world:
            raise DataError(f"{split.name}: {len(split)} tokens make {self.num_windows} windows of seq_len "
                            f"{seq_len}, fewer than the {world} data-parallel ranks")
        self.per_rank = self.num_windows // world  # drop the remainder so every rank has the same count
        self.seed, self.index, self.rank, self.world = seed, index, rank, world
        self.epoch, self.pos = 0, 0
        self._cached_epoch, self._cached_order = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch:
            rng = np.random.default_rng([self.seed, self.index, epoch])
            self._cached_order, self._cached_epoch = rng.permutation(self.num_windows), epoch
        return self._cached_order

    def next_window(self) -> np.ndarray:
        if self.pos >= self.per_rank:
            self.epoch, self.pos = self.epoch + 1, 0
        w = int(self._order(self.epoch)[self.pos * self.world + self.rank])
        self.pos += 1
        return self.split.slice(w * self.seq_len, self.seq_len)


class PackedLoader:
    """Iterator of ``{"input_ids": LongTensor[B, L], "doc_ids": IntTensor[B, L]}``."""

    def __init__(self, splits: list[TokenSplit], *, seq_len: int, batch_size: int, eos_id: int,
                 weights: list[float] | None = None, seed: int = 0, dp_rank: int = 0, dp_world_size: int = 1):
        if not splits:
            raise DataError("no datasets given")
        weights = list(weights) if weights else [1.0] * len(splits)
        if len(weights) != len(splits) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"mixture weights {weights} must be {len(splits)} non-negative numbers with a "
                            f"positive sum")
        self.probs = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.sources = [_Source(s, seq_len, eos_id, seed, i, dp_rank, dp_world_size) for i, s in enumerate(splits)]
        self.seq_len, self.batch_size, self.eos_id = seq_len, batch_size, eos_id
        self.seed, self.rank, self.world = seed, dp_rank, dp_world_size
        self.samples = 0  # sequences produced by this rank
        self.tokens_per_source = [0] * len(splits)

    def __iter__(self):
        return self

    def _pick_source(self) -> int:
        if len(self.sources) == 1:
            return 0
        u = np.random.default_rng([self.seed, 1_000_003, self.rank, self.samples]).random()
        return int(min(np.searchsorted(np.cumsum(self.probs), u, side="right"), len(self.sources) - 1))

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        # global sample index: the position of this sequence in the rank-interleaved stream
        # (rank r's s-th sequence is global sample s * world + r), independent of the layout
        first = self.samples
        sample_ids = torch.arange(first, first + self.batch_size) * self.world + self.rank
        for _ in range(self.batch_size):
            k = self._pick_source()
            rows.append(self.sources[k].next_window())
            self.tokens_per_source[k] += self.seq_len
            self.samples += 1
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        return {"input_ids": ids, "doc_ids": document_ids(ids, self.eos_id), "sample_ids": sample_ids}

    def state_dict(self) -> dict:
        return {"samples": self.samples, "tokens_per_source": list(self.tokens_per_source),
                "cursors": [(s.epoch, s.pos) for s in self.sources], "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if len(state["cursors"]) != len(self.sources):
            raise DataError(f"loader state has {len(state['cursors'])} sources, this run has {len(self.sources)}")
        self.samples = state["samples"]
        self.tokens_per_source = list(state["tokens_per_source"])
        for s, (epoch, pos) in zip(self.sources, state["cursors"]):
            s.epoch, s.pos = epoch, pos

    def epochs(self) -> list[int]:
        return [s.epoch for s in self.sources]


def document_ids(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the document each token belongs to within its row: the EOS closing a document
    belongs to it, the next token starts a new one."""
    is_eos = (ids == eos_id).to(torch.int32)
    return (torch.cumsum(is_eos, dim=1) - is_eos).to(torch.int32)
