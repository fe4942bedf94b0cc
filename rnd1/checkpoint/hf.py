"""Hugging Face safetensors checkpoints <-> rnd1's ``Qwen3``.

Import streams one safetensors shard at a time: every header is read and checked against the
model first (names, shapes, coverage; nothing is materialised if the checkpoint does not fit),
then the data of each file is copied into the parameters piece by piece. Per-expert HF tensors
(``mlp.experts.{e}.gate_proj.weight [Im, H]``) land in slice ``e`` of our stacked
``mlp.experts.gate_proj [E, Im, H]``; the stacked transformers-5 in-memory layout
(``mlp.experts.gate_up_proj [E, 2Im, H]``) is accepted as well.

Each rank reads only the bytes it keeps (``safe_open(...).get_slice(name)[rows]``): the rows of
dim 0 its FSDP shard holds, and of the per-expert tensors only those of its own EP experts (the
others are never touched). At 30B on 64 ranks that is ~1/64 of the checkpoint per rank instead of
all ~61 GB on every rank. ``load_state_dict_from_hf`` returns the bytes read (``ReadStats``);
``rnd1.checkpoint.hf_plan.hf_read_plan`` predicts them from a config and a layout, without files.

Export writes what released checkpoints look like (per-expert names, ``model.`` prefix, sharded
safetensors + index, config.json) into a temporary folder renamed into place at the end, so a crash
never leaves a half-written export that looks complete. Sharded (FSDP / EP) parameters are not
gathered whole on every rank: rank 0 receives, tensor by output tensor (one expert at a time), the
rows each holder sends it, already in the output dtype, so rank 0 holds at most one output shard
plus the tensor being assembled and the other ranks at most one of their own pieces.

The model's separate [MASK] input embedding (``Qwen3.mask_embedding``) has no tensor of its own in
these files: import fills it from the embedding table's mask row, export writes it into that row.
Exports therefore stay plain Qwen3 checkpoints, and what they compute for the mask id is what the
trained model did (with a tied head the head's mask row becomes the learned embedding too: the
mask id is never a target, and samplers exclude it).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rnd1.checkpoint.fsio import fsync_path
from rnd1.model.config import ModelConfig, ModelConfigError
from rnd1.model.qwen3 import ATTENTION_MODES, Qwen3

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Called with (our parameter name, the full tensor as stored in the checkpoint); copies the part
# the caller owns (e.g. its FSDP/EP shard) into its parameter.
CopyFn = Callable[[str, torch.Tensor], None]

_EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_GATE_UP_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.gate_up_proj$")
_ROUTER_RE = re.compile(r"^layers\.(\d+)\.mlp\.gate\.weight$")
_MAX_LISTED = 5
MASK_EMBEDDING = "mask_embedding"  # Qwen3's separate [MASK] row: stored as the table's mask row


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint folder that cannot be read into (or written from) the model."""


