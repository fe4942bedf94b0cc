"""Run by torchrun from test_hf_sliced_import.py: the Hugging Face import and export of a model
laid out as the trainer lays it out (FSDP, EP, EP x FSDP, HSDP; activation-checkpoint wrappers
on). Arguments: EP degree, replicate degree, SRC, FUSED, OUT, max_shard_size.

Every rank loads the per-expert checkpoint SRC with the sliced import, the same checkpoint with
the full-read path (``copy_fn``: every tensor read whole, the slice cut locally, as the import
did before) and FUSED (the stacked transformers-5 layout) sliced again; it compares its local
tensors bit for bit and reports the bytes each load read, the bytes it keeps, and what
``hf_read_plan`` predicts for it. Then it exports the model under ``LiveTensorBytes`` and reports
the peak. One JSON line per rank, rank order."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace as NS

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

try:  # imported by test_hf_sliced_import (a package module) or run by torchrun as a script
    from .rank_order import print_in_rank_order
except ImportError:
    from rank_order import print_in_rank_order

warnings.simplefilter("ignore")


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    Every op (factory functions included) passes through ``__torch_dispatch__``; an output whose
    storage no input shares is a new allocation (views, in-place ops and collectives that fill a
    tensor they are given, such as ``recv``, allocate nothing), counted at its storage's size and
    held by a weak reference, so it stops counting once freed (checked before each op). Tensors
    that existed before (the model's parameters) never count, even when viewed. Not counted:
    memory outside tensors (Python objects, the page cache of the file being written) and
    buffers inside a collective's own implementation: this is the tensor memory the export code
    itself holds, which is what its bound is about."""

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _plain(t)}
        for ref in [r for r in self.live if r.expired()]:
            self.now -= self.live.pop(ref)
        for t in tree_leaves(out):
            if _plain(t):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in seen and ref not in self.live:
                    self.live[ref] = t.untyped_storage().nbytes()
                    self.now += self.live[ref]
        self.peak = max(self.peak, self.now)
        return out


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _build(mcfg, pcfg, dims, env):
    from rnd1.model.qwen3 import Qwen3
    from rnd1.parallel import parallelize_model

    with torch.device("meta"):
        model = Qwen3(mcfg)
    model = parallelize_model(model, pcfg, dims, env)
    model.to_empty(device="cpu")
    with torch.no_grad():  # a row the import missed stays NaN and compares unequal
        for p in model.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).fill_(float("nan"))
    return model


def _locals(model) -> dict[str, torch.Tensor]:
    from rnd1.checkpoint.hf import canonical_name

    return {canonical_name(n): (p.to_local() if hasattr(p, "to_local") else p).detach()
            for n, p in model.named_parameters()}


def main():
    from rnd1.checkpoint.hf import (
        canonical_name,
        copy_full_into,
        load_state_dict_from_hf,
        model_config_from_hf,
        parse_size,
        save_pretrained,
    )
    from rnd1.checkpoint.hf_plan import hf_read_plan
    from rnd1.parallel import build_parallel_dims
    from rnd1.parallel.env import init_distributed

    ep, rep = int(sys.argv[1]), int(sys.argv[2])
    src, fused, out, shard_size = Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), sys.argv[6]
    env = init_distributed("cpu")
    pcfg = NS(parallelism=NS(tensor_parallel_degree=1, data_parallel_replicate_degree=rep,
                             data_parallel_shard_degree=-1, expert_parallel_degree=ep,
                             fsdp_reshard_after_forward="default"),
              activation_checkpoint=NS(mode="full"), compile=NS(enable=False),
              training=NS(mixed_precision_param="float32"))
    dims = build_parallel_dims(pcfg.parallelism, env)
    mcfg = model_config_from_hf(src)
    ckpt_dtype = torch.bfloat16  # the test writes SRC and FUSED in bf16; the model is fp32

    sliced = _build(mcfg, pcfg, dims, env)
    stats = load_state_dict_from_hf(src, sliced)
    full = _build(mcfg, pcfg, dims, env)
    params = {canonical_name(n): p for n, p in full.named_parameters()}
    full_stats = load_state_dict_from_hf(src, full, copy_fn=lambda n, x: copy_full_into(params[n], x))
    from_fused = _build(mcfg, pcfg, dims, env)
    fused_stats = load_state_dict_from_hf(fused, from_fused)

    a, b, c = _locals(sliced), _locals(full), _locals(from_fused)
    kept = sum(t.numel() for t in a.values()) * ckpt_dtype.itemsize  # the [MASK] row's piece included
    res = {
        "rank": env.rank,
        "bytes_read": stats.bytes_read, "full_read_bytes": full_stats.bytes_read,
        "fused_bytes_read": fused_stats.bytes_read, "skipped": stats.skipped, "kept_bytes": kept,
        "planned": hf_read_plan(mcfg, world_size=env.world_size, ep=ep, dp_replicate=rep,
                                dtype=ckpt_dtype).per_rank[env.rank],
        "differs_from_full_read": sorted(n for n in b if not torch.equal(a[n], b[n])),
        "fused_differs": sorted(n for n in b if not torch.equal(c[n], b[n])),
        "local_expert_rows": next(t.shape[0] for n, t in a.items() if n.endswith("experts.gate_proj")),
    }

    limit = parse_size(shard_size)
    with LiveTensorBytes() as mem:
        save_pretrained(sliced, out, max_shard_size=limit, dtype=ckpt_dtype)
    res["export_peak"] = mem.peak
    dist.barrier()
    print_in_rank_order(res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
