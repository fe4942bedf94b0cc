"""Qwen3 and Qwen3-MoE in plain PyTorch, one code path for dense and sparse layers.

The math follows Hugging Face ``transformers`` (RMSNorm in fp32, rotate-half RoPE, per-head q/k
RMSNorm, grouped-query attention) so a converted checkpoint computes the same logits. Three things
are new for diffusion: the attention mode can be switched between causal and bidirectional at run
time (``set_attention_mode``), packed sequences can be masked per document (``doc_ids``), and the
[MASK] token's input embedding is a parameter of its own (``mask_embedding``, below). Masked
attention runs on dense-mask SDPA or FlexAttention (``set_attention_backend``;
``rnd1.model.attention``), the mask prepared once per forward.
The model knows nothing of parallelism: FSDP, expert parallelism, activation checkpointing and
compilation are applied from ``rnd1/parallel/``.
"""

from __future__ import annotations

import torch
from torch import nn

from rnd1.model import attention as attn_backend
from rnd1.model.attention_masks import Documents
from rnd1.model.config import ModelConfig
from rnd1.model.kv_cache import KVCache
from rnd1.model.moe import DenseMLP, MoE, moe_aux_loss

ATTENTION_MODES = ("causal", "bidirectional")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, L, head_dim] for rotate-half RoPE, computed in fp32 (HF's convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                 .float() / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, L, hd]; cos/sin [B, L, hd]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm. ``attn_mask`` is what
    ``rnd1.model.attention.prepare`` made of this forward's pattern: None (SDPA, no mask), a
    dense bool mask (SDPA) or a BlockMask (FlexAttention)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, is_causal: bool, kv_cache: "KVCache | None" = None):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, L, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:  # keys/values of the cached prefix come first
            k, v = kv_cache.keys_values(self.layer_idx, k, v)
        out = attn_backend.attend(q, k, v, attn_mask, is_causal, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    """Pre-norm transformer block. Returns (hidden, router stats [2, E] or an empty tensor)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                           cfg.num_experts_per_tok, cfg.norm_topk_prob)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, attn_mask=None, is_causal: bool = False, kv_cache: "KVCache | None" = None):
        attn_in = self.input_layernorm(x)
        if kv_cache is None:
            x = x + self.self_attn(attn_in, cos, sin, attn_mask, is_causal)
        else:
            x = x + self.self_attn(attn_in, cos, sin, attn_mask, is_causal, kv_cache=kv_cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.mlp(h)
        else:
            out, stats = self.mlp(h), x.new_zeros(0)
        return x + out, stats


class Qwen3(nn.Module):
    """Qwen3 / Qwen3-MoE decoder. ``forward(input_ids)`` returns logits [B, L, V]; with
    ``return_hidden=True`` the final-normed hidden states [B, L, H] instead, so a trainer can apply
    the LM head only at the positions it supervises."""

    def __init__(self, cfg: ModelConfig, attention_mode: str = "causal"):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # The [MASK] token's input embedding, split off the table: RND1's mask id (151669) is a
        # padding row of Qwen3's table that pretraining never updated, and under the recipe's
        # non-attention LR (1e-8) it would never move. As a parameter of its own it gets its own
        # init and learning rate (``init_mask_embedding``, the optimiser's ``mask_embedding``
        # group). Lookups of the mask id read it, never the table row; a tied head still scores
        # the mask id with the table row (never a target, and samplers exclude it). HF import
        # fills it from the table row and export writes it back there (rnd1/checkpoint/hf.py), so
        # files keep the standard Qwen3 layout. Starts as a copy of the row: same function.
        self.mask_embedding = nn.Parameter(self.embed_tokens.weight[cfg.mask_token_id].detach().clone())
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.set_attention_mode(attention_mode)
        self.set_attention_backend("auto")
        self._router_stats: torch.Tensor | None = None
        self._router_rows = 0

    def tie_weights(self) -> None:
        """Make the head share the embedding's parameter when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def to_empty(self, *, device, recurse: bool = True) -> "Qwen3":
        """``nn.Module.to_empty`` gives every module its own new tensor, which unties a tied head
        moved off the meta device; re-tie afterwards."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    # ----------------------------------------------------------------- attention mode
    def set_attention_mode(self, mode: str) -> None:
        """Switch between ``causal`` (AR) and ``bidirectional`` (diffusion) attention in place."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r} unknown; expected one of {ATTENTION_MODES}")
        self.attention_mode = mode

    def set_attention_backend(self, backend: str) -> None:
        """How masked attention runs: ``sdpa`` (dense mask), ``flex`` (FlexAttention BlockMask) or
        ``auto`` (the faster by measurement); see ``rnd1.model.attention``."""
        err = attn_backend.check_backend(backend)
        if err:
            raise ValueError(f"attention backend {backend!r} unknown; {err}")
        self.attention_backend = backend

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attn_mask=None,
                kv_cache: "KVCache | None" = None, return_hidden: bool = False) -> torch.Tensor:
        """``attn_mask`` replaces the mode's pattern: a pattern of ``rnd1.model.attention_masks``
        (block diffusion's [x_t | x_0] stream, the sampler's block-causal prefix) or a bool tensor
        [B or 1, 1, L, L + cached] (True: may attend). It holds the documents itself, so it
        excludes ``doc_ids``. ``kv_cache`` (``rnd1.model.kv_cache``)
        prepends the cached prefix's keys/values in every layer (and appends this call's when the
        cache is in ``commit`` mode): block-by-block sampling of a block-diffusion model."""
        B, L = input_ids.shape
        if attn_mask is not None and doc_ids is not None:
            raise ValueError("pass either attn_mask or doc_ids: an explicit mask already holds the documents")

        causal = self.attention_mode == "causal"
        h = self.embed_tokens(input_ids)
        is_mask = (input_ids == self.config.mask_token_id).unsqueeze(-1)
        h = torch.where(is_mask, self.mask_embedding.to(h.dtype), h)
        if positions is None:
            start = kv_cache.length if kv_cache is not None else 0
            if start + L > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {start + L} exceeds max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
            positions = torch.arange(start, start + L, device=input_ids.device).expand(B, L)
        # explicit positions (block diffusion's [x_t | x0] stream repeats 0..L-1) are the caller's
        # to keep in range: checking them here would read a device tensor on every forward
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        pattern = attn_backend.as_pattern(attn_mask)
        if pattern is None and doc_ids is not None:
            pattern = Documents(doc_ids, causal)
        attn_mask = self._prepare_attention(pattern, h)
        stats_sum = None
        for layer in self.layers:
            if kv_cache is None:
                h, stats = layer(h, cos, sin, attn_mask, causal)
            else:
                h, stats = layer(h, cos, sin, attn_mask, causal, kv_cache=kv_cache)
            if stats.numel():
                stats_sum = stats if stats_sum is None else stats_sum + stats
        self._router_stats = stats_sum
        self._router_rows = B * L * len(self.config.moe_layer_ids)
        h = self.norm(h)
        return h if return_hidden else self.lm_head(h)

    def _prepare_attention(self, pattern, h: torch.Tensor):
        """This forward's mask, once for all layers (see ``rnd1.model.attention.prepare``)."""
        dev = h.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else h.dtype
        needs_grad = torch.is_grad_enabled() and self.mask_embedding.requires_grad
        cfg = self.config
        return attn_backend.prepare(pattern, self.attention_backend, heads=cfg.num_attention_heads,
                                    kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=dtype,
                                    device=dev, needs_grad=needs_grad)

    def moe_aux_loss(self) -> torch.Tensor:
        """Qwen3-MoE load-balancing loss of the last forward (0 for dense models)."""
        if self._router_stats is None:
            return torch.zeros((), device=self.embed_tokens.weight.device)
        return moe_aux_loss(self._router_stats, self._router_rows)

    def tokens_per_expert(self) -> torch.Tensor | None:
        """Routed token copies per expert in the last forward, summed over MoE layers [E]."""
        return None if self._router_stats is None else self._router_stats[0].detach()

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random init for random-init runs (HF's normal(0, 0.02) convention, norms at 1). Works
        after ``to_empty`` from the meta device; with a seed it is reproducible. The mask
        embedding draws nothing of its own: it copies the table's random mask row, so adding it
        left every other parameter's draw (and the model's function) unchanged."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name == "mask_embedding":
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                _normal_(p, std, gen)
        self.init_mask_embedding("table")

    @torch.no_grad()
    def init_mask_embedding(self, how: str, trained_rows: int | None = None) -> None:
        """Set ``mask_embedding`` from the embedding table:

        - ``table``: a copy of the table's mask row (what a lookup of the mask id gave before the
          row was split off: the random row, or a checkpoint's never-trained padding row);
        - ``mean``: the mean of rows ``[0, trained_rows)`` other than the mask row, i.e. of the
          ids the tokenizer produces. An untrained row is what LLaDA 2.0 blames for gradient
          explosions at high mask ratios; the mean is a point inside the trained rows' cloud.

        Works on sharded (DTensor) tables without gathering them: collective under FSDP."""
        cfg, table = self.config, self.embed_tokens.weight
        coeffs = torch.zeros(cfg.vocab_size, dtype=torch.float32)
        if how == "table":
            coeffs[cfg.mask_token_id] = 1.0
        elif how == "mean":
            if trained_rows is None or not 0 < trained_rows <= cfg.vocab_size:
                raise ValueError(f"init_mask_embedding('mean'): trained_rows={trained_rows} must be in "
                                 f"[1, vocab_size={cfg.vocab_size}]")
            coeffs[:trained_rows] = 1.0
            if cfg.mask_token_id < trained_rows:
                coeffs[cfg.mask_token_id] = 0.0
            n = int(coeffs.sum().item())
            if n == 0:
                raise ValueError(f"init_mask_embedding('mean'): no trained row below {trained_rows} besides "
                                 f"the mask id {cfg.mask_token_id}")
            coeffs /= n
        else:
            raise ValueError(f"init_mask_embedding: {how!r} unknown; expected 'table' or 'mean'")
        _copy_full(self.mask_embedding, _combine_rows(table, coeffs))

    # ----------------------------------------------------------------- accounting
    def num_params(self) -> dict[str, int]:
        return self.config.param_counts()


