"""Printing from every rank of a torchrun job, for the workers' JSON lines."""

import json

import torch.distributed as dist


def print_in_rank_order(obj) -> None:
    """One JSON line per rank, rank 0 first. The ranks share torchrun's stdout pipe and ``print``
    writes the line and its newline separately, so ranks printing at once can interleave into one
    unparsable line (it happened in CI): one rank at a time, between barriers."""
    for r in range(dist.get_world_size()):
        if r == dist.get_rank():
            print(json.dumps(obj), flush=True)
        dist.barrier()
