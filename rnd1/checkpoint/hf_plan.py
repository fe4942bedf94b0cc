"""How many bytes each rank reads of a Hugging Face checkpoint, from a config and a layout alone.

Why a pure function: the sliced import (``rnd1.checkpoint.hf.load_state_dict_from_hf``) reads on
each rank only the rows that rank keeps, so the read volume per rank is a property of the layout,
not of any file. A memory / start-up estimator has to state it before the job runs (at 30B on 64
ranks: ~1 GB per rank instead of ~61 GB on every rank), with no checkpoint and no process group
at hand. The arithmetic is the loader's own: the same name mapping (``_map_name``), the same
per-piece reads (``_Piece.source``; per-expert tensors counted in bulk by its rule, an expert is
read whole by the ranks whose rows include it) and torch's own row ranges (``rows_at``) for the placements
``rnd1.parallel`` gives (see ``layout_placements``), so a test can hold the prediction equal to
the bytes the loader counts.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from rnd1.checkpoint.hf import MASK_EMBEDDING, _hf_names, _map_name, rows_at
from rnd1.model.config import ModelConfig


@dataclass(frozen=True)
class HFReadPlan:
    """Bytes of tensor data each rank reads with the sliced import (``per_rank[r]``, as
    ``ReadStats.bytes_read`` counts them), and the whole checkpoint's tensor bytes: what every
    rank read before, and still reads on the full-read paths (``copy_fn``)."""

    per_rank: tuple[int, ...]
    checkpoint_bytes: int

    @property
    def max_per_rank(self) -> int:
        return max(self.per_rank)


def layout_placements(name: str, world_size: int, ep: int, dp_shard: int, dp_replicate: int, rank: int):
    """(mesh shape, coordinate of ``rank``, placements) of parameter ``name`` as
    ``rnd1.parallel`` lays it out (mesh ``dp_replicate x dp_shard/ep x ep``, ranks row-major):
    dense parameters FSDP-sharded over ``dp_shard`` and replicated over ``dp_replicate``; stacked
    experts with ``ep > 1`` EP-sharded over ``ep`` and, when ``dp_shard > ep``, FSDP-sharded over
    ``dp_shard/ep`` (torch writes that as ``_StridedShard(0, split_factor=ep)`` before the EP
    ``Shard(0)``); with ``ep == 1`` experts are dense parameters."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    rep, shard = divmod(rank, dp_shard)
    if world_size == 1:
        return (1,), (0,), (Replicate(),)
    if ep == 1 or ".mlp.experts." not in name:
        return (dp_replicate, dp_shard), (rep, shard), (Replicate(), Shard(0))
    fsdp = dp_shard // ep
    outer = _StridedShard(0, split_factor=ep) if fsdp > 1 else Replicate()
    return (dp_replicate, fsdp, ep), (rep, shard // ep, shard % ep), (Replicate(), outer, Shard(0))


def _check_layout(cfg: ModelConfig, world_size: int, ep: int, dp_shard: int, dp_replicate: int) -> int:
    if dp_shard == -1:
        dp_shard = world_size // dp_replicate if dp_replicate > 0 else 0
    if world_size < 1 or dp_replicate < 1 or ep < 1 or dp_replicate * dp_shard != world_size:
        raise ValueError(f"layout: dp_replicate {dp_replicate} x dp_shard {dp_shard} != world size {world_size}")
    if dp_shard % ep:
        raise ValueError(f"layout: ep {ep} must divide dp_shard {dp_shard}")
    if ep > 1 and cfg.num_experts % ep:
        raise ValueError(f"layout: {cfg.num_experts} experts cannot be split over ep {ep}")
    return dp_shard


def hf_read_plan(cfg: ModelConfig, *, world_size: int, ep: int = 1, dp_shard: int = -1, dp_replicate: int = 1,
                 dtype: torch.dtype = torch.bfloat16) -> HFReadPlan:
    """Bytes each rank would read importing a checkpoint of ``cfg`` stored in ``dtype`` in the
    released layout (per-expert tensors, what ``save_pretrained`` writes) under a layout of
    ``world_size`` ranks (``dp_shard`` -1: world / dp_replicate). No files, no process group:
    the model is built on the meta device for its parameter shapes."""
    from rnd1.model.qwen3 import Qwen3

    dp_shard = _check_layout(cfg, world_size, ep, dp_shard, dp_replicate)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Qwen3(cfg).named_parameters()}
    item = torch.empty((), dtype=dtype).element_size()
    rows = []  # (checkpoint shape, piece) read by rows
    experts: dict[str, list[tuple[int, int]]] = defaultdict(list)  # stacked name -> (expert, numel)
    total = 0
    for name, shape in shapes.items():
        if name == MASK_EMBEDDING:
            continue
        for hf_name, _e in _hf_names(name, shape):
            pieces, hf_shape = _map_name(hf_name, shapes, cfg)
            total += math.prod(hf_shape)
            for p in pieces:
                if p.expert is None:
                    rows.append((hf_shape, p))
                else:  # read whole by the ranks whose rows include it (_Piece.source)
                    experts[p.name].append((p.expert, math.prod(hf_shape)))
    # an expert count per range: 64 ranks x 18k per-expert tensors at 30B, summed in prefix sums
    ids = {n: [e for e, _ in sorted(es)] for n, es in experts.items()}
    prefix = {n: list(itertools.accumulate((k for _, k in sorted(es)), initial=0)) for n, es in experts.items()}
    per_rank = []
    for rank in range(world_size):
        windows = {n: _rows(s, _layout_key(n, world_size, ep, dp_shard, dp_replicate, rank)) for n, s in shapes.items()}
        read = sum(_numel(hf_shape, src) for hf_shape, p in rows if (src := p.source(windows[p.name])) is not None)
        for n, e in ids.items():
            lo, hi = windows[n]
            read += prefix[n][bisect.bisect_left(e, hi)] - prefix[n][bisect.bisect_left(e, lo)]
        per_rank.append(read * item)
    return HFReadPlan(tuple(per_rank), total * item)


def _layout_key(name, world_size, ep, dp_shard, dp_replicate, rank) -> tuple:
    mesh, coord, placements = layout_placements(name, world_size, ep, dp_shard, dp_replicate, rank)
    return mesh, coord, tuple(placements)


@functools.lru_cache(maxsize=None)
def _rows(shape: tuple, key: tuple) -> tuple[int, int]:
    """``rows_at`` cached: at 30B the ~580 parameters come in a handful of shapes and layouts."""
    return rows_at(shape, *key)


def _numel(shape: tuple, src: tuple[slice, ...]) -> int:
    """Elements of ``tensor[src]`` for a tensor of ``shape`` (slices on the leading dims)."""
    n = 1
    for i, size in enumerate(shape):
        n *= len(range(*src[i].indices(size))) if i < len(src) else size
    return n