# ----------------------------------------------------------------------------- config
def read_hf_config(path: str | Path) -> dict:
    """Parsed ``config.json`` of a checkpoint folder (or the file itself), with errors that name
    the file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        path, cfg_file = path.parent, path
    elif not path.is_dir():
        raise HFCheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint folder)")
    else:
        cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise HFCheckpointError(f"{path}: no {CONFIG_NAME} (expected a Hugging Face checkpoint folder)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{cfg_file}: malformed JSON ({e})") from e
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def model_config_from_dict(hf: dict, where: str | Path, **overrides) -> ModelConfig:
    """``ModelConfig`` of a parsed config.json. ``model_type`` ``rnd1`` (RND1's release layout,
    which our ``rnd1_release`` export writes) is a Qwen3-MoE with other names for the same fields."""
    if hf.get("model_type") == "rnd1":
        hf = {**hf, "model_type": "qwen3_moe"}
    try:
        return ModelConfig.from_hf_config(hf, **overrides)
    except (ModelConfigError, KeyError, TypeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise HFCheckpointError(f"{where}: {what}") from e


def model_config_from_hf(path: str | Path, **overrides) -> ModelConfig:
    """``ModelConfig`` of a checkpoint folder (``overrides`` e.g. ``mask_token_id=...``)."""
    path = Path(path)
    return model_config_from_dict(read_hf_config(path), path if path.suffix == ".json" else path / CONFIG_NAME,
                                  **overrides)


# ----------------------------------------------------------------------------- names
@dataclass(frozen=True)
class _Piece:
    """Where (part of) one checkpoint tensor goes: our parameter, expert slot (None: the whole
    parameter), for a fused gate_up tensor which rows of dim 1 to take, and for the [MASK]
    embedding which row of the table (dim 0)."""

    name: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    row: int | None = None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.row is not None:
            return t[self.row]
        return t if self.rows is None else t[:, self.rows[0]:self.rows[1]]

    def source(self, window: tuple[int, int]) -> tuple[slice, ...] | None:
        """The part of the checkpoint tensor to read for a rank that keeps rows ``window`` =
        [lo, hi) of dim 0 of our parameter (None: nothing). Dim 0 of the parameter is the
        checkpoint tensor's dim 0, except for an expert (a whole tensor, read only by the ranks
        that own it) and the [MASK] row (dim 0 of our [H] row is dim 1 of the table)."""
        lo, hi = window
        if self.expert is not None:
            return (slice(None),) if lo <= self.expert < hi else None
        if lo >= hi:
            return None
        if self.row is not None:
            return slice(self.row, self.row + 1), slice(lo, hi)
        if self.rows is not None:
            return slice(lo, hi), slice(*self.rows)
        return (slice(lo, hi),)


def _map_name(hf_name: str, shapes: dict[str, torch.Size], cfg: ModelConfig) -> tuple[list[_Piece], tuple] | None:
    """(pieces, expected checkpoint shape) for one checkpoint tensor, ``([], ())`` for a tensor
    that is deliberately ignored, or None when it belongs to nothing in the model."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    if name == "lm_head.weight" and cfg.tie_word_embeddings and name not in shapes:
        return [], ()  # tied: the head is the embedding
    if name == "embed_tokens.weight" and name in shapes and MASK_EMBEDDING in shapes:
        return [_Piece(name), _Piece(MASK_EMBEDDING, row=cfg.mask_token_id)], tuple(shapes[name])
    if name in shapes:
        return [_Piece(name)], tuple(shapes[name])
    if m := _EXPERT_RE.match(name):
        ours = f"layers.{m[1]}.mlp.experts.{m[3]}"
        if ours in shapes and int(m[2]) < shapes[ours][0]:
            return [_Piece(ours, expert=int(m[2]))], tuple(shapes[ours][1:])
    if m := _GATE_UP_RE.match(name):
        gate, up = f"layers.{m[1]}.mlp.experts.gate_proj", f"layers.{m[1]}.mlp.experts.up_proj"
        if gate in shapes and up in shapes:
            E, Im, H = shapes[gate]
            return [_Piece(gate, rows=(0, Im)), _Piece(up, rows=(Im, 2 * Im))], (E, 2 * Im, H)
    if m := _ROUTER_RE.match(name):
        ours = f"layers.{m[1]}.mlp.router.weight"
        if ours in shapes:
            return [_Piece(ours)], tuple(shapes[ours])
    return None


def _units(name: str, shapes: dict[str, torch.Size]) -> set:
    """The pieces a parameter is made of: its experts when stacked, else just itself."""
    return set(range(shapes[name][0])) if ".mlp.experts." in name else {None}


def _listing(items: list, what: str) -> str:
    head = ", ".join(str(x) for x in items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {what}: {head}{more}"


# ----------------------------------------------------------------------------- reading
def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (from the index when sharded)."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: malformed index (expected JSON with a 'weight_map' "
                                    f"object): {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HFCheckpointError(f"{index}: lists shard files that do not exist: {_listing(missing, 'files')}")
        return files
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise HFCheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors checkpoints "
                            f"are supported)")


def _read_headers(files: list[Path]) -> list[tuple[Path, dict[str, tuple]]]:
    out = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                out.append((f, {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}))
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise HFCheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return out


@dataclass
class _Plan:
    per_file: list[tuple[Path, dict[str, list[_Piece]]]]
    pieces_left: dict[str, int]  # pieces still to arrive per parameter


