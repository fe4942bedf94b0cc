"""Every attention pattern the project uses, each in two forms: a dense boolean mask for SDPA and
a ``mask_mod`` for FlexAttention.

A pattern is a small description (document ids, a block size, positions), not a mask. The model
turns it into whatever its attention backend needs (``rnd1.model.attention``), once per batch:

- ``dense()``: bool [B or 1, 1, Lq, Lk], True where query i may attend key j. What SDPA takes;
  O(L^2) bytes, and on a GPU it rules out the flash kernel.
- ``mask_mod(b, h, q, kv)``: the same predicate one element at a time, for
  ``torch.nn.attention.flex_attention.create_block_mask``. The BlockMask it yields stores, per
  128 x 128 tile, only whether the tile is empty, full or partial (O((L/128)^2)), and
  FlexAttention skips empty tiles.

The two forms are written side by side so a reader can check that they say the same thing; the
tests check it for every pattern.

Worked example, block diffusion at L = 4, blocks of 2 (``TwoStream``; the [x_t | x0] stream of
``rnd1.diffusion.block``), rows are queries, columns keys::

              x_t: 0 1 2 3   x0: 0 1 2 3
    x_t 0          1 1 . .       . . . .     a noisy block sees itself ...
    x_t 2          . . 1 1       1 1 . .     ... and the clean blocks before it
    x0  0          . . . .       1 1 . .     the clean half is block-causal
    x0  2          . . . .       1 1 1 1
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

PATTERN_KINDS = ("documents", "two_stream", "block_causal", "explicit")


# ----------------------------------------------------------------------------- dense builders
def document_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, L, L]: True where query i may attend key j (same document, and
    j <= i when causal)."""
    mask = doc_ids[:, :, None] == doc_ids[:, None, :]
    if causal:
        L = doc_ids.shape[1]
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    return mask[:, None]


def block_ids(length: int, block_size: int, device=None) -> torch.Tensor:
    return torch.arange(length, device=device) // block_size


def two_stream_mask(length: int, block_size: int, doc_ids: torch.Tensor | None = None,
                    device=None) -> torch.Tensor:
    """Boolean SDPA mask [1 or B, 1, 2L, 2L] over [x_t | x0] (True: may attend); see the table in
    ``rnd1.diffusion.block``. ``doc_ids`` [B, L] additionally keeps packed documents apart."""
    blk = block_ids(length, block_size, device)
    same = blk[:, None] == blk[None, :]
    earlier = blk[None, :] < blk[:, None]
    upto = blk[None, :] <= blk[:, None]
    top = torch.cat([same, earlier], dim=1)  # noisy queries
    bottom = torch.cat([torch.zeros_like(same), upto], dim=1)  # clean queries
    mask = torch.cat([top, bottom], dim=0)[None]
    if doc_ids is not None:
        d = torch.cat([doc_ids, doc_ids], dim=1).to(mask.device)
        mask = mask & (d[:, :, None] == d[:, None, :])
    return mask[:, None]


def block_causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, block_size: int,
                      k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Inference: [B, 1, Lq, Lk] True where the key's block is not after the query's (one sequence:
    committed blocks clean, the current one noisy). ``k_valid`` [B, Lk] drops padding keys."""
    qb = q_positions // block_size
    kb = k_positions // block_size
    mask = kb[:, None, :] <= qb[:, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    return mask[:, None]


# ----------------------------------------------------------------------------- patterns
class _Movable:
    def to(self, device):
        """A copy with every tensor (and ``device``, where the pattern has one) on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if any(f.name == "device" for f in fields(self)):
            moved["device"] = device
        return replace(self, **moved)


@dataclass(frozen=True, eq=False)
class Documents(_Movable):
    """Packed documents (``doc_ids`` [B, L]): attend within one's document, causally or not."""

    doc_ids: torch.Tensor
    causal: bool
    kind = "documents"

    @property
    def shape(self) -> tuple[int | None, int, int]:
        B, L = self.doc_ids.shape
        return B, L, L

    def dense(self) -> torch.Tensor:
        return document_mask(self.doc_ids, self.causal)

    def mask_mod(self):
        doc, causal = self.doc_ids, self.causal

        def same_document(b, h, q, kv):
            ok = doc[b, q] == doc[b, kv]
            return ok & (kv <= q) if causal else ok

        return same_document

    def cache_key(self) -> tuple | None:
        return None  # depends on the batch's documents


