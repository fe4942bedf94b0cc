"""Activation checkpointing per transformer block: ``none``, ``full`` or ``selective``.

``selective`` is the paper's "Selective" recompute: the outputs of matmuls (dense, attention on
SDPA or FlexAttention, grouped expert GEMMs) are saved, while cheap element-wise work — RMSNorms, RoPE, SwiGLU, the
MoE's routing softmax and combine — is recomputed in backward. It keeps most of full
recomputation's memory saving at a fraction of its extra FLOPs.
"""

from __future__ import annotations

from functools import partial

import torch
import rnd1.kernels.grouped_gemm  # noqa: F401  (registers torch.ops.rnd1_kernels.grouped_mm)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")


def _save_ops() -> set:
    ops = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.linear.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        # FlexAttention (model.attention_backend flex/auto), a higher-order op: its output is saved
        # like SDPA's rather than recomputed (torchtitan saves it too).
        torch.ops.higher_order.flex_attention,
    }
    # Expert-parallel token exchange: save, never re-send during recomputation.
    ops.add(torch.ops._c10d_functional.all_to_all_single.default)
    ops.add(torch.ops._c10d_functional_autograd.all_to_all_single.default)
    ops.add(torch.ops._c10d_functional.wait_tensor.default)
    if hasattr(torch.ops.aten, "_grouped_mm"):
        ops.add(torch.ops.aten._grouped_mm.default)
    # The project's own grouped GEMM custom op, once registered by rnd1.kernels.grouped_gemm.
    ns = getattr(torch.ops, "rnd1_kernels", None)
    if ns is not None and hasattr(ns, "grouped_mm"):
        ops.add(ns.grouped_mm.default)
    return ops


def _policy(save_ops, ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(partial(_policy, _save_ops()))


def wrap_block(block: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "none":
        return block
    if mode == "full":
        return checkpoint_wrapper(block, preserve_rng_state=False)
    if mode == "selective":
        return checkpoint_wrapper(block, context_fn=_selective_context, preserve_rng_state=False)
    raise ValueError(f"activation_checkpoint.mode {mode!r} unknown; expected one of {AC_MODES}")


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Wrap every block of ``model.layers`` in place."""
    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        model.layers[i] = wrap_block(block, mode)