def _plan(path: Path, shapes: dict[str, torch.Size], cfg: ModelConfig) -> _Plan:
    """Check every checkpoint header against the model; raise one error listing all problems."""
    headers = _read_headers(checkpoint_files(path))
    unexpected, misshaped, duplicated = [], [], []
    covered: dict[str, set] = defaultdict(set)
    per_file = []
    for f, header in headers:
        assign = {}
        for hf_name, shape in header.items():
            mapped = _map_name(hf_name, shapes, cfg)
            if mapped is None:
                unexpected.append(hf_name)
                continue
            pieces, want = mapped
            if not pieces:
                continue
            if shape != want:
                misshaped.append(f"{hf_name} {list(shape)} (expected {list(want)})")
                continue
            for p in pieces:
                units = _units(p.name, shapes) if p.expert is None else {p.expert}
                if covered[p.name] & units:
                    duplicated.append(hf_name)
                covered[p.name] |= units
            assign[hf_name] = pieces
        per_file.append((f, assign))
    missing = []
    for name in shapes:
        lacking = _units(name, shapes) - covered[name]
        if lacking == {None}:
            missing.append(name)
        elif lacking:
            missing.append(f"{name} (experts {sorted(lacking)[:8]}{'...' if len(lacking) > 8 else ''})")
    problems = []
    if missing:
        problems.append(_listing(missing, "missing parameters"))
    if misshaped:
        problems.append(_listing(misshaped, "tensors with the wrong shape"))
    if unexpected:
        problems.append(_listing(unexpected, "unexpected tensors"))
    if duplicated:
        problems.append(_listing(duplicated, "tensors given more than once"))
    if problems:
        raise HFCheckpointError(f"{path}: checkpoint does not match the model ({cfg.num_hidden_layers} "
                                f"layers, {cfg.num_experts} experts): " + "; ".join(problems))
    left: dict[str, int] = defaultdict(int)
    for _f, assign in per_file:
        for pieces in assign.values():
            for p in pieces:
                left[p.name] += 1
    return _Plan(per_file, dict(left))


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


# ----------------------------------------------------------------------------- who holds which rows
def _dim0_only(placements) -> bool:
    """Placements that cut dim 0 only (FSDP's Shard(0), EP's Shard(0), FSDP over EP's
    _StridedShard(0), HSDP's Replicate): a rank's part is then a range of dim-0 rows."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return all(isinstance(pl, Replicate) or (isinstance(pl, (Shard, _StridedShard)) and pl.dim == 0)
               for pl in placements)


def rows_at(shape, mesh_shape, coordinate, placements) -> tuple[int, int]:
    """Rows [lo, hi) of dim 0 that the rank at ``coordinate`` of a mesh of ``mesh_shape`` holds of
    a tensor of global ``shape`` laid out by ``placements`` (dim 0 only). torch's own arithmetic
    (the box DCP saves for that rank), so uneven shards come out as torch pads them; no process
    group needed, so the exporter can ask for every rank and the read planner for any layout."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    local, offset = _compute_local_shape_and_global_offset(tuple(shape), tuple(mesh_shape), list(coordinate),
                                                           placements)
    return offset[0], offset[0] + local[0]


def _param_window(p: torch.Tensor) -> tuple[int, int] | None:
    """Rows [lo, hi) of dim 0 of parameter ``p`` that this rank keeps: all of a plain tensor; of a
    DTensor cut on dim 0 only, its box from torch's ``compute_local_shape_and_global_offset``.
    None for any other layout, whose tensors are then read whole (as before)."""
    if p.dim() == 0:
        return None
    if not _is_dtensor(p):
        return 0, p.shape[0]
    if not _dim0_only(p.placements):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(local) != tuple(p.to_local().shape):  # e.g. a rank outside the mesh: read whole, as before
        return None
    return offset[0], offset[0] + local[0]


@dataclass
class ReadStats:
    """What one rank read from a checkpoint's files, returned by ``load_state_dict_from_hf`` so a
    launcher can report it: ``bytes_read`` of tensor data (the slices it keeps; whole tensors on
    the full-read paths), ``reads`` (slices or whole tensors read) and ``skipped`` (checkpoint
    tensor pieces this rank does not keep and never touched, e.g. other EP ranks' experts)."""

    bytes_read: int = 0
    reads: int = 0
    skipped: int = 0

    def add(self, t: torch.Tensor) -> None:
        self.bytes_read += t.numel() * t.element_size()
        self.reads += 1


