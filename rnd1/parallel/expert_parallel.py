"""Expert parallelism: experts sharded on the expert dimension over the EP mesh, tokens moved to
them with all-to-all.

With EP degree ``ep`` and ``E`` experts, rank j of an EP group owns experts
``[j * E/ep, (j+1) * E/ep)``. One MoE layer's forward on each rank:

1. sort the local (token, slot) pairs by global expert id (as the single-process dispatcher does);
2. all-to-all the per-expert counts, so every rank learns how many rows it will receive from
   each peer for each of its experts (one host sync: the split sizes of step 3);
3. ``all_to_all_single`` of the expert-sorted rows with those variable splits;
4. regroup the received rows from (source rank, expert) order to (expert, source rank) order
   and run the local grouped GEMMs (the regroup is ``index_select`` with the ``reference``
   dispatch backend, ``rnd1.kernels.token_dispatch``'s Triton gather with ``triton``, as is step 1's
   sort inside the ``LocalDispatcher``);
5. undo 4 and 3 (the reverse all-to-all), unsort, and combine with the routing weights.

Every step is differentiable (the all-to-all's backward is the reverse all-to-all). The
``AllToAllDispatcher`` implements the model's ``TokenDispatcher`` seam, so a different transport
(e.g. a DeepEP-like fused kernel with NVLink/RDMA buffers) is one more class with the same two
methods: ``dispatch(x, topk_ids, topk_weights, num_experts) -> (rows, offs, ctx)`` and
``combine(rows_out, ctx) -> [T, H]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor, Shard

from rnd1.kernels.backend import op_backend, resolve_backend
from rnd1.kernels.token_dispatch import gather_rows
from rnd1.model.moe import GroupedExperts, LocalDispatcher, MoE


def all_to_all(x, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all_to_all_single with variable splits (backward: the reverse exchange).
    The functional collective is a dispatcher op, so selective activation checkpointing can
    save its output instead of re-sending the tokens during recomputation."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


@dataclass
class _EPCtx:
    local_ctx: object  # the LocalDispatcher context (sort order + routing weights)
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    regroup: torch.Tensor  # received-row index of each row in (expert, source) order
    backend: str = "reference"  # kernels' dispatch backend, resolved once in dispatch
    inverse: torch.Tensor | None = None  # triton: (expert, source) row of each received row


class AllToAllDispatcher:
    """Expert-parallel transport. One host synchronisation per layer forward: the split sizes of
    the row exchange (``all_to_all_single`` takes them as Python ints), read in a single
    ``tolist`` together with the total the regrouping needs. The backward re-uses them."""

    # The split sizes are data-dependent host values: torch.compile cannot trace through
    # dispatch/combine, so rnd1.parallel.compile compiles the block around them.
    traceable = False

    def __init__(self, group, ep_size: int, ep_rank: int):
        self.group, self.ep, self.ep_rank = group, ep_size, ep_rank
        self._local = LocalDispatcher()

    def dispatch(self, x, topk_ids, topk_weights, num_experts):
        e_local = num_experts // self.ep
        x_sorted, offs, local_ctx = self._local.dispatch(x, topk_ids, topk_weights, num_experts)
        counts = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())  # [E] rows per global expert
        # the one counts exchange of this layer: [ep * e_local] in (source rank, local expert) order
        recv_counts = funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, self.group))
        recv_by_src = recv_counts.view(self.ep, e_local)
        send_splits, recv_splits = self.host_splits(counts.view(self.ep, e_local).sum(1), recv_by_src.sum(1))
        received = all_to_all(x_sorted, recv_splits, send_splits, self.group)
        # Regroup (source, expert) -> (expert, source): the grouped GEMM wants each expert contiguous.
        starts = torch.cumsum(recv_by_src.flatten(), 0) - recv_by_src.flatten()
        starts = starts.view(self.ep, e_local).t().flatten()  # segment starts in (expert, source) order
        lens = recv_by_src.t().flatten()
        regroup = _segment_indices(starts, lens, total=sum(recv_splits))
        local_offs = torch.cumsum(recv_by_src.sum(0), 0).to(torch.int32)
        backend = resolve_backend(op_backend("dispatch"), x.device)
        ctx = _EPCtx(local_ctx, send_splits, recv_splits, regroup, backend)
        if backend == "triton":
            # the regroup is a permutation: gather with the Triton kernel, whose backward (and
            # combine's inverse regroup) gathers through the inverse permutation
            ctx.inverse = torch.empty_like(regroup).scatter_(
                0, regroup, torch.arange(regroup.numel(), device=regroup.device))
            return gather_rows(received, regroup, ctx.inverse.unsqueeze(1), "triton"), local_offs, ctx
        return received.index_select(0, regroup), local_offs, ctx

    def host_splits(self, send: torch.Tensor, recv: torch.Tensor) -> tuple[list[int], list[int]]:
        """The one host sync of this layer: rows sent to and received from each EP rank, as the
        Python ints ``all_to_all_single`` takes (their sums are the totals). A method of its own so
        that ``rnd1.tools.memory_estimate`` can state the routing it assumes instead of reading
        fake tensors, which hold no values."""
        send_splits, recv_splits = torch.stack([send, recv]).tolist()
        return send_splits, recv_splits

    def combine(self, y, ctx: _EPCtx):
        if ctx.backend == "triton":
            back = gather_rows(y, ctx.inverse, ctx.regroup.unsqueeze(1), "triton")
        else:
            back = torch.empty_like(y).index_copy_(0, ctx.regroup, y)
        returned = all_to_all(back, ctx.send_splits, ctx.recv_splits, self.group)
        return self._local.combine(returned, ctx.local_ctx)


def _segment_indices(starts: torch.Tensor, lens: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate arange(starts[i], starts[i] + lens[i]) for all i, without a Python loop.
    ``total`` = lens.sum(), known on the host already: passing it as ``output_size`` spares
    ``repeat_interleave`` a device-to-host read of its own."""
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=starts.device)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=starts.device), lens, output_size=total)
    seg_start = torch.cumsum(lens, 0) - lens
    return starts[seg] + torch.arange(total, device=starts.device) - seg_start[seg]


