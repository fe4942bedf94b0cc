"""Everything about running on several processes, applied to a plain model from outside.

``build_parallel_dims`` checks the requested layout against the world size; ``parallelize_model``
applies, in torchtitan's order: expert parallelism -> activation checkpointing -> torch.compile ->
FSDP2. The model code never imports from here.
"""

from __future__ import annotations

from rnd1.parallel.activation_checkpoint import apply_activation_checkpointing
from rnd1.parallel.compile import apply_compile
from rnd1.parallel.dims import ParallelDims
from rnd1.parallel.env import DistEnv


def build_parallel_dims(pcfg, env: DistEnv) -> ParallelDims:
    if pcfg.tensor_parallel_degree != 1:
        raise ValueError(f"parallelism.tensor_parallel_degree={pcfg.tensor_parallel_degree}: tensor "
                         f"parallelism is not implemented (the RND1 recipe uses EP + FSDP only); set it to 1")
    world = env.world_size
    rep = pcfg.data_parallel_replicate_degree
    shard = pcfg.data_parallel_shard_degree
    if shard == -1:
        if world % rep:
            raise ValueError(f"world size {world} is not divisible by "
                             f"parallelism.data_parallel_replicate_degree={rep}")
        shard = world // rep
    if rep * shard != world:
        raise ValueError(f"parallelism: data_parallel_replicate_degree x data_parallel_shard_degree = "
                         f"{rep} x {shard} = {rep * shard} != world size {world}")
    ep = pcfg.expert_parallel_degree
    if ep < 1 or shard % ep:
        raise ValueError(f"parallelism.expert_parallel_degree={ep} must divide data_parallel_shard_degree={shard}")
    return ParallelDims(world_size=world, rank=env.rank, dp_shard=shard, dp_replicate=rep, ep=ep)


def parallelize_model(model, cfg, dims: ParallelDims, env: DistEnv):
    """EP -> activation checkpointing -> compile -> FSDP2, on a (meta-device) plain model."""
    import torch

    from rnd1.parallel.expert_parallel import apply_expert_parallel
    from rnd1.parallel.fsdp import apply_fsdp, build_mesh

    if dims.world_size > 1:
        dims.mesh = build_mesh(dims, env.device.type)
        if dims.ep > 1:
            apply_expert_parallel(model, dims.mesh["ep"])
    apply_activation_checkpointing(model, cfg.activation_checkpoint.mode)
    if cfg.compile.enable:
        apply_compile(model, backend=cfg.compile.backend, fullgraph=cfg.compile.fullgraph)
    if dims.world_size > 1:
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        apply_fsdp(model, dims.mesh, dims, param_dtype=dtypes[cfg.training.mixed_precision_param],
                   reduce_dtype=torch.float32,
                   reshard_after_forward=cfg.parallelism.fsdp_reshard_after_forward)
    return model