def _read_rows(fh, hf_name: str, piece: _Piece, param: torch.Tensor, window: tuple[int, int],
               stats: ReadStats) -> None:
    """Read only the part of checkpoint tensor ``hf_name`` that this rank keeps of ``piece`` and
    copy it into the parameter's local tensor (no full tensor, no communication)."""
    src = piece.source(window)
    if src is None:
        stats.skipped += 1
        return
    t = fh.get_slice(hf_name)[src]
    stats.add(t)
    local = param.to_local() if _is_dtensor(param) else param
    dest = local if piece.expert is None else local[piece.expert - window[0]]
    with torch.no_grad():
        dest.copy_(t.reshape(dest.shape))


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Default per-tensor copy: plain parameters take the tensor; a DTensor keeps the slice its
    placements give this rank (computed locally from the full tensor, no communication)."""
    with torch.no_grad():
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh,
                                      param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)


def _check_config(path: Path, model: torch.nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        return
    disk = model_config_from_hf(path, mask_token_id=cfg.mask_token_id)
    diffs = [f"{k}={getattr(disk, k)!r} (model: {getattr(cfg, k)!r})"
             for k in ModelConfig.__dataclass_fields__
             if k not in ("mask_token_id", "max_position_embeddings", "router_aux_loss_coef")
             and getattr(disk, k) != getattr(cfg, k)]
    if diffs:
        raise HFCheckpointError(f"{path / CONFIG_NAME}: does not describe this model: " + ", ".join(diffs))


def load_state_dict_from_hf(path: str | Path, model: torch.nn.Module, *,
                            copy_fn: CopyFn | None = None) -> ReadStats:
    """Load a HF checkpoint into an existing model, one shard file open at a time; returns what
    this rank read (``ReadStats``).

    Without ``copy_fn`` every rank reads only the rows it keeps: plain parameters are filled in
    place, DTensor parameters cut on dim 0 (FSDP, EP, EP x FSDP, HSDP) take the rows of their own
    shard and, of per-expert tensors, only their own experts (the others are not read at all).
    DTensors laid out otherwise read whole tensors and keep their own slice. With
    ``copy_fn(our_name, full_tensor)`` the caller copies what it owns (the model may then be on
    the meta device); every tensor is read whole, and per-expert tensors are first assembled into
    the full stacked tensor, which is handed over once complete."""
    path = Path(path)
    _check_config(path, model)
    cfg = model.config if isinstance(getattr(model, "config", None), ModelConfig) else model_config_from_hf(path)
    # canonical names: a trainer loads into blocks already wrapped for activation checkpointing
    # (and maybe compilation), whose parameter names carry the wrappers' segments
    plan = _plan(path, {canonical_name(n): p.shape for n, p in model.named_parameters()}, cfg)
    return _load(plan, path, model, copy_fn)


def _load(plan: _Plan, path: Path, model: torch.nn.Module, copy_fn: CopyFn | None) -> ReadStats:
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in params.items()}
    if copy_fn is None:
        meta = [n for n, p in params.items() if p.is_meta]
        if meta:
            raise HFCheckpointError(f"cannot load {path} into parameters on the meta device "
                                    f"({_listing(meta, 'parameters')}): materialise the model "
                                    f"(to_empty) first or pass copy_fn")
    # the rows of each parameter this rank keeps; parameters without one get whole tensors
    windows = {} if copy_fn is not None else {n: w for n, p in params.items()
                                              if (w := _param_window(p)) is not None}
    stats = ReadStats()
    left = dict(plan.pieces_left)
    buffers: dict[str, torch.Tensor] = {}

    def deliver(p: _Piece, t: torch.Tensor):
        direct = copy_fn is None and not _is_dtensor(params[p.name])
        if direct and p.expert is None:
            with torch.no_grad():
                params[p.name].copy_(t)
            return
        if direct:
            with torch.no_grad():
                params[p.name][p.expert].copy_(t)
            return
        if p.expert is None:
            full = t
        else:
            full = buffers.setdefault(p.name, torch.empty(shapes[p.name], dtype=t.dtype))
            full[p.expert].copy_(t)
        left[p.name] -= 1
        if left[p.name] == 0:
            buffers.pop(p.name, None)
            (copy_fn or (lambda n, x: copy_full_into(params[n], x)))(p.name, full)

    for f, assign in plan.per_file:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for hf_name, pieces in assign.items():
                    if all(p.name in windows for p in pieces):
                        for p in pieces:
                            _read_rows(fh, hf_name, p, params[p.name], windows[p.name], stats)
                        continue
                    t = fh.get_tensor(hf_name)
                    stats.add(t)
                    for p in pieces:
                        deliver(p, p.take(t))
        except HFCheckpointError:
            raise
        except Exception as e:
            raise HFCheckpointError(f"{f}: cannot read tensor data (truncated or corrupt?): {e}") from e
    return stats


def load_pretrained(path: str | Path, attention: str = "causal", dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", mask_token_id: int | None = None) -> Qwen3:
    """A ``Qwen3`` with the weights of a HF Qwen3 / Qwen3-MoE checkpoint folder. Built on the
    meta device and checked against every header before any weight memory is allocated."""
    if attention not in ATTENTION_MODES:
        raise HFCheckpointError(f"attention {attention!r} unknown; expected one of {ATTENTION_MODES}")
    path = Path(path)
    overrides = {} if mask_token_id is None else {"mask_token_id": mask_token_id}
    cfg = model_config_from_hf(path, **overrides)
    with torch.device("meta"):
        model = Qwen3(cfg, attention_mode=attention).to(dtype)
    plan = _plan(path, {n: p.shape for n, p in model.named_parameters()}, cfg)  # fail before allocating
    model.to_empty(device=device)
    _load(plan, path, model, None)
    return model.eval()


# ----------------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10^9) or "512MiB" (2^20), HF's convention."""
    from rnd1.tools.sizes import parse_bytes

    try:
        value = parse_bytes(size)
    except ValueError:
        raise HFCheckpointError(f"max_shard_size {size!r}: expected bytes as an int or a string "
                                f"like '5GB' or '500MiB'") from None
    if value <= 0:
        raise HFCheckpointError(f"max_shard_size {size!r}: must be > 0 bytes")
    return value


