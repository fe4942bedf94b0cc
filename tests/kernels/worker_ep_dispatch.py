"""Run by tests/kernels/test_dispatch_backend.py under torchrun (gloo, 2 ranks): one MoE layer
forward/backward with the all-to-all dispatcher and the given dispatch backend, against the same
layer with the local dispatcher and all experts in each process. Prints one JSON line on rank 0:
the largest differences and how often each Triton dispatch kernel ran on this rank."""

import copy
import json
import sys

import torch
import torch.distributed as dist

import rnd1.kernels.token_dispatch as td
from rnd1.kernels.backend import set_op_backend
from rnd1.model.moe import MoE
from rnd1.parallel.expert_parallel import AllToAllDispatcher


def main():
    backend = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    H, I, E, k, T = 16, 8, 4, 2, 9
    torch.manual_seed(0)
    full = MoE(H, I, E, k, norm_topk_prob=True)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(world, T, H, generator=torch.Generator().manual_seed(1))[rank]
    set_op_backend("grouped_mm", "reference")

    set_op_backend("dispatch", "reference")
    xr = x.clone().requires_grad_()
    out_ref = full(xr)[0]
    out_ref.pow(2).sum().backward()
    ref = {n: p.grad.clone() for n, p in full.named_parameters()}
    e_local = E // world
    rows = slice(rank * e_local, (rank + 1) * e_local)
    for n in ("experts.gate_proj", "experts.up_proj", "experts.down_proj"):
        dist.all_reduce(ref[n])  # under EP an expert's gradient sums every rank's tokens
        ref[n] = ref[n][rows]

    ep = copy.deepcopy(full)
    ep.zero_grad(set_to_none=True)
    for n in ("gate_proj", "up_proj", "down_proj"):
        setattr(ep.experts, n, torch.nn.Parameter(getattr(full.experts, n).detach()[rows].clone()))
    ep.dispatcher = AllToAllDispatcher(dist.group.WORLD, world, rank)

    calls = dict.fromkeys(("gather_rows_triton", "combine_triton", "combine_backward_triton"), 0)
    for name in calls:
        real = getattr(td, name)

        def wrapped(*a, _real=real, _name=name):
            calls[_name] += 1
            return _real(*a)

        setattr(td, name, wrapped)
    set_op_backend("dispatch", backend)
    xe = x.clone().requires_grad_()
    out = ep(xe)[0]
    out.pow(2).sum().backward()
    diffs = {"out": (out - out_ref).abs().max().item(), "x": (xe.grad - xr.grad).abs().max().item()}
    for n, p in ep.named_parameters():
        diffs[n] = (p.grad - ref[n]).abs().max().item()
    if rank == 0:
        print(json.dumps({"diffs": diffs, "calls": calls}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
