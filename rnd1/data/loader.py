"""Packed fixed-length sequences from a weighted mixture of token datasets, sharded over
data-parallel ranks, with a resumable state.

Each source is cut into non-overlapping windows of ``seq_len`` tokens (documents are packed
back to back with EOS between them, so a window may span documents; ``doc_ids`` numbers the
documents inside each window for optional per-document attention masking). Each source visits
its windows in a seeded random order per epoch.

The data is ONE global stream of samples, defined without reference to the layout: global
sample g draws its source from a seeded uniform keyed by g (probability proportional to the
mixture weight; the paper mixes web, math, code, instruction and encyclopedic data this way)
and takes that source's next window, i.e. its n-th window where n counts the earlier global
samples that drew the same source. Rank r of W produces global samples r, r + W, r + 2W, ...
So ranks never see the same window within an epoch, and the stream does not depend on the
number of ranks, the micro-batch size or gradient accumulation: a run resumed on another world
size continues at the same global sample (the corruption noise is keyed by the same index).

Everything is a pure function of (seed, weights, global index), so the state is the global
position plus one counter per source, identical on every rank.

Every batch also has ``loss_mask`` (True = the objective may mask and score the token). A split
without per-token flags (pretraining text) is supervised everywhere. A split built from chat data
(``rnd1.data.chat``: flags say which tokens are response and where conversations start) is cut
differently, so that SFT never sees half a conversation: whole conversations are packed greedily,
in file order, into windows of ``seq_len`` tokens and the rest of each window is EOS padding.
A conversation longer than ``seq_len`` gets a window of its own and is TRUNCATED to its first
``seq_len`` tokens (losing the end of its response); the loader counts them in ``truncated``.
``doc_ids`` then number the conversations (from the DOC_START flags), and the padding belongs to
the window's last conversation: as in LLaDA's SFT, EOS padding reads as that response's tail.
``supervise_eos`` (default True, LLaDA) makes each conversation's trailing EOS and the padding
supervised, so the model learns to end a response by filling EOS; False leaves them as context.
``pack_conversations`` (default True) packs as above; False gives every conversation a window of
its own, EOS-padded to ``seq_len`` (LLaDA's SFT layout). Packing wastes no compute, but the model
then only ever sees a response followed by a few EOS: asked to fill a long masked region (a gen
length far past the responses it was tuned on) it has never seen one, and answers EOS at once.
One conversation per window shows it the long EOS tail, at every position up to ``seq_len``.
``eos_tail_max`` (default 0) is the middle way: every conversation is followed by k more EOS of
its own (supervised like its trailing EOS, in its own document), k drawn per conversation from a
log-uniform over 0..``eos_tail_max`` - 1 (seeded by the conversation's index, so the windows never
change), and conversations with their tails are packed as above. Most tails are short (median
about sqrt(eos_tail_max)), so a window still holds several conversations, while some run long
enough to show the model a long masked region that it should fill with EOS after the answer.
These windows go through the same seeded per-epoch order and global stream as any other.
"""

from __future__ import annotations

import numpy as np
import torch

from typing import NamedTuple

from rnd1.data.shards import FLAG_DOC_START, FLAG_LOSS, FLAG_TRAILING_EOS, DataError, TokenSplit

# Source draws come in blocks of this many global samples (one generator per block): a rank
# has to count every global sample's draw, including the other ranks', to know its own windows.
_PICK_BLOCK = 4096


class Window(NamedTuple):
    """One sequence: tokens, loss mask and (conversation-aligned windows only) document ids."""

    tokens: np.ndarray
    loss: np.ndarray
    doc_ids: np.ndarray | None


class TextWindows:
    """Consecutive ``seq_len`` slices of a split; every token supervised."""

    def __init__(self, split: TokenSplit, seq_len: int):
        self.split, self.seq_len = split, seq_len
        self.num_windows = len(split) // seq_len
        self.truncated = 0

    def get(self, w: int) -> Window:
        tokens = self.split.slice(w * self.seq_len, self.seq_len)
        return Window(tokens, np.ones(self.seq_len, dtype=bool), None)


