"""Held-out likelihood of a checkpoint on a token dataset: the per-token NELBO and its bound on
the perplexity, with a standard error, as MDLM and BD3-LM report ``ppl_eval``.

For a diffusion objective the NELBO per token is

    NELBO = E_t [ (1/t) * sum over masked positions of -log p(x0_j | x_t) ] / (scored positions)

Here the expectation over t is a fixed quadrature (``t_grid``, every point weighted equally: the
midpoints of K equal strata by default), each grid point with its own fixed masking seed, and
the windows are the first ``num_sequences`` non-overlapping windows of the split, so two
checkpoints are scored on exactly the same tokens and masks. exp(NELBO) bounds the perplexity
from above. The AR objective gives its exact NLL per token over the same positions (no masks).

The standard error treats sequences as the sampling unit: NELBO = sum_i a_i / sum_i n_i (a_i:
sequence i's weighted CE over the grid, n_i: its scored positions times the grid size), and the
ratio's error follows from the delta method. It covers the spread over sequences and masks, not
the quadrature's bias (which shrinks as the grid grows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rnd1.diffusion.objective import Objective, get_objective


@dataclass
class HeldOutResult:
    objective: str
    nelbo: float  # per token (the exact NLL per token for AR)
    stderr: float
    ppl_bound: float  # exp(nelbo): an upper bound on the perplexity (exact perplexity for AR)
    ppl_low: float  # exp(nelbo - 1.96 stderr)
    ppl_high: float  # exp(nelbo + 1.96 stderr)
    sequences: int
    tokens: int  # scored positions (per grid point)
    t_grid: list[float]
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


# The one quadrature of E_t: scripts/eval_ppl.py's default and the training validation's default
# eval.val_t_grid, so a checkpoint has one NELBO whichever reports it.
DEFAULT_T_POINTS = 8


def midpoint_grid(points: int) -> list[float]:
    """Midpoints of ``points`` equal strata of (0, 1]: a stratified quadrature of E_t."""
    if points < 1:
        raise ValueError(f"t grid needs at least one point, got {points}")
    return [(k + 0.5) / points for k in range(points)]


def _row_weighted_ce(hidden: torch.Tensor, head: torch.Tensor, select: torch.Tensor, targets: torch.Tensor,
                     weights: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[B] sum over row b's supervised outputs of weight * CE, the logits made ``chunk`` rows at a
    time (never the [B, L, V] tensor)."""
    rows = select.nonzero()[:, 0]
    h, tgt, w = hidden[select], targets[select], weights[select]
    out = torch.zeros(select.shape[0], dtype=torch.float64, device=hidden.device)
    for s in range(0, h.shape[0], chunk):
        logits = (h[s:s + chunk].float() @ head.float().t())
        ce = F.cross_entropy(logits, tgt[s:s + chunk], reduction="none") * w[s:s + chunk]
        out.index_add_(0, rows[s:s + chunk], ce.double())
    return out


@torch.no_grad()
def heldout_nelbo(model, objective: "str | Objective", split, *, mask_id: int, seq_len: int, num_sequences: int,
                  batch_size: int = 8, t_grid: list[float] | None = None, seed: int = 0,
                  device: torch.device | str = "cpu", eos_id: int = 0) -> HeldOutResult:
    """A split with loss masks (chat data, ``rnd1.data.chat``) is read the way SFT trains on it:
    whole conversations packed into EOS-padded windows, documents kept apart, and only response
    tokens masked and scored: the per-token NELBO of the responses (``eos_id`` pads)."""
    from rnd1.data.loader import ConversationWindows, TextWindows

    objective = get_objective(objective)
    chat = getattr(split, "has_flags", False)
    windows = ConversationWindows(split, seq_len, eos_id, True) if chat else TextWindows(split, seq_len)
    if windows.num_windows < 1:
        raise ValueError(f"{split.name}: {len(split)} tokens make no window of {seq_len}")
    n_seq = min(num_sequences, windows.num_windows)
    grid = list(t_grid or midpoint_grid(8)) if objective.masks else [None]
    a = np.zeros(n_seq)  # weighted CE per sequence, summed over the grid
    n = np.zeros(n_seq)  # scored positions per sequence, times the grid size
    scored = objective.scored(seq_len)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n_seq, batch_size):
            ids = list(range(start, min(start + batch_size, n_seq)))
            got = [windows.get(i) for i in ids]
            x0 = torch.from_numpy(np.stack([w.tokens for w in got]).astype(np.int64))
            loss = torch.from_numpy(np.stack([w.loss for w in got])) if chat else None
            docs = torch.from_numpy(np.stack([w.doc_ids for w in got]).astype(np.int32)) if chat else None
            for k, t in enumerate(grid):
                c = objective.corrupt(x0, mask_id, seed=seed + k, sample_ids=torch.tensor(ids), samples_per_step=1,
                                      fixed_t=t, loss_mask=loss)
                tg = objective.targets(x0, c).to(device)
                hidden = objective.forward(model, c, x0, docs, device=device, return_hidden=True)
                a[start:start + len(ids)] += _row_weighted_ce(hidden, model.lm_head.weight, tg.select, tg.targets,
                                                              tg.weights).cpu().numpy()
                per_row = (loss & scored).sum(1).numpy() if chat else float(scored.sum())
                n[start:start + len(ids)] += per_row
    finally:
        model.train(was_training)
    ratio = a.sum() / n.sum()
    if n_seq > 1:  # delta method for a ratio of sums over sequences
        resid = a - ratio * n
        stderr = math.sqrt(n_seq / (n_seq - 1) * (resid ** 2).sum()) / n.sum()
    else:
        stderr = float("nan")
    return HeldOutResult(objective.name, float(ratio), stderr, math.exp(ratio), math.exp(ratio - 1.96 * stderr),
                         math.exp(ratio + 1.96 * stderr), n_seq, int(n.sum() / len(grid)),
                         [g for g in grid if g is not None], seed)