# Wrappers that torch.compile and activation checkpointing put around blocks; they add a path
# segment to parameter names but are not part of the model.
_WRAPPER_SEGMENT = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module)(?=\.)")


def canonical_name(name: str) -> str:
    """``layers.0._orig_mod._checkpoint_wrapped_module.mlp...`` -> ``layers.0.mlp...``"""
    return _WRAPPER_SEGMENT.sub("", name).lstrip(".")


def _hf_names(name: str, shape: torch.Size) -> list[tuple[str, int | None]]:
    """HF tensor names for one of our parameters: (name, expert index or None)."""
    name = canonical_name(name)
    if m := re.match(r"^(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name):
        return [(f"model.{m[1]}.{e}.{m[2]}.weight", e) for e in range(shape[0])]
    if m := re.match(r"^(layers\.\d+\.mlp)\.router\.weight$", name):
        return [(f"model.{m[1]}.gate.weight", None)]
    if name == "lm_head.weight":
        return [(name, None)]
    return [(f"model.{name}", None)]


def _sources(p: torch.Tensor) -> list[tuple[int, int, int]]:
    """(global rank, lo, hi) of the ranks rank 0 gathers parameter ``p`` from: one per distinct
    row range (the lowest rank holding it; HSDP replicas hold the same rows), in row order. A
    plain tensor is rank 0's own; a DTensor whose mesh lacks rank 0 (an EP group of another
    replica) is gathered from rank 0's group, so this rank sends nothing ([]). Every rank derives
    the same list from the mesh alone: no communication, no deadlock."""
    if not _is_dtensor(p):
        return [(0, 0, p.shape[0])]
    ranks = p.device_mesh.mesh
    if not bool((ranks == 0).any()):
        return []
    held: dict[tuple[int, int], int] = {}
    for coord in itertools.product(*(range(n) for n in ranks.shape)):
        lo, hi = rows_at(p.shape, ranks.shape, coord, p.placements)
        r = int(ranks[coord])
        if hi > lo and r < held.get((lo, hi), r + 1):
            held[(lo, hi)] = r
    return sorted(((r, lo, hi) for (lo, hi), r in held.items()), key=lambda x: x[1])


def _gather_rows(p: torch.Tensor, a: int, b: int, dtype: torch.dtype, sources, rank: int) -> torch.Tensor | None:
    """Rows [a, b) of parameter ``p`` as a new CPU tensor in ``dtype`` on rank 0 (None elsewhere).
    Each source rank sends its part, already in ``dtype``, point to point: rank 0 allocates only
    the result (plus, on GPUs, one piece's receive buffer), the senders at most their own piece."""
    import torch.distributed as dist

    local = (p.to_local() if _is_dtensor(p) else p).detach()
    out = torch.empty((b - a, *p.shape[1:]), dtype=dtype) if rank == 0 else None
    for r, lo, hi in sources:
        s, e = max(a, lo), min(b, hi)
        if s >= e or rank not in (0, r):
            continue
        mine = local[s - lo:e - lo]
        if rank == r == 0:
            out[s - a:e - a].copy_(mine)
        elif rank == r:
            dist.send(mine.to(dtype).contiguous(), dst=0)
        elif mine.device.type == "cpu":
            dist.recv(out[s - a:e - a], src=r)
        else:  # NCCL moves device tensors only
            buf = torch.empty(out[s - a:e - a].shape, dtype=dtype, device=mine.device)
            dist.recv(buf, src=r)
            out[s - a:e - a].copy_(buf)
    return out


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathers DTensors: every rank must call). Only for DTensors
    cut on other dims than 0, which the export cannot gather row by row."""
    t = p.detach()
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.cpu()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rank0() -> bool:
    return _rank() == 0


class _Exporter:
    """The tensors of an export, one output tensor at a time, in the same order on every rank.
    Parameters cut on dim 0 (or plain) are gathered row range by row range to rank 0 (an expert
    of a stacked parameter is one row); other DTensors fall back to ``full_tensor()``, cached for
    their experts."""

    def __init__(self, params: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None, mask_row, mask_id: int):
        self.params, self.dtype, self.mask_row, self.mask_id = params, dtype, mask_row, mask_id
        self.rank = _rank()
        self.sources: tuple[int, list] | None = None  # (param index, its _sources): one param at a time
        self.cached: tuple[int, torch.Tensor] | None = None

    def tensor(self, i: int, e: int | None) -> torch.Tensor | None:
        """Output tensor of parameter ``i`` (expert ``e``) on rank 0; None on the other ranks."""
        name, p = self.params[i]
        dtype = self.dtype or p.dtype
        if _is_dtensor(p) and not _dim0_only(p.placements):
            return self._from_full(i, e, dtype)
        if self.sources is None or self.sources[0] != i:
            self.sources = (i, _sources(p))
        a, b = (e, e + 1) if e is not None else (0, p.shape[0])
        out = _gather_rows(p, a, b, dtype, self.sources[1], self.rank)
        if out is None:
            return None
        if e is not None:
            return out[0]
        if self.mask_row is not None and canonical_name(name) == "embed_tokens.weight":
            out[self.mask_id] = self.mask_row.to(p.dtype)
        return out

    def _from_full(self, i: int, e: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        name, p = self.params[i]
        if self.cached is None or self.cached[0] != i:
            self.cached = None
            full = _full(p)
            if self.mask_row is not None and canonical_name(name) == "embed_tokens.weight":
                full = full.clone()  # on the CPU _full may share the parameter's storage
                full[self.mask_id] = self.mask_row.to(full.dtype)
            self.cached = (i, full.to(dtype))
        if self.rank != 0:
            return None
        t = self.cached[1] if e is None else self.cached[1][e]
        return t.clone().contiguous()  # own storage: safetensors refuses shared views


def _gather_mask_row(p: torch.Tensor | None) -> torch.Tensor | None:
    """The [MASK] row (``Qwen3.mask_embedding``) on rank 0, in its own dtype (a collective)."""
    if p is None:
        return None
    if _is_dtensor(p) and not _dim0_only(p.placements):
        return _full(p)
    return _gather_rows(p, 0, p.shape[0], p.dtype, _sources(p), _rank())


def save_pretrained(model: Qwen3, path: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, extra_config: dict | None = None, *,
                    extra_files: Iterable[str | Path] = (), extra_json: dict[str, dict] | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` as a HF checkpoint folder that ``transformers`` loads: per-expert names,
    safetensors shards of at most ``max_shard_size`` (+ index), config.json (+ ``extra_config``
    entries), copies of ``extra_files`` (e.g. tokenizer files) and ``extra_json`` ({file name:
    content}, e.g. generation_config.json). Written to a temporary folder and renamed into place.
    Every file gets config.json's mode (safetensors alone would write 0600, unreadable to the
    group that reads the rest). With sharded (DTensor) parameters every rank must call; rank 0
    writes. Nothing is gathered whole: rank 0 receives each output tensor's rows (one expert at a
    time) from the ranks holding them, so its tensor memory stays below one output shard plus one
    output tensor and no rank ever holds the whole model."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise HFCheckpointError(f"save_pretrained: model has no ModelConfig .config (got {type(cfg).__name__})")
    path = Path(path)
    limit = parse_size(max_shard_size)
    extra_files = [Path(f) for f in extra_files]
    for f in extra_files:
        if not f.is_file():
            raise HFCheckpointError(f"save_pretrained: extra file {f} does not exist")
    names = [f.name for f in extra_files] + list(extra_json or {})
    clash = sorted({n for n in names if names.count(n) > 1 or n in (CONFIG_NAME, INDEX_NAME)
                    or n.endswith(".safetensors")})
    if clash:
        raise HFCheckpointError(f"save_pretrained: extra file name {clash[0]!r} is given twice or is "
                                f"one the checkpoint itself writes")
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise HFCheckpointError(f"{path}: already exists and is not empty (pass overwrite=True)")

    # The [MASK] row goes into the table (gathered first: a collective, same order on every rank).
    mask_row = _gather_mask_row({canonical_name(n): p for n, p in model.named_parameters()}.get(MASK_EMBEDDING))
    params = [(n, p) for n, p in model.named_parameters() if canonical_name(n) != MASK_EMBEDDING]
    entries = []  # (hf name, param index, expert, nbytes)
    for i, (name, p) in enumerate(params):
        out_dtype = dtype or p.dtype
        for hf_name, e in _hf_names(name, p.shape):
            numel = p.numel() // p.shape[0] if e is not None else p.numel()
            entries.append((hf_name, i, e, numel * out_dtype.itemsize))
    shards: list[list] = [[]]
    size = 0
    for ent in entries:
        if shards[-1] and size + ent[3] > limit:
            shards.append([])
            size = 0
        shards[-1].append(ent)
        size += ent[3]

    write = _rank0()
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        n = len(shards)
        weight_map, total = {}, 0
        # Rank 0 holds one output shard at a time (plus the tensor it is assembling); the other
        # ranks only send their rows of each tensor (see _Exporter).
        exporter = _Exporter(params, dtype, mask_row, cfg.mask_token_id)
        for s, shard in enumerate(shards):
            fname = WEIGHTS_NAME if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            tensors = {}
            for hf_name, i, e, nbytes in shard:
                t = exporter.tensor(i, e)
                if t is not None:
                    tensors[hf_name] = t
                weight_map[hf_name] = fname
                total += nbytes
            if write:
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        if not write:
            return path
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = cfg.to_hf_config()
        hf_cfg["dtype"] = str(dtype or params[0][1].dtype).removeprefix("torch.")
        hf_cfg.update(extra_config or {})
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        for f in extra_files:
            shutil.copyfile(f, tmp / f.name)  # not copy2: a read-only source must not stay read-only
        mode = (tmp / CONFIG_NAME).stat().st_mode & 0o777  # what open() gives under this umask
        for f in tmp.iterdir():
            f.chmod(mode)
            fsync_path(f)
        fsync_path(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if write and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- export for inference
EXPORT_FORMATS = ("rnd1", "rnd1_release")
GENERATION_CONFIG_NAME = "generation_config.json"
# The files of a Hugging Face tokenizer folder (a model folder holds weights too: those stay).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
RND1_DIFFUSION_STEPS = 256  # RND1Config's and RND1GenerationConfig's default


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export writes besides the weights, computed (and checked) before any file is
    written, so a bad tokenizer or format fails at once and never leaves a partial folder."""

    config: dict  # config.json entries on top of the architecture
    generation: dict  # generation_config.json
    tokenizer: dict  # rnd1_tokenizer.json
    files: tuple[Path, ...]  # tokenizer files copied verbatim

    def save_kwargs(self) -> dict:
        from rnd1.data.tokenizer import TOKENIZER_DESCRIPTOR

        return dict(extra_config=self.config, extra_files=self.files,
                    extra_json={GENERATION_CONFIG_NAME: self.generation, TOKENIZER_DESCRIPTOR: self.tokenizer})


