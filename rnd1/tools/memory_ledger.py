"""Live tensor memory of one process, by what it holds, and the bytes its collectives move.

``MemoryLedger`` is a ``TorchDispatchMode``: every op's outputs are looked at once, each new
storage is entered with the category it was born in, and a ``weakref.finalize`` takes it out
when the storage dies. ``UntypedStorage.resize_`` (which FSDP2 uses to free and re-allocate
its gathered parameters, and which no dispatch mode sees) is followed too. The same ledger runs
on fake tensors (``rnd1.tools.memory_estimate``: a full-size model that allocates nothing) and on
real ones (the test that checks the estimate against a real step), so the two are counted alike.

Why not ``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker``: tried first, on this
project's 30B-A3B layout under fake tensors it (a) did not count parameters that FSDP ignores
(experts when EP spans every rank) and (b) reported a peak of ~450 GiB of "activations" at 64
ranks that no op allocated (its module hooks re-entered the root's 1.2 GiB gathered embedding
storage ~100 times). A ledger keyed by storage identity and fed only by ops is small enough to
read in full and checks out against the process's own peak (tests/tools/test_memory_estimate.py).

Categories:
- ``params``, ``optimizer``: storages registered up front (``register``);
- ``grads``: storages that are parameter gradients at the end (re-labelled then, also in the
  peak snapshot: a gradient lives from its creation in backward to the end of the step);
- ``all_gather``: FSDP's gathered parameters (the all-gather output and the per-parameter
  storages FSDP2 resizes into place);
- ``all_to_all``: expert-parallel token exchange buffers;
- ``act:<kind>``: allocated during forward, by the innermost module kind that allocated it
  (attention, experts, router, norm, embedding, mlp; ``head+loss`` outside the model);
- ``backward``: everything else allocated during backward (activation gradients, recomputed
  activations, reduce-scatter inputs) and ``optimizer_step``: temporaries of clip + step.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_COLLECTIVE_KINDS = {
    "_allgather_base_": "all_gather", "all_gather_into_tensor": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all", "alltoall_base_": "all_to_all",
    "allreduce_": "all_reduce", "all_reduce": "all_reduce", "broadcast_": "broadcast",
}

# parameter-name segments -> module kind, innermost first
_KINDS = (("experts", "experts"), ("router", "router"), ("self_attn", "attention"), ("mlp", "mlp (dispatch, combine)"),
          ("norm", "norm"), ("embed_tokens", "embedding"), ("mask_embedding", "embedding"))


def module_kind(fqn_parents: set[str]) -> str:
    """The innermost kind among the module names active now (``ModTracker.parents``)."""
    deepest = max(fqn_parents, key=lambda n: n.count("."), default="")
    for seg, kind in _KINDS:
        if seg in deepest.split("."):
            return kind
    return "head+loss" if deepest.count(".") == 0 else "block"


@dataclass
class CollectiveCall:
    kind: str
    nbytes: int  # the tensor the collective is defined on: all-gather output, reduce-scatter input, a2a input
    group_size: int


@dataclass
class LedgerReport:
    peak: int
    peak_by_category: dict[str, int]
    end_by_category: dict[str, int]
    collectives: list[CollectiveCall] = field(default_factory=list)


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    if type(t).__name__ == "DTensor":
        return _storages(t._local_tensor)
    if hasattr(t, "__tensor_flatten__") and not type(t).__name__.startswith("Fake"):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _storages(getattr(t, n))]
    return [t.untyped_storage()]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_size(group) -> int:
    if isinstance(group, str):  # functional collectives name their group
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group).size()
    if isinstance(group, torch.ScriptObject):  # c10d ops carry the group boxed
        group = torch.distributed.ProcessGroup.unbox(group)
    return int(group.size())


def _collective(kind: str, name: str, args) -> CollectiveCall:
    """What one collective op moves, from its schema: c10d's in-place ops take (output, input,
    group, ...) for all-gather / reduce-scatter and (output, input, out_splits, in_splits, group)
    for all-to-all; the functional ones take (input, ..., group name)."""
    if name in ("_allgather_base_", "_reduce_scatter_base_"):
        t = args[0] if kind == "all_gather" else args[1]
        return CollectiveCall(kind, _nbytes(t), _group_size(args[2]))
    if name == "alltoall_base_":
        return CollectiveCall(kind, _nbytes(args[1]), _group_size(args[4]))
    if name in ("allreduce_", "broadcast_"):
        return CollectiveCall(kind, sum(_nbytes(t) for t in args[0]), _group_size(args[1]))
    size = _group_size(args[-1])  # functional collectives: the group's name comes last
    if name == "all_gather_into_tensor":
        return CollectiveCall(kind, _nbytes(args[0]) * size, size)  # the output
    return CollectiveCall(kind, _nbytes(args[0]), size)


class MemoryLedger(TorchDispatchMode):
    """Count live storages by category; keep the category totals at the peak."""

    def __init__(self, snapshot_every: float = 0.002):
        super().__init__()
        self.live: dict[int, list] = {}  # storage key -> [category, nbytes, serial]
        self._serial = 0  # keys (storage addresses) are reused after a free; serials are not
        self.total = 0
        self.peak = 0
        self._peak: dict[int, tuple[str, int]] = {}  # serial -> (category, nbytes) at the peak
        self._snapshot_at = 0
        self._step = snapshot_every  # re-snapshot the peak when it grows by this fraction
        self.phase = "forward"  # forward | backward | optimizer_step (set by the caller)
        self.mod_tracker = None  # torch.distributed._tools.mod_tracker.ModTracker, if attributing kinds
        self.collectives: list[CollectiveCall] = []
        self._resize = None

    # ------------------------------------------------------------------ bookkeeping
    def _key(self, st: torch.UntypedStorage) -> int:
        return st._cdata

    def _add(self, st: torch.UntypedStorage, cat: str) -> None:
        key = self._key(st)
        if key in self.live:
            return
        n = st.nbytes()
        self._serial += 1
        self.live[key] = [cat, n, self._serial]
        self.total += n
        weakref.finalize(st, self._drop, key)
        self._maybe_peak()

    def _drop(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[1]

    def _resized(self, st: torch.UntypedStorage) -> None:
        """FSDP2 frees a gathered parameter with ``resize_(0)`` and re-allocates it in place."""
        key = self._key(st)
        entry = self.live.get(key)
        if entry is None:
            self._add(st, "all_gather")
            return
        n = st.nbytes()
        if n and not entry[1]:  # re-allocated after a free: FSDP2 gathering a parameter again
            entry[0] = "all_gather"
        self.total += n - entry[1]
        entry[1] = n
        self._maybe_peak()

    def _maybe_peak(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            if self.total > self._snapshot_at * (1 + self._step):
                self._snapshot_at = self.total
                self._peak = {serial: (c, n) for c, n, serial in self.live.values() if n}

    def register(self, tensors, category: str) -> None:
        """Enter tensors that exist before the tracked region (parameters, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._add(st, category)

    def current_category(self) -> str:
        if self.phase != "forward":
            return self.phase
        mt = self.mod_tracker
        if mt is not None and mt.is_bw:
            return "backward"
        return "act:" + module_kind(mt.parents if mt is not None else set())

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t.__name__ == "DTensor" for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back through here
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "wait_tensor":
            # Eager returns the tensor it waited for; the fake (meta) implementation returns a new
            # one, which selective recompute would then keep as a second copy of every exchange.
            return args[0]
        kind = _COLLECTIVE_KINDS.get(name)
        cat = self.current_category()
        if kind is not None:
            self.collectives.append(_collective(kind, name, args))
            if kind in ("all_gather", "all_to_all"):
                cat = kind
        elif name in ("all_gather_copy_in", "split_with_sizes_copy"):
            cat = "all_gather"
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._add(st, cat)
        return out

    def __enter__(self):
        orig, ledger = torch.UntypedStorage.resize_, self

        def resize_(st, size):
            out = orig(st, size)
            ledger._resized(st)
            return out

        self._resize = orig
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ report
    def report(self, grads) -> LedgerReport:
        """Re-label gradient storages (``grads``: the parameters' .grad tensors at the end) and
        return the peak's and the end's totals by category."""
        grad_serials = {self.live[self._key(st)][2] for g in grads if g is not None for st in _storages(g)
                        if self._key(st) in self.live}
        peak_cat: dict[str, int] = defaultdict(int)
        for serial, (c, n) in self._peak.items():
            peak_cat["grads" if serial in grad_serials else c] += n
        # the breakdown is a snapshot within ``snapshot_every`` of the peak; the rest is named
        gap = self.peak - sum(peak_cat.values())
        if gap:
            peak_cat["(since snapshot)"] = gap
        end_cat: dict[str, int] = defaultdict(int)
        for c, n, serial in self.live.values():
            end_cat["grads" if serial in grad_serials else c] += n
        return LedgerReport(self.peak, dict(peak_cat), dict(end_cat), list(self.collectives))
