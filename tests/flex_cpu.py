"""FlexAttention gradients on the CPU, for tests only.

torch 2.13 refuses FlexAttention with gradients on the CPU (``_validate_device``) and inductor
has no CPU backward kernel, so ``rnd1`` refuses to train with ``attention_backend='flex'`` there.
The flex path's gradients can still be checked: torch's eager FlexAttention (the reference its
GPU kernels are tested against) differentiates on the CPU once that check is lifted. The
BlockMask, the mask_mod and every line of rnd1 between them are the ones a GPU run uses; only the
kernel computing the scores differs."""

from __future__ import annotations

import warnings
from contextlib import contextmanager


@contextmanager
def flex_gradients_on_cpu():
    import torch.nn.attention.flex_attention as fa

    from rnd1.model import attention

    saved = fa._validate_device, attention.flex_backward_supported, attention._compiled.get("flex")
    fa._validate_device = lambda *args: None
    attention.flex_backward_supported = lambda device: True
    attention._compiled["flex"] = fa.flex_attention  # eager: the unfused reference
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            yield
    finally:
        fa._validate_device, attention.flex_backward_supported = saved[:2]
        if saved[2] is None:
            attention._compiled.pop("flex", None)
        else:
            attention._compiled["flex"] = saved[2]
