"""Critical batch size by branched training (RND1 Fig. 3.2).

One checkpoint is branched into runs that differ only in the global batch size B (tokens): the
same initial weights, the same data order (samples are drawn in one global order whatever the
batch size), the same token budget, warmup and evaluation points aligned in tokens, and peak
learning rates scaled as eta(B) = eta0 * sqrt(B / B0). Comparing validation loss at equal tokens
shows where larger batches stop being token-efficient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rnd1.optim import scale_lr


@dataclass
class Branch:
    name: str
    batch_tokens: int
    steps: int
    lr_attention: float
    lr_non_attention: float
    eval_interval: int
    overrides: list[str] = field(default_factory=list)


def make_branches(*, checkpoint: str, batch_tokens: list[int], token_budget: int, base_batch_tokens: int,
                  lr_attention: float, lr_non_attention: float, warmup_tokens: int, eval_tokens: int,
                  seq_len: int, out_dir: str) -> list[Branch]:
    """One Branch per global batch size; raises ValueError when the budget or the evaluation
    points cannot be aligned in tokens for some B."""
    branches = []
    for B in sorted(batch_tokens):
        if B % seq_len:
            raise ValueError(f"batch of {B} tokens is not a multiple of seq_len {seq_len}")
        if token_budget % B:
            raise ValueError(f"token budget {token_budget} is not a multiple of batch {B}: steps would not align")
        if eval_tokens % B:
            raise ValueError(f"evaluation every {eval_tokens} tokens is not a multiple of batch {B}")
        steps = token_budget // B
        la = scale_lr(lr_attention, B, base_batch_tokens)
        ln = scale_lr(lr_non_attention, B, base_batch_tokens)
        name = f"bs{B}"
        ov = [f"--training.global_batch_tokens={B}", f"--training.steps={steps}", "--training.total_tokens=0",
              f"--optimizer.lr_attention={la}", f"--optimizer.lr_non_attention={ln}",
              # warmup in tokens, the same for every branch; the config's warmup_fraction never applies
              f"--lr_schedule.warmup_tokens={max(warmup_tokens, 0)}", "--lr_schedule.warmup_fraction=0",
              "--lr_schedule.scale_with_batch=false",
              f"--eval.interval={eval_tokens // B}", f"--checkpoint.interval={steps}",
              f"--checkpoint.initial_load_path={checkpoint}", "--checkpoint.initial_load_format=dcp",
              "--model.init=pretrained", f"--job.dump_folder={out_dir}/{name}"]
        branches.append(Branch(name, B, steps, la, ln, eval_tokens // B, ov))
    return branches


def estimate_cbs(final_loss: dict[int, float], tolerance: float = 0.01) -> tuple[int, str]:
    """The largest batch whose loss at the common token budget is within ``tolerance`` (relative)
    of the best batch's loss: beyond it, a bigger batch costs tokens. Returns (B, rule)."""
    if not final_loss:
        raise ValueError("no runs to estimate a critical batch size from")
    best = min(final_loss.values())
    ok = [B for B, loss in final_loss.items() if loss <= best * (1 + tolerance)]
    rule = (f"largest global batch whose validation loss at the shared token budget is within "
            f"{tolerance:.1%} of the best ({best:.4f})")
    return max(ok), rule