class EPGroupedExperts(GroupedExperts):
    """GroupedExperts whose stacked weights are DTensors sharded on the expert dim: compute with
    the local shard (the experts this rank owns). Installed by swapping the module's class."""

    def forward(self, x, offs):
        # When EP spans every data-parallel rank, FSDP leaves the experts alone (nothing to shard
        # or reduce), so its mixed-precision cast does not reach them either: cast here to the
        # activations' dtype (autograd brings the gradient back in the parameter's dtype).
        gate, up, down = ((p.to_local() if isinstance(p, DTensor) else p).to(x.dtype)
                          for p in (self.gate_proj, self.up_proj, self.down_proj))
        return self._compute(x, gate, up, down, offs)


def apply_expert_parallel(model: torch.nn.Module, ep_mesh) -> None:
    """Shard every MoE layer's experts over ``ep_mesh`` (Shard(0) DTensors) and install the
    all-to-all dispatcher. Works on a meta-device model (nothing is materialised)."""
    ep = ep_mesh.size()
    group = ep_mesh.get_group()
    ep_rank = ep_mesh.get_local_rank()
    for block in model.layers:
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, MoE):
            continue
        if mlp.num_experts % ep:
            raise ValueError(f"{mlp.num_experts} experts cannot be split over expert_parallel_degree={ep}")
        experts = mlp.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            local = full.detach()[ep_rank * (full.shape[0] // ep):(ep_rank + 1) * (full.shape[0] // ep)]
            dt = DTensor.from_local(local.clone() if local.device.type != "meta" else torch.empty_like(local),
                                    ep_mesh, [Shard(0)], run_check=False)
            setattr(experts, name, torch.nn.Parameter(dt, requires_grad=full.requires_grad))
        experts.__class__ = EPGroupedExperts
        mlp.dispatcher = AllToAllDispatcher(group, ep, ep_rank)
