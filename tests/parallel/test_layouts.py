"""Loss and gradients of one step under FSDP / EP / EP x FSDP / activation checkpointing equal
the single-process step (multi-process on CPU with gloo)."""

import pytest

from .conftest import HERE, last_json, torchrun

pytestmark = [pytest.mark.multiprocess]

CASES = [
    # nproc, ep, activation checkpointing, compile, preset
    (2, 1, "none", 0, "debug"),  # FSDP only
    (2, 2, "none", 0, "debug"),  # EP 2 (experts not FSDP-sharded: EP spans all ranks)
    (4, 2, "none", 0, "debug"),  # EP 2 x FSDP 2
    (2, 2, "full", 0, "debug"),
    (2, 2, "selective", 0, "debug"),
    (4, 2, "selective", 0, "debug"),
    (2, 1, "none", 0, "debug_dense"),  # dense model, tied embeddings under FSDP
    (2, 1, "none", 1, "debug"),  # torch.compile per block (fullgraph) under FSDP
    (2, 1, "selective", 1, "debug"),  # compiled blocks with selective recompute
    (4, 2, "selective", 1, "debug"),  # the 30B recipe's layout: EP 2 x FSDP 2, selective recompute, compiled
    # around the all-to-all with fullgraph=True (rnd1/parallel/compile.py)
]


@pytest.mark.parametrize("nproc,ep,ac,compile_,preset", CASES)
def test_step_matches_single_process(nproc, ep, ac, compile_, preset):
    out = last_json(torchrun(nproc, HERE / "worker_step.py", ep, ac, compile_, preset))
    assert out["loss"] == pytest.approx(out["ref_loss"], rel=1e-5)
    assert out["max_rel_grad_diff"] < 1e-4, out
    assert out["grad_norm"] == pytest.approx(out["ref_grad_norm"], rel=1e-4)


def test_impossible_layouts_fail_clearly():
    from types import SimpleNamespace as NS

    from rnd1.parallel import build_parallel_dims
    from rnd1.parallel.env import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=4, device=None, backend="gloo")

    def pc(**kw):
        base = dict(tensor_parallel_degree=1, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                    expert_parallel_degree=1)
        return NS(**{**base, **kw})

    with pytest.raises(ValueError, match="tensor parallelism is not implemented"):
        build_parallel_dims(pc(tensor_parallel_degree=2), env)
    with pytest.raises(ValueError, match="expert_parallel_degree=3 must divide"):
        build_parallel_dims(pc(expert_parallel_degree=3), env)
    with pytest.raises(ValueError, match="!= world size 4"):
        build_parallel_dims(pc(data_parallel_shard_degree=3), env)
    with pytest.raises(ValueError, match="not divisible"):
        build_parallel_dims(pc(data_parallel_replicate_degree=3), env)
