"""torchtitan 0.3.0's Qwen3 MoE as a benchmark peer for ``scripts/bench_train_step.py``.

Built from torchtitan's own config helpers with the same architecture as the rnd1 model, and
loaded with the same weights through torchtitan's own HF converter (``Qwen3StateDictAdapter``).
Two things differ from a stock torchtitan job, both forced by the CPU:
- attention is torchtitan's ``ScaledDotProductAttention`` (causal SDPA): its flex and varlen
  backends, the only ones it offers language models, cannot train on CPU;
- no parallelisms, no compile unless ``--compile`` (then ``torch.compile`` of the whole model).
Kept as torchtitan ships it: experts run their grouped matmuls in bf16 whatever the parameter
dtype (torchtitan casts them), and routing uses its aux-loss-free expert bias (zero here, as no
optimizer hook updates it). Install: ``pip install -e ".[bench]"`` (torchtitan is pulled in
without its dependencies: only tyro, docstring_parser and spmd_types are needed to import it).
"""

from __future__ import annotations

import glob
import tempfile

import torch
import torch.nn.functional as F


def build_torchtitan_model(mcfg, hf_dir: str):
    """torchtitan Qwen3Model with mcfg's architecture and the HF checkpoint in ``hf_dir``."""
    from safetensors.torch import load_file
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.qwen3 import (
        _EMBEDDING_INIT,
        _LINEAR_INIT,
        Qwen3Model,
        _build_qwen3_moe_layers,
        _qwen3_norm,
    )
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    if not all(mcfg.is_moe_layer(i) for i in range(mcfg.num_hidden_layers)):
        raise ValueError("the torchtitan peer is built for all-MoE Qwen3 configs")
    if abs(mcfg.rms_norm_eps - 1e-6) > 1e-12 or not mcfg.norm_topk_prob:
        raise ValueError("torchtitan's Qwen3 hard-codes rms eps 1e-6 and renormalised top-k weights")
    D, hd = mcfg.hidden_size, mcfg.head_dim
    cfg = Qwen3Model.Config(
        vocab_size=mcfg.vocab_size, dim=D, norm=_qwen3_norm(D), enable_weight_tying=mcfg.tie_word_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=mcfg.vocab_size, embedding_dim=D, param_init=_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=D, out_features=mcfg.vocab_size, param_init=_LINEAR_INIT),
        layers=_build_qwen3_moe_layers(
            fuse_qkv=False, n_layers=mcfg.num_hidden_layers, dim=D, n_heads=mcfg.num_attention_heads,
            n_kv_heads=mcfg.num_key_value_heads, head_dim=hd, moe_hidden_dim=mcfg.moe_intermediate_size,
            num_experts=mcfg.num_experts, top_k=mcfg.num_experts_per_tok, attn_backend="flex",
            rope=CosSinRoPE.Config(dim=hd, max_seq_len=mcfg.max_position_embeddings, theta=mcfg.rope_theta),
            moe_comm_backend="standard"))
    for layer in cfg.layers:  # flex/varlen cannot train on CPU: causal SDPA instead
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    model = cfg.build()
    model.init_states()
    hf_sd = {}
    for f in sorted(glob.glob(f"{hf_dir}/*.safetensors")):
        hf_sd.update(load_file(f))
    state = Qwen3StateDictAdapter(cfg, None).from_hf(hf_sd)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise RuntimeError(f"torchtitan peer: weights did not map: missing {missing}, unexpected {unexpected}")
    return model


def torchtitan_step_fn(a, rnd1_model, mcfg):
    """Same contract as bench_train_step.hf_step_fn: returns step(x0) -> loss (next-token CE)."""
    from rnd1.checkpoint.hf import save_pretrained

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(rnd1_model, d)
        model = build_torchtitan_model(mcfg, d)
    model.train()
    if a.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=a.peer_optimizer == "foreach",
                            fused=a.peer_optimizer == "fused")
    autocast = a.dtype == "bf16"

    def step(x0):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x0)  # all L positions, as transformers computes with labels=x0
            # the labels shift, not the logits (as transformers does): slicing the logits would
            # cost a full-size zero-filled gradient copy (slice_backward) that neither peer needs
            labels = F.pad(x0[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.model = model
    return step
