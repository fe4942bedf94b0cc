"""Helpers to build small random Hugging Face Qwen3 / Qwen3-MoE models (the numerical oracle)
and to map their in-memory parameter names onto ours."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

VOCAB = 300
MASK_ID = 299
# head_dim 24 != hidden / heads = 16 on purpose: Qwen3 decouples them.
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, intermediate_size=96, max_position_embeddings=128,
            rms_norm_eps=1e-6)
MOE = dict(moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2)


def make_hf_model(moe: bool, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A random fp32 HF model in eval mode. Weights ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.1^2),
    large enough that every sub-layer visibly changes the logits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw = {**BASE, **(MOE if moe else {}), **overrides}
    config = (Qwen3MoeConfig if moe else Qwen3Config)(**kw, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def save_hf(model, folder, max_shard_size="5GB"):
    """transformers' own writer, so the loader is tested against the real on-disk format."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def hf_to_ours(hf_named: dict[str, torch.Tensor], moe_intermediate_size: int) -> dict[str, torch.Tensor]:
    """transformers-5 in-memory names/tensors (stacked ``gate_up_proj``) -> our names/tensors."""
    out = {}
    for name, t in hf_named.items():
        name = name.removeprefix("model.")
        if name.endswith(".mlp.experts.gate_up_proj"):
            I = moe_intermediate_size
            out[name.replace("gate_up_proj", "gate_proj")] = t[:, :I]
            out[name.replace("gate_up_proj", "up_proj")] = t[:, I:]
        elif name.endswith(".mlp.gate.weight"):
            out[name.replace(".mlp.gate.weight", ".mlp.router.weight")] = t
        else:
            out[name] = t
    return out


@pytest.fixture
def hf():
    """The helpers as a fixture (test folders share the module name ``conftest``, so tests do not
    import it directly). Skips when transformers is not installed."""
    pytest.importorskip("transformers")
    return SimpleNamespace(make=make_hf_model, save=save_hf, to_ours=hf_to_ours, VOCAB=VOCAB,
                           MASK_ID=MASK_ID, BASE=BASE, MOE=MOE)