@dataclass(frozen=True, eq=False)
class TwoStream(_Movable):
    """Block diffusion's [x_t | x0] stream of 2L positions (``rnd1.diffusion.block``); block sizes
    need not divide L (the last block is shorter)."""

    length: int
    block_size: int
    doc_ids: torch.Tensor | None = None
    device: torch.device | str | None = None
    kind = "two_stream"

    @property
    def shape(self) -> tuple[int | None, int, int]:
        B = None if self.doc_ids is None else self.doc_ids.shape[0]
        return B, 2 * self.length, 2 * self.length

    def dense(self) -> torch.Tensor:
        return two_stream_mask(self.length, self.block_size, self.doc_ids, device=self.device)

    def mask_mod(self):
        L, bs, doc = self.length, self.block_size, self.doc_ids

        def two_stream(b, h, q, kv):
            q_noisy, kv_noisy = q < L, kv < L
            qi, ki = torch.where(q_noisy, q, q - L), torch.where(kv_noisy, kv, kv - L)
            qb, kb = qi // bs, ki // bs
            ok = (q_noisy & kv_noisy & (qb == kb)) | (q_noisy & ~kv_noisy & (kb < qb)) \
                | (~q_noisy & ~kv_noisy & (kb <= qb))
            return ok if doc is None else ok & (doc[b, qi] == doc[b, ki])

        return two_stream

    def cache_key(self) -> tuple | None:
        return None if self.doc_ids is not None else ("two_stream", self.length, self.block_size)


@dataclass(frozen=True, eq=False)
class BlockCausal(_Movable):
    """Inference over one sequence, block by block (``block_causal_mask``): ``q_positions`` [B, Lq],
    ``k_positions`` [B, Lk], optional ``k_valid`` [B, Lk]. ``BlockCausal.prefix`` is the common
    case (queries and keys both 0..L-1), whose BlockMask depends on the shape only and is reused."""

    block_size: int
    q_positions: torch.Tensor
    k_positions: torch.Tensor
    k_valid: torch.Tensor | None = None
    shape_only: bool = False
    kind = "block_causal"

    @classmethod
    def prefix(cls, length: int, block_size: int, batch: int = 1, device=None) -> "BlockCausal":
        pos = torch.arange(length, device=device).expand(batch, length)
        return cls(block_size, pos, pos, shape_only=True)

    @property
    def shape(self) -> tuple[int | None, int, int]:
        (B, Lq), Lk = self.q_positions.shape, self.k_positions.shape[1]
        return (None if self.shape_only else B), Lq, Lk

    def dense(self) -> torch.Tensor:
        mask = block_causal_mask(self.q_positions, self.k_positions, self.block_size, self.k_valid)
        return mask[:1] if self.shape_only else mask

    def mask_mod(self):
        qpos, kpos, valid, bs = self.q_positions, self.k_positions, self.k_valid, self.block_size
        if self.shape_only:
            return lambda b, h, q, kv: kv // bs <= q // bs

        def block_causal(b, h, q, kv):
            ok = kpos[b, kv] // bs <= qpos[b, q] // bs
            return ok if valid is None else ok & valid[b, kv]

        return block_causal

    def cache_key(self) -> tuple | None:
        Lq, Lk = self.shape[1:]
        return ("block_causal", Lq, Lk, self.block_size) if self.shape_only else None


@dataclass(frozen=True, eq=False)
class Explicit(_Movable):
    """A boolean mask a caller built ([B or 1, 1, Lq, Lk], True: may attend), for patterns the
    project has no description of. The flex path reads it element by element, so it saves the
    skipped tiles' compute, not the mask's memory."""

    mask: torch.Tensor
    kind = "explicit"

    def __post_init__(self):
        if self.mask.dtype != torch.bool or self.mask.dim() != 4 or self.mask.shape[1] != 1:
            raise ValueError(f"attn_mask must be a bool tensor [B or 1, 1, Lq, Lk]; got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")

    @property
    def shape(self) -> tuple[int | None, int, int]:
        B, _, Lq, Lk = self.mask.shape
        return (None if B == 1 else B), Lq, Lk

    def dense(self) -> torch.Tensor:
        return self.mask

    def mask_mod(self):
        m = self.mask[:, 0]
        if m.shape[0] == 1:
            m = m[0]
            return lambda b, h, q, kv: m[q, kv]
        return lambda b, h, q, kv: m[b, q, kv]

    def cache_key(self) -> tuple | None:
        return None


Pattern = Documents | TwoStream | BlockCausal | Explicit
