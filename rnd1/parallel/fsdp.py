"""Device mesh and FSDP2 (``fully_shard``) per transformer block and at the root.

Mesh (all ranks are data-parallel; EP borrows ranks from the FSDP dimension, as in torchtitan)::

    dp_replicate x dp_shard_mod_ep x ep      world = replicate * shard,  shard = shard_mod_ep * ep

- dense parameters (attention, norms, embeddings, routers, head): FSDP over dp_shard
  (= dp_shard_mod_ep x ep flattened), HSDP-replicated over dp_replicate;
- expert parameters: Shard(0) over ep (each EP rank owns whole experts), then FSDP over
  dp_shard_mod_ep, replicated over dp_replicate.

Gradients are SUMMED over data-parallel ranks (divide factor 1): every rank's loss is already
divided by the global number of target positions, so the sum is the full-batch gradient, for
dense and expert parameters alike (an expert's gradient collects all EP peers' tokens).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from rnd1.model.moe import MoE
from rnd1.parallel.dims import ParallelDims


# The flattened ``dp_shard`` mesh of each root mesh, kept as torch asks ("users need to bookkeep the
# flattened mesh directly"): slicing it back out of the root prints a deprecation warning per rank.
_FLAT_DP_SHARD: dict[int, DeviceMesh] = {}


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    shape = (dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep"))
    _FLAT_DP_SHARD[id(mesh)] = mesh["dp_shard_mod_ep", "ep"]._flatten(mesh_dim_name="dp_shard")
    return mesh


def dense_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    flat = _FLAT_DP_SHARD.get(id(mesh))
    return flat if flat is not None else mesh["dp_shard"]


def expert_fsdp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    return mesh["dp_replicate", "dp_shard_mod_ep"] if dims.dp_replicate > 1 else mesh["dp_shard_mod_ep"]


def unwrap_block(block: torch.nn.Module) -> torch.nn.Module:
    """The Block inside torch.compile / activation-checkpoint wrappers."""
    while True:
        inner = getattr(block, "_orig_mod", None) or getattr(block, "_checkpoint_wrapped_module", None)
        if inner is None:
            return block
        block = inner


def _reshard_policy(policy: str, n_layers: int):
    if policy == "always":
        return lambda i: True
    if policy == "never":
        return lambda i: False
    # default: reshard every block except the last (its parameters are needed again at once in backward)
    return lambda i: i < n_layers - 1


def apply_fsdp(model: torch.nn.Module, mesh: DeviceMesh, dims: ParallelDims, *, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, reshard_after_forward: str = "default") -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dmesh = dense_mesh(mesh, dims)
    reshard = _reshard_policy(reshard_after_forward, len(model.layers))
    for i, block in enumerate(model.layers):
        mlp = getattr(unwrap_block(block), "mlp", None)
        ignored = None
        if dims.ep > 1 and isinstance(mlp, MoE):
            if dims.dp_size // dims.ep > 1:
                fully_shard(mlp.experts, mesh=expert_fsdp_mesh(mesh, dims), mp_policy=mp,
                            reshard_after_forward=reshard(i))
                _sum_gradients(mlp.experts)
            else:  # EP spans every rank: each expert lives on exactly one rank, nothing to shard or reduce
                ignored = set(mlp.experts.parameters())
        fully_shard(block, mesh=dmesh, mp_policy=mp, reshard_after_forward=reshard(i), ignored_params=ignored)
        _sum_gradients(block)
    fully_shard(model, mesh=dmesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always")
    _sum_gradients(model)


def _sum_gradients(module) -> None:
    """Reduce gradients with a plain SUM (no averaging, no PREMUL_SUM: gloo has neither)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def reshard_all(model: torch.nn.Module) -> None:
    """Free every gathered parameter, returning FSDP to the state a training step leaves.

    A forward without backward (validation, task scoring, sampling) leaves the modules that do
    not reshard after forward (by default the last block) gathered, since only post-backward
    would free them. The next training forward then skips their all-gather while its
    recomputation in backward performs it; selective activation checkpointing, which replays
    the recorded ops of a checkpointed region one by one (the experts' own FSDP hooks run inside
    it under EP x FSDP), sees ops it never recorded and stops the run. Call after every
    no-grad use of the training model."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
