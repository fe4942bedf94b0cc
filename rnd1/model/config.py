"""Qwen3 / Qwen3-MoE architecture config: the fields of a Hugging Face ``config.json`` that change
the math, plus the diffusion mask token. One dataclass covers dense and MoE models
(``num_experts == 0`` means dense)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# RND1's mask token: a spare id inside Qwen3's padded 151,936-entry embedding table.
DEFAULT_MASK_TOKEN_ID = 151669


class ModelConfigError(ValueError):
    """A model config that cannot describe a Qwen3 model."""


@dataclass
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 1024
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072  # dense MLP width (dense layers of an MoE model use it too)
    moe_intermediate_size: int = 0  # per-expert MLP width
    num_experts: int = 0  # 0: dense Qwen3
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    router_aux_loss_coef: float = 0.001
    attention_bias: bool = False
    mask_token_id: int = DEFAULT_MASK_TOKEN_ID

    def __post_init__(self):
        self.mlp_only_layers = list(self.mlp_only_layers)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ModelConfigError(f"model config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.num_experts >= 0, f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts > 0:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                 f"got {self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0,
                 f"moe_intermediate_size must be > 0 for an MoE model, got {self.moe_intermediate_size}")
            need(self.decoder_sparse_step >= 1,
                 f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            need(self.intermediate_size > 0,
                 f"intermediate_size must be > 0 when some layers are dense, got {self.intermediate_size}")
        need(0 <= self.mask_token_id < self.vocab_size,
             f"mask_token_id {self.mask_token_id} must be inside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------ layout
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def is_moe(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ------------------------------------------------------------------ counts
    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, active per token (top-k experts only), and both without the
        input embedding (the quantity that enters 6N FLOPs)."""
        H, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = H * q + 2 * H * kv + q * H + 2 * hd + (q + 2 * kv + H if self.attention_bias else 0)
        norms = 2 * H
        dense_mlp = 3 * H * self.intermediate_size
        expert = 3 * H * self.moe_intermediate_size
        total = active = 0
        for i in range(self.num_hidden_layers):
            total += attn + norms
            active += attn + norms
            if self.is_moe_layer(i):
                total += self.num_experts * expert + self.num_experts * H
                active += self.num_experts_per_tok * expert + self.num_experts * H
            else:
                total += dense_mlp
                active += dense_mlp
        embed = self.vocab_size * H + H  # the table + Qwen3.mask_embedding, the [MASK] row kept apart
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        final_norm = H
        body_total = total + final_norm + head
        body_active = active + final_norm + head
        # With tied weights the head still costs matmul FLOPs: count it in the FLOP parameter count.
        flop_params = active + final_norm + self.vocab_size * H
        return {
            "total": body_total + embed,
            "active": body_active + embed,
            "total_non_embedding": body_total,
            "active_non_embedding": body_active,
            "flop_params_per_token": flop_params,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N_active (without the input embedding, with the LM head)
        plus attention 12 * layers * seq_len * heads * head_dim (torchtitan / PaLM convention:
        forward QK^T and AV are 2 * 2 * S * heads * head_dim per token, x3 for backward; counted
        for full attention whether or not it is causal)."""
        n = self.param_counts()["flop_params_per_token"]
        attn = 12 * self.num_hidden_layers * seq_len * self.num_attention_heads * self.head_dim
        return 6 * n + attn

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> "ModelConfig":
        """Build from a parsed Hugging Face ``config.json`` of model_type qwen3 or qwen3_moe."""
        model_type = hf.get("model_type")
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ModelConfigError(
                f"config.json: unsupported model_type {model_type!r}; expected 'qwen3' or 'qwen3_moe'"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"config.json: hidden_act {hf['hidden_act']!r} unsupported; expected 'silu'")
        rope_scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ModelConfigError(f"config.json: rope scaling {rope_type!r} is not supported")
        rope_theta = hf.get("rope_theta", rope_scaling.get("rope_theta", 1_000_000.0))
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            intermediate_size=hf.get("intermediate_size", 0),
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 40960),
            attention_bias=bool(hf.get("attention_bias", False)),
            mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        )
        if model_type == "qwen3_moe":
            kw.update(
                moe_intermediate_size=hf["moe_intermediate_size"],
                # transformers >= 5 writes num_local_experts; released checkpoints say num_experts
                num_experts=hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],
                num_experts_per_tok=hf["num_experts_per_tok"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                mlp_only_layers=list(hf.get("mlp_only_layers") or []),
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
            )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """A ``config.json`` dict that ``transformers`` loads (Qwen3ForCausalLM or Qwen3MoeForCausalLM)."""
        moe = self.num_experts > 0
        hf = {
            "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
            "model_type": "qwen3_moe" if moe else "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "mask_token_id": self.mask_token_id,
        }
        if moe:
            hf.update(
                moe_intermediate_size=self.moe_intermediate_size,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        return hf

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- presets
_PRESETS: dict[str, dict] = {
    # Tiny MoE: a CPU training step in well under a second. vocab 512 leaves room for a byte-level
    # tokenizer (256 bytes + specials) and a mask id.
    "debug": dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rope_theta=10_000.0,
        max_position_embeddings=2048, tie_word_embeddings=False, mask_token_id=511,
    ),
    "debug_dense": dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=384, rope_theta=10_000.0,
        max_position_embeddings=2048, tie_word_embeddings=True, mask_token_id=511,
    ),
    "qwen3_0.6b": dict(
        vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, tie_word_embeddings=True,
        rope_theta=1_000_000.0, max_position_embeddings=40960,
    ),
    "qwen3_4b": dict(
        vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=9728, tie_word_embeddings=True,
        rope_theta=1_000_000.0, max_position_embeddings=40960,
    ),
    "qwen3_30b_a3b": dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in _PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return ModelConfig(**{**_PRESETS[name], **overrides})
