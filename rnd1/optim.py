"""AdamW with per-group learning rates, and learning-rate schedules in token space.

Knowledge retention in RND1 comes from treating attention and everything else differently:
attention must learn bidirectional context, while the factual knowledge stored in the MLPs /
experts and embeddings should be disturbed as little as possible. The paper's Settings 1-4
(Fig. 4.1) are pairs of (peak LR, weight decay) for the two groups, e.g. attention 3e-4 with
non-attention 1e-8, weight decay 0.1 — each expressible as ``[optimizer]`` keys. A third, optional
group holds the [MASK] embedding alone (``Qwen3.mask_embedding``): under Setting 4 the mask token's
row would otherwise stay where pretraining left it, an untrained padding row.

Schedules are functions of tokens seen, not steps, so runs with different global batch sizes
(the critical-batch-size sweep) warm up and decay over the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Callable

import torch

GROUP_NAMES = ("attention", "non_attention", "mask_embedding")


@dataclass
class GroupSpec:
    lr: float
    weight_decay: float = 0.0


def is_attention_param(name: str) -> bool:
    """q/k/v/o projections and the per-head q/k norms."""
    return ".self_attn." in name


def is_mask_embedding_param(name: str) -> bool:
    """The model's separate [MASK] input embedding (``Qwen3.mask_embedding``), under any wrapper."""
    return name == "mask_embedding" or name.endswith(".mask_embedding")


def param_groups(model: torch.nn.Module, *, attention: GroupSpec, non_attention: GroupSpec,
                 mask_embedding: GroupSpec | None = None) -> list[dict]:
    """Split parameters into the attention and non-attention groups, and the [MASK] embedding
    into a group of its own when ``mask_embedding`` is given (None: it is non-attention like the
    rest of the embeddings). A group whose peak lr is 0 is frozen: requires_grad is switched off
    and it is left out of the optimiser, so no Adam state is allocated for it."""
    specs = {"attention": attention, "non_attention": non_attention, "mask_embedding": mask_embedding}
    members: dict[str, list] = {k: [] for k in GROUP_NAMES}
    seen = set()
    for name, p in model.named_parameters():  # tied parameters appear once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_attention_param(name):
            members["attention"].append(p)
        elif is_mask_embedding_param(name) and mask_embedding is not None:
            members["mask_embedding"].append(p)
        else:
            members["non_attention"].append(p)
    if mask_embedding is not None and not members["mask_embedding"]:
        raise ValueError("optimizer: a mask_embedding group was asked for but the model has no mask_embedding "
                         "parameter")
    groups = []
    for gname in GROUP_NAMES:
        spec, params = specs[gname], members[gname]
        if spec is None:
            continue
        if spec.lr < 0:
            raise ValueError(f"optimizer: lr of group {gname} must be >= 0, got {spec.lr}")
        if spec.lr == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        if params:
            groups.append({"params": params, "name": gname, "lr": spec.lr, "peak_lr": spec.lr,
                           "weight_decay": spec.weight_decay})
    if not groups:
        raise ValueError("optimizer: every parameter group has lr 0: nothing to train")
    return groups


ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


def build_optimizer(model, *, attention: GroupSpec, non_attention: GroupSpec,
                    mask_embedding: GroupSpec | None = None, betas=(0.9, 0.95), eps: float = 1e-8,
                    implementation: str = "fused") -> torch.optim.AdamW:
    """AdamW over ``param_groups``. ``implementation="auto"`` starts as ``foreach`` (which every
    device runs) until the trainer has measured the candidates (``adamw_tuning_candidates``) and
    switched to the faster with ``set_adamw_implementation``, before the first step."""
    if implementation not in (*ADAMW_IMPLEMENTATIONS, "auto"):
        raise ValueError(f"optimizer.implementation {implementation!r}: expected auto, fused, foreach or for-loop")
    start = "foreach" if implementation == "auto" else implementation
    groups = param_groups(model, attention=attention, non_attention=non_attention, mask_embedding=mask_embedding)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=start == "foreach", fused=start == "fused")