class ConversationWindows:
    """Whole conversations packed greedily in file order (``pack``) or one per window, EOS-padded
    (see the module docstring)."""

    def __init__(self, split: TokenSplit, seq_len: int, eos_id: int, supervise_eos: bool, pack: bool = True,
                 eos_tail_max: int = 0):
        self.split, self.seq_len, self.eos_id, self.supervise_eos = split, seq_len, eos_id, supervise_eos
        starts = split.doc_starts().astype(np.int64)
        if not len(starts) or starts[0] != 0:
            raise DataError(f"{split.name}: the flags do not mark a conversation start at token 0")
        self.starts = starts
        self.ends = np.append(starts[1:], len(split))
        lengths = self.ends - starts
        self.truncated = int((lengths > seq_len).sum())
        kept = np.minimum(lengths, seq_len)
        # extra EOS after each conversation: floor(exp(u ln(max + 1))) - 1 in 0..max-1, fixed per conversation
        u = np.random.default_rng([len(starts), eos_tail_max]).random(len(starts))
        tails = np.floor(np.exp(u * np.log(eos_tail_max + 1))).astype(np.int64) - 1 if eos_tail_max else np.zeros_like(kept)
        self.tails = np.minimum(tails, seq_len - kept)
        self.has_tails = bool(self.tails.any())
        first, used = [], seq_len + 1
        for i, n in enumerate((kept + self.tails).tolist()):
            if not pack or used + n > seq_len:
                first.append(i)
                used = 0
            used += n
        self.first = np.asarray(first, dtype=np.int64)  # window w holds docs first[w] .. first[w+1]-1
        self.last = np.append(self.first[1:], len(starts))
        self.num_windows = len(first)

    def get(self, w: int) -> Window:
        lo = int(self.starts[self.first[w]])
        hi = min(int(self.ends[self.last[w] - 1]), lo + self.seq_len)
        if not self.has_tails:  # the window's conversations are one contiguous slice
            token_parts, flag_parts = [self.split.slice(lo, hi - lo)], [self.split.slice_flags(lo, hi - lo)]
        else:  # each conversation, then its own EOS tail
            token_parts, flag_parts = [], []
            for d in range(int(self.first[w]), int(self.last[w])):
                a = int(self.starts[d])
                b = min(int(self.ends[d]), a + self.seq_len)
                token_parts += [self.split.slice(a, b - a), np.full(self.tails[d], self.eos_id, dtype=np.uint32)]
                flag_parts += [self.split.slice_flags(a, b - a), np.full(self.tails[d], FLAG_TRAILING_EOS, dtype=np.uint8)]
        pad = self.seq_len - sum(len(t) for t in token_parts)
        tokens = np.concatenate([*token_parts, np.full(pad, self.eos_id, dtype=np.uint32)])
        flags = np.concatenate([*flag_parts, np.full(pad, FLAG_TRAILING_EOS, dtype=np.uint8)])
        loss = (flags & FLAG_LOSS) != 0
        if self.supervise_eos:
            loss |= (flags & FLAG_TRAILING_EOS) != 0
        doc_ids = np.cumsum((flags & FLAG_DOC_START) != 0) - 1
        return Window(tokens, loss, doc_ids)


class _Source:
    def __init__(self, split: TokenSplit, seq_len: int, seed: int, index: int, world: int, *,
                 eos_id: int = 0, supervise_eos: bool = True, pack_conversations: bool = True,
                 eos_tail_max: int = 0):
        self.split, self.seq_len = split, seq_len
        self.windows = (ConversationWindows(split, seq_len, eos_id, supervise_eos, pack_conversations, eos_tail_max)
                        if getattr(split, "has_flags", False) else TextWindows(split, seq_len))
        self.num_windows = self.windows.num_windows
        if self.num_windows < world:
            raise DataError(f"{split.name}: {len(split)} tokens make {self.num_windows} windows of seq_len "
                            f"{seq_len}, fewer than the {world} data-parallel ranks")
        self.seed, self.index = seed, index
        self._cached_epoch, self._cached_order = -1, None

    def window(self, n: int) -> Window:
        """The n-th window this source hands out: epoch n // num_windows visits every window once."""
        epoch, pos = divmod(n, self.num_windows)
        if self._cached_epoch != epoch:
            rng = np.random.default_rng([self.seed, self.index, epoch])
            self._cached_order, self._cached_epoch = rng.permutation(self.num_windows), epoch
        return self.windows.get(int(self._cached_order[pos]))