def _json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: malformed JSON ({e})") from e


def _special_ids(tokenizer, folder: Path | None) -> tuple[int, int]:
    """(eos, pad) of the exported model. A Hugging Face tokenizer folder names them in
    tokenizer_config.json (Qwen3: eos <|im_end|> 151645, pad <|endoftext|> 151643, as RND1-Base),
    and what transformers' tokenizer reports for the copied files must be what config.json says.
    Without that file (byte tokenizer, .tiktoken) the tokenizer's own end-of-text is both."""
    eos = pad = tokenizer.eos_id
    cfg_file = folder / "tokenizer_config.json" if folder is not None else None
    if cfg_file is None or not cfg_file.is_file():
        return eos, pad
    tc = _json_file(cfg_file)
    ids = {}
    for key in ("eos_token", "pad_token"):
        tok = tc.get(key) if isinstance(tc, dict) else None
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok is None:
            continue
        if tok not in tokenizer.special_tokens:
            raise HFCheckpointError(f"{cfg_file}: {key} {tok!r} is not a special token of the tokenizer "
                                    f"(expected one of {', '.join(sorted(tokenizer.special_tokens)[:4])}, ...)")
        ids[key] = tokenizer.special_tokens[tok]
    eos = ids.get("eos_token", eos)
    return eos, ids.get("pad_token", eos)


