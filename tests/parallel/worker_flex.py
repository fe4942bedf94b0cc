"""Run by torchrun from test_flex_attention_parallel.py: the debug MoE model under EP 2 (experts
split across the two ranks, all-to-all token exchange) with FSDP over the dense parameters, its
masked attention on FlexAttention against dense-mask SDPA, same model, same batch. Without
compilation: forward and backward (torch's eager FlexAttention on the CPU, tests/flex_cpu.py);
with the blocks compiled around the EP all-to-all: forward (torch has no compiled CPU backward).
Prints one JSON line per rank, in rank order."""

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace as NS

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for flex_cpu
from flex_cpu import flex_gradients_on_cpu  # noqa: E402
from rank_order import print_in_rank_order  # noqa: E402  (this folder: the script's own)

from rnd1.model.attention_masks import TwoStream  # noqa: E402
from rnd1.model.config import get_preset  # noqa: E402
from rnd1.model.qwen3 import Qwen3  # noqa: E402
from rnd1.parallel import build_parallel_dims, parallelize_model  # noqa: E402
from rnd1.parallel.env import init_distributed  # noqa: E402

warnings.simplefilter("ignore")


def main():
    ac, compiled = sys.argv[1], int(sys.argv[2])
    env = init_distributed("cpu")
    cfg = NS(
        parallelism=NS(tensor_parallel_degree=1, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                       expert_parallel_degree=2, fsdp_reshard_after_forward="default"),
        activation_checkpoint=NS(mode=ac), compile=NS(enable=bool(compiled), backend="inductor", fullgraph=False),
        training=NS(mixed_precision_param="float32"),
    )
    dims = build_parallel_dims(cfg.parallelism, env)
    with torch.device("meta"):
        model = Qwen3(get_preset("debug"), attention_mode="bidirectional")
    model = parallelize_model(model, cfg, dims, env)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)

    g = torch.Generator().manual_seed(1 + env.rank)
    half = 24
    x = torch.randint(0, 500, (2, 2 * half), generator=g)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 17 + [1] * 7])
    pos = torch.cat([torch.arange(half)] * 2).expand(2, 2 * half)
    cases = {"two_stream_documents": dict(attn_mask=TwoStream(half, 5, docs), positions=pos),
             "documents": dict(doc_ids=torch.cat([docs, docs + 2], dim=1))}
    res = {"rank": env.rank}
    for name, kw in cases.items():
        outs, grads = {}, {}
        for backend in ("sdpa", "flex"):
            model.set_attention_backend(backend)
            model.zero_grad(set_to_none=True)
            if compiled:
                with torch.no_grad():
                    outs[backend] = model(x, **kw)
                continue
            with flex_gradients_on_cpu():
                out = model(x, **kw)
                out.float().square().mean().backward()
            outs[backend] = out.detach()
            grads[backend] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                              for n, p in model.named_parameters() if p.grad is not None}
        res[name] = {"out": (outs["flex"] - outs["sdpa"]).abs().max().item()}
        if grads:
            gs, gf = grads["sdpa"], grads["flex"]
            res[name]["grads"] = len(gs)
            res[name]["grad"] = max(((gf[n] - gs[n]).abs().max() / gs[n].abs().max().clamp_min(1e-12)).item()
                                    for n in gs)
    print_in_rank_order(res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
