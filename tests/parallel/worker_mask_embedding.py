"""Run by torchrun from test_mask_embedding_fsdp.py: the separate [MASK] embedding under FSDP2.

Every rank builds the model on the meta device, shards it, initialises it (the mask row is copied
from the sharded table, then set to the mean of the trained rows without gathering the table),
takes one optimiser step in which only attention and the mask row learn, and writes a DCP
checkpoint and a Hugging Face export. Each rank also runs the unsharded reference on the whole
global batch; rank 0 prints one JSON line and saves the reference's mask row to OUT/ref.pt."""

import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace as NS

import torch
import torch.distributed as dist

from rnd1.checkpoint.dcp import CheckpointManager
from rnd1.checkpoint.hf import save_pretrained
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import Qwen3, build_model
from rnd1.optim import GroupSpec, build_optimizer
from rnd1.parallel import build_parallel_dims, parallelize_model
from rnd1.parallel.env import init_distributed

warnings.simplefilter("ignore")
MASK, TRAINED_ROWS = 257, 258  # the byte tokenizer's mask id and vocabulary


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def main():
    preset, out = sys.argv[1], Path(sys.argv[2])
    env = init_distributed("cpu")
    cfg = NS(
        parallelism=NS(tensor_parallel_degree=1, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                       expert_parallel_degree=1, fsdp_reshard_after_forward="default"),
        activation_checkpoint=NS(mode="none"), compile=NS(enable=False), training=NS(mixed_precision_param="float32"),
    )
    dims = build_parallel_dims(cfg.parallelism, env)
    mcfg = get_preset(preset, mask_token_id=MASK)
    with torch.device("meta"):
        model = Qwen3(mcfg, attention_mode="bidirectional")
    model = parallelize_model(model, cfg, dims, env)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    ref = build_model(mcfg, seed=0, attention_mode="bidirectional")
    res = {"sharded": type(model.mask_embedding).__name__ == "DTensor",
           "local_rows": model.mask_embedding.to_local().shape[0],
           "init_row_diff": (_full(model.mask_embedding) - ref.mask_embedding).abs().max().item()}
    model.init_mask_embedding("mean", trained_rows=TRAINED_ROWS)
    ref.init_mask_embedding("mean", trained_rows=TRAINED_ROWS)
    res["mean_diff"] = (_full(model.mask_embedding) - ref.mask_embedding).abs().max().item()

    groups = dict(attention=GroupSpec(1e-3, 0.1), non_attention=GroupSpec(0.0, 0.1), mask_embedding=GroupSpec(1e-2))
    opt, ref_opt = build_optimizer(model, **groups), build_optimizer(ref, **groups)
    table0, row0 = _full(model.embed_tokens.weight), ref.mask_embedding.detach().clone()
    per_rank = 2
    x = torch.randint(0, TRAINED_ROWS, (env.world_size * per_rank, 32), generator=torch.Generator().manual_seed(1))
    x[:, ::3] = MASK
    mine = x[env.rank * per_rank:(env.rank + 1) * per_rank]
    (model(mine).float().pow(2).sum() / x.numel()).backward()  # gradients are summed over ranks
    (ref(x).float().pow(2).sum() / x.numel()).backward()
    opt.step()
    ref_opt.step()
    row = _full(model.mask_embedding)
    res["step_diff"] = (row - ref.mask_embedding).abs().max().item()
    res["moved"] = (row - row0).abs().max().item()
    res["table_moved"] = (_full(model.embed_tokens.weight) - table0).abs().max().item()

    CheckpointManager(out / "dcp").save(1, model, opt, {})
    save_pretrained(model, out / "hf")
    if env.rank == 0:
        torch.save({"row": ref.mask_embedding.detach(), "table": ref.embed_tokens.weight.detach()}, out / "ref.pt")
        print(json.dumps(res), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