def _tokenizer_files(source: Path) -> tuple[tuple[Path, ...], str | None]:
    """(files to copy, the descriptor's ``file``) for a tokenizer path: a .tiktoken file, a HF
    tokenizer (or model) folder, or a folder rnd1 exported earlier (which may hold either)."""
    from rnd1.data.tokenizer import TOKENIZER_DESCRIPTOR

    if source.is_file():
        return (source,), source.name
    desc = source / TOKENIZER_DESCRIPTOR
    recorded = _json_file(desc) if desc.is_file() else None
    named = recorded.get("file") if isinstance(recorded, dict) else None
    files = [source / n for n in HF_TOKENIZER_FILES if (source / n).is_file()]
    if named:
        files.append(source / named)
    return tuple(files), named


def plan_export(mcfg: ModelConfig, fmt: str, tokenizer, tokenizer_source: str | Path | None, *,
                attention: str, objective: str | None, block_size: int = 0) -> ExportPlan:
    """What makes an exported folder a complete checkpoint for ``fmt``:

    - ``rnd1``: the Qwen3 / Qwen3-MoE config (AutoModelForCausalLM loads it) plus an ``rnd1``
      block (attention, objective, block size of a block-diffusion model, mask id) for rnd1's own
      generation;
    - ``rnd1_release``: the layout of RND1's released inference code (model_type ``rnd1``,
      ``RND1LM``, Qwen3-MoE weight names, MoE in every layer, untied head, bidirectional).

    Both carry the tokenizer's eos / pad / mask ids in config.json and generation_config.json
    (RND1's ``from_pretrained`` needs the latter), the run's tokenizer files, and
    rnd1_tokenizer.json so ``load_tokenizer(folder)`` rebuilds the exact tokenizer."""
    from rnd1.data.tokenizer import ByteTokenizer, describe_tokenizer

    if fmt not in EXPORT_FORMATS:
        raise HFCheckpointError(f"export format {fmt!r} unknown; expected one of {EXPORT_FORMATS}")
    if attention not in ATTENTION_MODES:
        raise HFCheckpointError(f"attention {attention!r} unknown; expected one of {ATTENTION_MODES}")
    byte = isinstance(tokenizer, ByteTokenizer)
    source = None if tokenizer_source is None or str(tokenizer_source) == "byte" else Path(tokenizer_source)
    if source is None and not byte:
        raise HFCheckpointError(f"tokenizer {tokenizer.name!r} is not the byte tokenizer: give the path "
                                f"it was loaded from, so its files go into the export")
    if source is not None and not source.exists():
        raise HFCheckpointError(f"tokenizer source {source} does not exist")
    files, file = ((), None) if byte else _tokenizer_files(source)
    eos, pad = _special_ids(tokenizer, None if byte or source.is_file() else source)
    ids = {"eos_token_id": eos, "pad_token_id": pad, "mask_token_id": tokenizer.mask_id}
    if mcfg.mask_token_id != tokenizer.mask_id:
        raise HFCheckpointError(f"model mask_token_id {mcfg.mask_token_id} differs from the tokenizer's "
                                f"mask id {tokenizer.mask_id}")
    outside = [f"{k}={v}" for k, v in ids.items() if not 0 <= v < mcfg.vocab_size]
    if outside:
        raise HFCheckpointError(f"tokenizer {tokenizer.name!r}: {', '.join(outside)} outside the model's "
                                f"vocabulary [0, {mcfg.vocab_size})")
    meta = {"attention": attention, "objective": objective, "block_size": block_size or None,
            "mask_token_id": tokenizer.mask_id}
    config = {**ids, "rnd1": {k: v for k, v in meta.items() if v is not None}}
    generation = dict(ids)
    if fmt == "rnd1_release":
        problems = []
        if not mcfg.is_moe or len(mcfg.moe_layer_ids) != mcfg.num_hidden_layers:
            problems.append("a Qwen3-MoE with MoE in every layer (RND1 has no dense layers)")
        if mcfg.tie_word_embeddings:
            problems.append("an untied LM head (RND1LM keeps its own lm_head)")
        if attention != "bidirectional":
            problems.append(f"bidirectional attention (RND1 attention is never causal; got {attention})")
        if problems:
            raise HFCheckpointError("format 'rnd1_release' needs " + "; ".join(problems))
        config.update(model_type="rnd1", architectures=["RND1LM"], moe_backend="hf",
                      num_diffusion_steps=RND1_DIFFUSION_STEPS, use_cache=False)
        generation.update(num_diffusion_steps=RND1_DIFFUSION_STEPS, use_cache=False)
    return ExportPlan(config, generation, describe_tokenizer(tokenizer, file), files)