class PackedLoader:
    """Iterator of ``{"input_ids": LongTensor[B, L], "doc_ids": IntTensor[B, L], "sample_ids": LongTensor[B],
    "loss_mask": BoolTensor[B, L]}``. ``supervise_eos``, ``pack_conversations`` and ``eos_tail_max`` only matter for chat
    splits (module docstring);
    ``truncated`` counts the conversations longer than ``seq_len`` (cut to fit) over all sources."""

    def __init__(self, splits: list[TokenSplit], *, seq_len: int, batch_size: int, eos_id: int,
                 weights: list[float] | None = None, seed: int = 0, dp_rank: int = 0, dp_world_size: int = 1,
                 supervise_eos: bool = True, pack_conversations: bool = True, eos_tail_max: int = 0):
        if not splits:
            raise DataError("no datasets given")
        weights = list(weights) if weights else [1.0] * len(splits)
        if len(weights) != len(splits) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"mixture weights {weights} must be {len(splits)} non-negative numbers with a "
                            f"positive sum")
        self.probs = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.sources = [_Source(s, seq_len, seed, i, dp_world_size, eos_id=eos_id, supervise_eos=supervise_eos,
                                pack_conversations=pack_conversations, eos_tail_max=eos_tail_max)
                        for i, s in enumerate(splits)]
        self.supervise_eos = supervise_eos
        self.truncated = sum(s.windows.truncated for s in self.sources)
        self.seq_len, self.batch_size, self.eos_id = seq_len, batch_size, eos_id
        self.seed, self.rank, self.world = seed, dp_rank, dp_world_size
        self.start = 0  # global index where this rank's interleaving began (0, or a restored position)
        self.samples = 0  # sequences produced by this rank since ``start``
        self._scanned = 0  # global samples [0, _scanned) are counted in _drawn
        self._drawn = [0] * len(splits)  # per source: how many of those global samples drew it
        self._block: tuple[int, np.ndarray | None] = (-1, None)

    def __iter__(self):
        return self

    def _block_picks(self, b: int) -> np.ndarray:
        if self._block[0] != b:
            u = np.random.default_rng([self.seed, 1_000_003, b]).random(_PICK_BLOCK)
            k = np.searchsorted(np.cumsum(self.probs), u, side="right")
            self._block = (b, np.minimum(k, len(self.sources) - 1))
        return self._block[1]

    def _picks(self, lo: int, hi: int) -> np.ndarray:
        """The source drawn by each global sample in [lo, hi)."""
        if len(self.sources) == 1:
            return np.zeros(max(hi - lo, 0), dtype=np.int64)
        parts = []
        while lo < hi:
            b, off = divmod(lo, _PICK_BLOCK)
            n = min(hi - lo, _PICK_BLOCK - off)
            parts.append(self._block_picks(b)[off:off + n])
            lo += n
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _counts(self, lo: int, hi: int) -> np.ndarray:
        return np.bincount(self._picks(lo, hi), minlength=len(self.sources))

    def _take(self, g: int) -> Window:
        """Global sample g's window (g >= every sample this rank took before)."""
        self._drawn = [d + int(c) for d, c in zip(self._drawn, self._counts(self._scanned, g))]
        k = int(self._picks(g, g + 1)[0])
        n = self._drawn[k]
        self._drawn[k] += 1
        self._scanned = g + 1
        return self.sources[k].window(n)

    def __next__(self) -> dict[str, torch.Tensor]:
        # rank r's s-th sequence is global sample start + s * world + r
        sample_ids = self.start + (torch.arange(self.batch_size) + self.samples) * self.world + self.rank
        rows = [self._take(int(g)) for g in sample_ids]
        self.samples += self.batch_size
        ids = torch.from_numpy(np.stack([r.tokens for r in rows]).astype(np.int64))
        doc_ids = document_ids(ids, self.eos_id)
        for b, r in enumerate(rows):
            if r.doc_ids is not None:  # conversation-aligned: EOS padding stays in the last conversation
                doc_ids[b] = torch.from_numpy(r.doc_ids.astype(np.int32))
        loss_mask = torch.from_numpy(np.stack([r.loss for r in rows]))
        return {"input_ids": ids, "doc_ids": doc_ids, "sample_ids": sample_ids, "loss_mask": loss_mask}

    def state_dict(self) -> dict:
        """Layout-independent: the first global sample no rank has produced yet and, per source,
        how many earlier global samples drew it. Every rank returns the same dict (all ranks have
        produced the same number of samples), so any rank's copy restores any layout."""
        boundary = self.start + self.samples * self.world
        drawn = [d + int(c) for d, c in zip(self._drawn, self._counts(self._scanned, boundary))]
        return {"global_samples": boundary, "source_samples": drawn, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"global_samples", "source_samples"} - set(state)
        if missing:
            raise DataError(f"loader state lacks {sorted(missing)} (has {sorted(state)}): it was written by an "
                            f"older rnd1 whose data order depended on the world size; start a new run")
        if len(state["source_samples"]) != len(self.sources):
            raise DataError(f"loader state has {len(state['source_samples'])} sources, this run has "
                            f"{len(self.sources)}")
        self.start = self._scanned = int(state["global_samples"])
        self._drawn = [int(n) for n in state["source_samples"]]
        self.samples = 0

    def epochs(self) -> list[int]:
        """Per source: the epoch of the next window it hands out (as far as this rank has counted)."""
        return [d // s.num_windows for d, s in zip(self._drawn, self.sources)]


def document_ids(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the document each token belongs to within its row: the EOS closing a document
    belongs to it, the next token starts a new one."""
    is_eos = (ids == eos_id).to(torch.int32)
    return (torch.cumsum(is_eos, dim=1) - is_eos).to(torch.int32)
