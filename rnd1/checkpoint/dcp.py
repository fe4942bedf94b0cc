"""Crash-safe training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<dump_folder>/<checkpoint.folder>/``::

    step-00000100/            a complete checkpoint (DCP shards of model + optimiser,
        .metadata, *.distcp    one extra_rank<R>.pt per rank: loader, schedule, RNG, counters,
        extra_rank0.pt ...     CHECKSUMS: size + crc32 of every file of every rank, and COMPLETE,
        CHECKSUMS              written last, before the folder gets its final name)
        COMPLETE
    step-00000300.damaged/    a checkpoint that failed verification on resume, set aside
    latest                    the name of the newest complete checkpoint (a hint; the scan decides)
    .step-00000200.tmp/       an interrupted save: ignored on resume, removed by the next save

A save writes into a temporary folder, fsyncs every file, writes COMPLETE, renames the folder and
only then prunes older complete checkpoints (keep-latest-k). A crash at any moment leaves either
the previous complete checkpoint or the new one, never a half-written folder that resume trusts.
On resume, ``latest_intact`` verifies the newest checkpoint against CHECKSUMS (every byte is
read once: a truncated, overwritten or silently changed shard, ``.metadata``, ``extra_rank*.pt``
or a junk COMPLETE marker is caught), renames a damaged one to ``step-XXXXXXXX.damaged`` with one
line naming the file, and falls back to the newest intact one. A save that runs out of disk
removes its temporary folder and raises one line (``no space left on device ...``); the previous
checkpoint is untouched.
DCP stores each tensor shard with its global offsets, so a checkpoint saved with one layout
(EP x FSDP) loads into another (one process) and back.
"""

from __future__ import annotations

import errno
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

from rnd1.checkpoint.fsio import file_checksum, fsync_path, fsync_tree, tree_size

# A single process saving/loading with DCP is intended here (no process group needed).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_RE = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"
CHECKSUMS = "CHECKSUMS"


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

    def verify(self, path: Path) -> str | None:
        """None if ``path`` is intact, else one line naming the damaged file. Reads every file
        listed in CHECKSUMS once. A checkpoint written before CHECKSUMS existed is checked only
        for a readable COMPLETE marker and ``.metadata``."""
        try:
            info = json.loads((path / COMPLETE).read_text())
            if not isinstance(info, dict) or not isinstance(info.get("step"), int):
                raise ValueError("not a checkpoint marker")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return f"{path / COMPLETE}: unreadable marker ({type(e).__name__})"
        if not (path / CHECKSUMS).is_file():
            if not (path / ".metadata").is_file():
                return f"{path / '.metadata'}: missing"
            return None
        try:
            sums = json.loads((path / CHECKSUMS).read_text())
            entries = [(name, int(e["size"]), str(e["crc32"])) for name, e in sums.items()]
        except (OSError, ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:
            return f"{path / CHECKSUMS}: unreadable ({type(e).__name__})"
        for name, size, crc in entries:
            f = path / name
            if not f.is_file():
                return f"{f}: missing"
            have = f.stat().st_size
            if have != size:
                return f"{f}: {have} bytes, {size} written (truncated or overwritten)"
            if file_checksum(f) != crc:
                return f"{f}: checksum mismatch (contents changed after the save)"
        return None

    def latest_intact(self, log=print) -> tuple[int, Path] | None:
        """Collective. The newest complete checkpoint that passes ``verify``. Rank 0 sets each
        damaged newer one aside (renamed to ``step-XXXXXXXX.damaged``, so keep-k pruning and later
        resumes ignore it) with one line naming the damaged file; every rank then sees the same
        newest intact checkpoint."""
        if _rank() == 0:
            for _step, path in reversed(self.complete_checkpoints()):
                reason = self.verify(path)
                if reason is None:
                    break
                aside = path.with_name(path.name + ".damaged")
                n = 1
                while aside.exists():
                    aside, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
                os.replace(path, aside)
                fsync_path(self.folder)
                log(f"damaged checkpoint set aside as {aside.name}: {reason}")
        _barrier()
        return self.latest()

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
        try:
            dcp.save({"app": ModelOptimState(model, optimizer)}, checkpoint_id=str(tmp))
            torch.save(extra, tmp / f"extra_rank{rank}.pt")
            _barrier()
            if rank == 0:
                world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
                # every rank's files are in tmp now (after the barrier): one manifest covers them all
                sums = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "crc32": file_checksum(p)}
                        for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=0))
                info = {"step": step, "world_size": world, "time": time.time(), **(meta or {})}
                (tmp / COMPLETE).write_text(json.dumps(info))
                fsync_tree(tmp)
                os.replace(tmp, final)
                fsync_path(self.folder)
                latest_tmp = self.folder / ".latest.tmp"
                latest_tmp.write_text(final.name + "\n")
                os.replace(latest_tmp, self.folder / "latest")
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            written = tree_size(tmp)
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                (self.folder / ".latest.tmp").unlink(missing_ok=True)
            if _is_disk_full(e):
                need = self._estimate_bytes(model, optimizer, written)
                free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
                raise CheckpointError(
                    f"no space left on device while saving step {step} to {self.folder} "
                    f"(needs ~{need / 2**20:.0f} MB, {free / 2**20:.0f} MB free); the partial save was "
                    f"removed, the previous checkpoint is intact") from e
            raise
        if rank == 0:
            self._prune()
        _barrier()
        return final

    def _estimate_bytes(self, model, optimizer, written: int) -> int:
        """The size of the newest complete checkpoint, else the tensors about to be written."""
        done = self.complete_checkpoints()
        if done:
            return tree_size(done[-1][1])
        n = sum(p.numel() * p.element_size() for p in model.state_dict().values() if torch.is_tensor(p))
        if optimizer is not None:
            n += sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                     if torch.is_tensor(t))
        return max(n, written)

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


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in the chain. torch.save reports it as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``, DCP as a CheckpointException wrapping the OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "unexpected pos" in text or "Disk quota exceeded" in text:
            return True
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        for inner in failures.values() if isinstance(failures, dict) else ():
            inner = inner[0] if isinstance(inner, tuple) else inner
            if isinstance(inner, BaseException) and _is_disk_full(inner):
                return True
        e = e.__cause__ or e.__context__
    return False


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
