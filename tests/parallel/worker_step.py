"""Run by torchrun from test_parallel.py: one forward/backward of the debug MoE model under a
given layout, compared against the same step in a single process (every rank also runs the
unsharded reference on the whole global batch). Prints one JSON line on rank 0."""

import json
import sys
import warnings
from types import SimpleNamespace as NS

import torch
import torch.distributed as dist

from rnd1.model.config import get_preset
from rnd1.model.qwen3 import Qwen3, build_model
from rnd1.parallel import build_parallel_dims, parallelize_model
from rnd1.parallel.env import init_distributed
from rnd1.parallel.grad_norm import clip_grad_norm_

warnings.simplefilter("ignore")


def main():
    ep, ac, compile_mode, preset = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    env = init_distributed("cpu")
    cfg = NS(
        parallelism=NS(tensor_parallel_degree=1, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                       expert_parallel_degree=ep, fsdp_reshard_after_forward="default"),
        activation_checkpoint=NS(mode=ac), compile=NS(enable=compile_mode > 0, backend="inductor", fullgraph=compile_mode == 1),
        training=NS(mixed_precision_param="float32"),
    )
    dims = build_parallel_dims(cfg.parallelism, env)
    mcfg = get_preset(preset)
    with torch.device("meta"):
        model = Qwen3(mcfg, attention_mode="bidirectional")
    model = parallelize_model(model, cfg, dims, env)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    ref = build_model(mcfg, seed=0, attention_mode="bidirectional")

    per_rank = 2
    x = torch.randint(0, mcfg.vocab_size, (env.world_size * per_rank, 32), generator=torch.Generator().manual_seed(1))
    mine = x[env.rank * per_rank:(env.rank + 1) * per_rank]
    # Each rank's loss is divided by the GLOBAL element count: summed over ranks it is the full loss.
    loss = model(mine).float().pow(2).sum() / x.numel() + 0.01 * model.moe_aux_loss() / env.world_size
    loss.backward()
    norm = clip_grad_norm_(list(model.parameters()), 0.0)
    ref_loss = ref(x).float().pow(2).sum() / x.numel()
    ref_aux = 0.0
    for r in range(env.world_size):  # the aux loss is computed per rank over its own tokens
        ref(x[r * per_rank:(r + 1) * per_rank])
        ref_aux = ref_aux + 0.01 * ref.moe_aux_loss() / env.world_size
    ref(x)
    (ref_loss + ref_aux).backward()
    ref_norm = clip_grad_norm_(list(ref.parameters()), 0.0)
    total = loss.detach().clone()
    dist.all_reduce(total)
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, ((g - q.grad).abs().max() / (q.grad.abs().max() + 1e-12)).item())
    if env.rank == 0:
        print(json.dumps({"loss": total.item(), "ref_loss": (ref_loss + ref_aux).item(), "max_rel_grad_diff": worst,
                          "grad_norm": norm.item(), "ref_grad_norm": ref_norm.item()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