def _normal_(p: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    """Fill p with N(0, std^2), drawing on the CPU generator so the result does not depend on the
    device; DTensor shards draw the full tensor and keep their slice (simple and reproducible)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    vals = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    if isinstance(p, DTensor):
        vals = distribute_tensor(vals.to(p.device), p.device_mesh, p.placements)
    p.copy_(vals.to(p.dtype))


def _combine_rows(table: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``coeffs @ table`` in fp32 as a full [H] CPU tensor. A DTensor table (FSDP shards its rows)
    is contracted against ``coeffs`` sharded the same way: each rank sums its own rows and DTensor
    all-reduces H numbers, instead of every rank gathering the whole vocabulary."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(table, DTensor):
        c = distribute_tensor(coeffs.to(table.device), table.device_mesh, table.placements, src_data_rank=None)
        return (c.unsqueeze(0) @ table.float()).full_tensor()[0].cpu()
    return (coeffs.to(table.device) @ table.float()).cpu()


def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``p``; a DTensor keeps the slice its placements give this rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(full.to_local())
    else:
        p.copy_(full.to(p.device, p.dtype))


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype=torch.float32,
                attention_mode: str = "causal", seed: int | None = 0) -> Qwen3:
    """Construct on the meta device (nothing allocated), then materialise on ``device`` and
    initialise. For very large models call ``Qwen3(cfg)`` under ``torch.device("meta")`` and let
    ``rnd1.parallel`` shard before materialising."""
    with torch.device("meta"):
        model = Qwen3(cfg, attention_mode=attention_mode)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model.to(dtype)