def set_adamw_implementation(optimizer: torch.optim.AdamW, implementation: str) -> None:
    """Switch AdamW's kernel in place. The trainer calls it after a resume too: the saved param
    groups carry the flags of the run that wrote them, and the config (or this machine's
    measurement) decides, not the checkpoint. The three kernels keep the same state; only the step
    counter's home differs (the fused kernel reads it on the parameter's device, the others on the
    CPU, as ``torch.optim.AdamW`` lays it out when it creates the state)."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"optimizer.implementation {implementation!r}: expected one of {ADAMW_IMPLEMENTATIONS}")
    fused = implementation == "fused"
    if fused:
        bad = {p.device.type for g in optimizer.param_groups for p in g["params"]} - set(_fused_devices())
        if bad:
            raise ValueError(f"optimizer.implementation 'fused': no fused AdamW on {sorted(bad)}; use foreach")
    optimizer._step_supports_amp_scaling = fused  # only the fused kernel takes a GradScaler's scale
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = fused, implementation == "foreach"
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                home = p.device if fused or group.get("capturable") else torch.device("cpu")
                state["step"] = state["step"].to(device=home, dtype=torch.float32)


def adamw_tuning_candidates(params, *, max_elements: int = 1 << 23) -> tuple[str, tuple, Callable[[], dict]]:
    """(shape key, candidate names, a function making {name: one AdamW step}) for
    ``rnd1.kernels.autotune``, which calls the function only when the key is not cached, on the rank
    that measures. The steps run over copies of the parameters as the run holds them (DTensor
    shards stay DTensors, so foreach pays the per-op dispatch it would pay in the run), with
    made-up gradients: measuring never touches the model. Up to ``max_elements`` local elements
    are copied, in parameter order (all of them for a model up to 8M parameters per rank); a
    step's cost depends on the tensors' count and sizes, so the key names both. The kernels
    compute the same update (tests/test_optim.py). Every op here is local: no collective runs,
    so one rank can measure alone."""
    sample, n, total = [], 0, 0
    for p in params:
        size = (p.to_local() if hasattr(p, "to_local") else p).numel()
        total += 1
        if n + size <= max_elements or not sample:
            sample.append(p.detach())
            n += size
    if not sample:
        raise ValueError("adamw_tuning_candidates: no parameters")
    dtype, device = sample[0].dtype, sample[0].device
    names = tuple(i for i in ADAMW_IMPLEMENTATIONS[:2] if i != "fused" or device.type in _fused_devices())

    def make() -> dict:
        candidates = {}
        for impl in names:
            copies = [torch.nn.Parameter(t.clone()) for t in sample]
            for c in copies:
                c.grad = c.detach().clone().mul_(1e-3)  # a local op, also on a DTensor (no RNG sync)
            opt = torch.optim.AdamW(copies, lr=1e-4, weight_decay=0.1, foreach=impl == "foreach",
                                    fused=impl == "fused")
            candidates[impl] = opt.step
        return candidates

    part = "" if len(sample) == total else f" (of {total})"
    return f"{len(sample)} tensors{part}, {n} elements, {dtype}", names, make


def _fused_devices() -> list:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return _get_fused_kernels_supported_devices()


def scale_lr(eta0: float, batch_tokens: int, base_batch_tokens: int) -> float:
    """eta(B) = eta0 * sqrt(B / B0): the square-root rule RND1 uses across batch sizes."""
    return eta0 * math.sqrt(batch_tokens / base_batch_tokens)


DECAYS = ("constant", "linear", "cosine", "wsd")


class TokenSchedule:
    """LR multiplier as a function of tokens seen: linear warmup over ``warmup_tokens``, then

    - ``constant``: 1 (the RND1 recipe);
    - ``linear`` / ``cosine``: decay to ``min_lr_ratio`` at ``total_tokens``;
    - ``wsd``: warmup-stable-decay, constant until the last ``decay_fraction`` of tokens, then
      linear to ``min_lr_ratio``."""

    def __init__(self, warmup_tokens: int, total_tokens: int, decay: str = "constant",
                 decay_fraction: float = 0.1, min_lr_ratio: float = 0.0):
        if decay not in DECAYS:
            raise ValueError(f"lr_schedule.decay_type {decay!r}: expected one of {DECAYS}")
        if warmup_tokens < 0 or total_tokens <= 0:
            raise ValueError(f"lr_schedule: warmup_tokens={warmup_tokens} must be >= 0 and total_tokens="
                             f"{total_tokens} > 0")
        self.warmup, self.total, self.decay = warmup_tokens, total_tokens, decay
        self.decay_fraction, self.min_ratio = decay_fraction, min_lr_ratio
        self.last_factor = 0.0

    def factor(self, tokens: int) -> float:
        if self.warmup > 0 and tokens < self.warmup:
            return (tokens + 1) / (self.warmup + 1)
        if self.decay == "constant":
            return 1.0
        if self.decay == "wsd":
            start = self.total * (1.0 - self.decay_fraction)
            if tokens < start:
                return 1.0
            progress = min(1.0, (tokens - start) / max(self.total - start, 1))
            return 1.0 - (1.0 - self.min_ratio) * progress
        progress = min(1.0, max(0.0, (tokens - self.warmup) / max(self.total - self.warmup, 1)))
        if self.decay == "linear":
            return 1.0 - (1.0 - self.min_ratio) * progress
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, tokens: int) -> dict[str, float]:
        """Set every group's lr for the update that follows ``tokens`` tokens; return them by name."""
        f = self.factor(tokens)
        self.last_factor = f
        out = {}
        for g in optimizer.param_groups:
            g["lr"] = g["peak_lr"] * f
            out[g.get("name", str(len(out)))] = g["lr"]
        return out

    def state_dict(self) -> dict:
        return {"warmup": self.warmup, "total": self.total, "decay": self.decay, "last_factor": self.last_factor}

    def load_state_dict(self, state: dict) -> None:
        self.last_factor = state.get("last_factor", 0.0)
