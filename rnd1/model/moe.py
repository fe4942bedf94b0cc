"""Qwen3-MoE sparse block: router, token dispatch, stacked experts, weighted combine.

Parallelism and kernels plug in through two seams and nothing else:
- ``MoE.dispatcher``: a ``TokenDispatcher`` that moves routed token copies to the experts that own
  them and back. ``LocalDispatcher`` (here) sorts tokens by expert within one process; the
  all-to-all dispatcher for expert parallelism lives in ``rnd1/parallel/expert_parallel.py``.
- ``GroupedExperts.forward(x_sorted, offs)``: SwiGLU experts as three grouped matmuls over
  expert-sorted rows, through ``rnd1.model.grouped_mm`` (a backend switch over the kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from rnd1.kernels import token_dispatch
from rnd1.kernels.backend import op_backend, resolve_backend
from rnd1.model.grouped_mm import grouped_mm


class Router(nn.Module):
    """Linear gate, softmax in fp32, top-k, optional renormalisation (Qwen3-MoE's rule)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob

    def forward(self, x: torch.Tensor):
        """x [T, H] -> (topk_weights [T, k] in x.dtype, topk_ids [T, k], probs [T, E] fp32)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(logits.dtype), top_ids, probs


class GroupedExperts(nn.Module):
    """All experts of one layer, each projection stored stacked as [E, out, in] (the per-expert
    Hugging Face ``nn.Linear`` weights stacked on a leading expert dim)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

        self._compute = swiglu_experts

    @property
    def num_local_experts(self) -> int:
        return self.gate_proj.shape[0]

    def compile_compute(self, **compile_kwargs) -> None:
        """Compile the expert maths alone (not the module call, around which FSDP2 may hook when
        the experts are sharded on their own mesh): see rnd1/parallel/compile.py."""
        self._compute = torch.compile(swiglu_experts, **compile_kwargs)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x [N, H] rows sorted by expert; offs [E_local] int32 cumulative row ends."""
        return self._compute(x, self.gate_proj, self.up_proj, self.down_proj, offs)


def swiglu_experts(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
                   offs: torch.Tensor) -> torch.Tensor:
    """SwiGLU of every expert over its rows: three grouped matmuls. Weights [E, out, in] in the
    Hugging Face layout; rows past ``offs[-1]`` come out zero."""
    gate = grouped_mm(x, gate_w.transpose(-2, -1), offs)
    up = grouped_mm(x, up_w.transpose(-2, -1), offs)
    return grouped_mm(F.silu(gate) * up, down_w.transpose(-2, -1), offs)


class TokenDispatcher(Protocol):
    """Moves routed token copies to their experts' rows and back.

    ``dispatch`` returns the rows the local experts must process (sorted by local expert), their
    cumulative group ends ``offs`` [E_local] and an opaque context; ``combine`` takes the expert
    outputs for those rows and returns ``[T, H]`` = sum_j topk_weights[t, j] * expert_j(x[t]).
    """

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y: torch.Tensor, ctx: Any) -> torch.Tensor: ...

    #: True when dispatch/combine have no data-dependent host values, so a compiled block can
    #: contain them; False makes rnd1.parallel.compile compile the block around the dispatcher.
    traceable: bool


@dataclass
class _LocalCtx:
    order: torch.Tensor | None  # reference: [T*k] position in the flat (token, slot) list of each sorted row
    topk_weights: torch.Tensor  # [T, k]
    pos: torch.Tensor | None = None  # triton: [T, k] sorted row of each (token, slot)
    backend: str = "reference"


class LocalDispatcher:
    """Single-process dispatch: a stable sort of the T*k (token, slot) pairs by expert id. No host
    synchronisation: the output has exactly T*k rows, so it traces into a compiled block.

    The backend is ``rnd1.kernels.backend``'s ``dispatch`` setting (``[kernels] dispatch``), resolved
    per call against the tokens' device. ``reference`` (CPU under ``auto``) is index_select /
    index_copy_ / bmm, measured fastest on CPU; ``triton`` (CUDA under ``auto``) is
    ``rnd1.kernels.token_dispatch``'s gather and fp32-accumulating weighted combine with their Triton
    backward, as custom ops with fake implementations, so the block still compiles whole."""

    traceable = True  # torch.compile can put dispatch and combine inside the block's graph

    def dispatch(self, x, topk_ids, topk_weights, num_experts):
        if resolve_backend(op_backend("dispatch"), x.device) == "triton":
            x_sorted, info = token_dispatch.dispatch(x, topk_ids, num_experts, backend="triton")
            return x_sorted, info.offs, _LocalCtx(None, topk_weights, info.pos, "triton")
        T, k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        x_sorted = x.index_select(0, order // k)
        return x_sorted, offs, _LocalCtx(order, topk_weights)

    def combine(self, y, ctx: _LocalCtx):
        if ctx.backend == "triton":
            return token_dispatch.combine_rows(y, ctx.pos, ctx.topk_weights, backend="triton")
        T, k = ctx.topk_weights.shape
        unsorted = torch.empty_like(y).index_copy_(0, ctx.order, y)  # back to (token, slot) order
        # [T, 1, k] @ [T, k, H]: the weighted sum over slots as one batched matmul (an einsum
        # here made a transposed copy of y forward and backward: 2x slower on CPU)
        return torch.bmm(ctx.topk_weights.to(y.dtype).unsqueeze(1), unsorted.view(T, k, -1)).squeeze(1)


class MoE(nn.Module):
    """Qwen3-MoE sparse MLP. ``forward`` returns the output and the router statistics
    ``[2, E]`` (row 0: routed copies per expert, row 1: sum of router probabilities per expert)
    from which the model computes the load-balancing loss over all layers at once, as
    Qwen3-MoE's ``load_balancing_loss_func`` does."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 norm_topk_prob: bool):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = Router(hidden_size, num_experts, top_k, norm_topk_prob)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size)
        self.dispatcher: TokenDispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_weights, topk_ids, probs = self.router(x)
        x_sorted, offs, ctx = self.dispatcher.dispatch(x, topk_ids, topk_weights, self.num_experts)
        y = self.experts(x_sorted, offs)
        out = self.dispatcher.combine(y, ctx)
        with torch.no_grad():
            counts = torch.zeros(self.num_experts, dtype=torch.float32, device=x.device)
            counts.scatter_add_(0, topk_ids.reshape(-1), torch.ones(topk_ids.numel(), device=x.device))
        stats = torch.stack([counts, probs.sum(0)])
        return out.view(shape), stats


class DenseMLP(nn.Module):
    """SwiGLU MLP of dense Qwen3 layers."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def moe_aux_loss(stats: torch.Tensor, rows: int) -> torch.Tensor:
    """Qwen3-MoE / Switch load-balancing loss from router statistics summed over MoE layers.

    stats [2, E]: routed copies per expert and router probability mass per expert, summed over
    every token of every MoE layer; ``rows`` = tokens x MoE layers. Returns
    E * sum_e (copies_e / rows) * (prob_e / rows); the gradient flows through the probabilities."""
    num_experts = stats.shape[-1]
    return num_experts * torch.sum((stats[0] / rows) * (stats[1] / rows))
