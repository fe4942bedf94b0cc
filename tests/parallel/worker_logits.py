"""Load a DCP checkpoint into the debug model sharded with EP x FSDP and print a logits summary."""

import json
import sys
from types import SimpleNamespace as NS

import torch
import torch.distributed as dist

from rnd1.checkpoint.dcp import load_model_weights
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import Qwen3
from rnd1.parallel import build_parallel_dims, parallelize_model
from rnd1.parallel.env import init_distributed


def main():
    ckpt, ep = sys.argv[1], int(sys.argv[2])
    env = init_distributed("cpu")
    cfg = NS(parallelism=NS(tensor_parallel_degree=1, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                            expert_parallel_degree=ep, fsdp_reshard_after_forward="default"),
             activation_checkpoint=NS(mode="none"), compile=NS(enable=False), training=NS(mixed_precision_param="float32"))
    dims = build_parallel_dims(cfg.parallelism, env)
    with torch.device("meta"):
        model = Qwen3(get_preset("debug"), attention_mode="bidirectional")
    model = parallelize_model(model, cfg, dims, env)
    model.to_empty(device="cpu")
    model.init_weights(seed=999)
    load_model_weights(model, ckpt)
    x = torch.arange(64).remainder(250).view(2, 32)
    out = model(x).float()  # every rank feeds the same batch
    if env.rank == 0:
        print(json.dumps({"sum": out.sum().item(), "abs_sum": out.abs().sum().item()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
