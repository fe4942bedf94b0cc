"""Crash-safe training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<dump_folder>/<checkpoint.folder>/``::

    step-00000100/            a complete checkpoint (DCP shards of model + optimiser,
        .metadata, *.distcp    one extra_rank<R>.pt per rank: loader, schedule, RNG, counters,
        extra_rank0.pt ...     and COMPLETE, written last, before the folder gets its final name)
        COMPLETE
    latest                    the name of the newest complete checkpoint (a hint; the scan decides)
    .step-00000200.tmp/       an interrupted save: ignored on resume, removed by the next save

A save writes into a temporary folder, fsyncs every file, writes COMPLETE, renames the folder and
only then prunes older complete checkpoints (keep-latest-k). A crash at any moment leaves either
the previous complete checkpoint or the new one, never a half-written folder that resume trusts.
DCP stores each tensor shard with its global offsets, so a checkpoint saved with one layout
(EP x FSDP) loads into another (one process) and back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from rnd1.checkpoint.fsio import fsync_path, fsync_tree

# A single process saving/loading with DCP is intended here (no process group needed).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_RE = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


class ModelOptimState(Stateful):
    """Model (+ optimiser) in the layout-independent form DCP reshards on load."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state):
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def assert_finite(model: torch.nn.Module) -> None:
    """Refuse to checkpoint weights containing NaN/Inf (they would poison every resume)."""
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not torch.isfinite(local).all():
            raise CheckpointError(f"refusing to save a checkpoint: parameter {name} has non-finite values")


class CheckpointManager:
    def __init__(self, folder: str | Path, keep_latest_k: int = 2):
        self.folder = Path(folder)
        self.keep_latest_k = keep_latest_k

    # ------------------------------------------------------------------ discovery
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for child in self.folder.iterdir():
            m = _STEP_RE.match(child.name)
            if m and (child / COMPLETE).is_file():
                found.append((int(m.group(1)), child))
        return sorted(found)

    def incomplete_checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir()
                      if p.is_dir() and (p.name.endswith(".tmp") or
                                         (_STEP_RE.match(p.name) and not (p / COMPLETE).is_file())))

    def latest(self) -> tuple[int, Path] | None:
        ckpts = self.complete_checkpoints()
        return ckpts[-1] if ckpts else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             extra: dict, *, meta: dict | None = None) -> Path:
        """Collective: every rank calls it. ``extra`` is this rank's non-tensor state."""
        assert_finite(model)
        rank = _rank()
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".step-{step:08d}.tmp"
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.incomplete_checkpoints():
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving the same step (e.g. final save right after an interval save)
                shutil.rmtree(final)
            tmp.mkdir(parents=True)
        _barrier()
        dcp.save({"app": ModelOptimState(model, optimizer)}, checkpoint_id=str(tmp))
        torch.save(extra, tmp / f"extra_rank{rank}.pt")
        _barrier()
        if rank == 0:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            info = {"step": step, "world_size": world, "time": time.time(), **(meta or {})}
            (tmp / COMPLETE).write_text(json.dumps(info))
            fsync_tree(tmp)
            os.replace(tmp, final)
            fsync_path(self.folder)
            latest_tmp = self.folder / ".latest.tmp"
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, self.folder / "latest")
            self._prune()
        _barrier()
        return final

    def _prune(self):
        if self.keep_latest_k <= 0:
            return
        for _step, path in self.complete_checkpoints()[: -self.keep_latest_k]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Load model/optimiser (any layout) and return this rank's extra state ({} if the
        checkpoint was written by a different number of ranks)."""
        state = {"app": ModelOptimState(model, optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        info = json.loads((path / COMPLETE).read_text())
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        extra_file = path / f"extra_rank{_rank()}.pt"
        if info.get("world_size") != world or not extra_file.is_file():
            return {}
        return torch.load(extra_file, weights_only=False)

    def rank0_extra(self, path: Path) -> dict:
        """Rank 0's extra state, for a resume on another world size: the parts every rank holds
        identically (counters, schedule, layout-independent loader state) restore any layout."""
        return torch.load(path / "extra_rank0.pt", weights_only=False)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A step folder, or a checkpoint root (then its newest complete step)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    latest = CheckpointManager(path).latest()
    if latest is None:
        raise CheckpointError(f"{path}: no complete DCP checkpoint (expected a step-XXXXXXXX folder "
                              f"with a {COMPLETE} marker, or a folder containing one)")
    return latest[1]


def checkpoint_info(path: str | Path) -> dict:
    """The COMPLETE marker's metadata (step, world size, and, for trainer checkpoints, the
    model config and objective) of a step folder or checkpoint root."""
    return json.loads((resolve_checkpoint_dir(path) / COMPLETE).read_text())


def is_dcp_checkpoint(path: str | Path) -> bool:
    try:
        resolve_checkpoint_dir(path)
        return True
    except CheckpointError:
        return False


def load_model_weights(model: torch.nn.Module, folder: str | Path) -> Path:
    """Load only the model weights of a DCP checkpoint (step folder or checkpoint root) into
    ``model`` (plain or sharded). Used to initialise runs, to generate and to export.

    A checkpoint written before ``Qwen3.mask_embedding`` existed lacks it: then the mask row is
    copied from the loaded table, which is what such a model looked the mask id up in."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    path = resolve_checkpoint_dir(folder)
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = sorted(k for k in get_model_state_dict(model) if f"app.model.{k}" not in saved)
    old = missing == ["mask_embedding"]
    if missing and not old:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} model parameters: {shown}")
    dcp.load({"app": ModelOptimState(model, None)}, checkpoint_id=str(path),
             planner=DefaultLoadPlanner(allow_partial_load=old))
    if old:
        model.init_mask_embedding("table")
    return path


__all__ = ["CheckpointManager", "CheckpointError", "load_model_weights", "resolve_checkpoint_dir",
           "is_dcp_checkpoint", "assert_finite"]
