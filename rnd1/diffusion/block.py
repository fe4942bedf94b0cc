"""Block diffusion (BD3-LM; SDAR, LLaDA 2.0): autoregressive over blocks, diffusion inside each.

The sequence is cut into blocks of ``block_size`` positions. The likelihood factorises over
blocks, log p(x) = sum_b log p(x_b | x_<b), and each factor is bounded by the masked-diffusion
ELBO of that block alone: block b draws its own t_b, its tokens are masked with probability t_b,
and the model denoises them seeing the CLEAN earlier blocks and its own noisy tokens. The loss
is the sum of the per-block bounds (weights 1/t_b), divided by the scored positions as usual.

**One forward pass for all blocks** (BD3-LM's vectorised training): the model reads the 2L
tokens [x_t | x0], both halves at positions 0..L-1, with this attention (block(i) = i // B)::

                     keys: x_t (noisy)           keys: x0 (clean)
    queries x_t      same block                   earlier blocks
    queries x0       never                        same or earlier blocks (block-causal)

A noisy block sees itself and the clean prefix; the clean half is a block-causal model of x0
that serves as that prefix. Only x_t outputs are scored, except in A2D (below). At inference
this is exactly one sequence under block-causal attention (committed blocks clean, the current
block noisy), so committed blocks' keys/values never change: the sampler caches them
(``rnd1.model.kv_cache``) and each denoising step runs one block.

**A2D blocks.** Output i predicts position i+1. Inside a block, the noisy output i predicts the
masked i+1. A block's FIRST position s has no noisy predecessor in its block; it is predicted
by the clean output s-1 (which sees the clean blocks up to s-1: an AR prediction from the clean
prefix, the AR head's own job). So block size 1 is AR (every position predicted from the clean
prefix, in expectation weighted 1/t x t = 1) and block size L is A2D: the block-size warm-up
(LLaDA 2.0: 1 -> 4 -> 32 -> 64 -> L, then down) moves from AR to full diffusion without ever
changing what an output means.

Worked example, A2D, L = 4, B = 2, masked = [0, 1, 1, 0] (position 0 is never masked)::

    stream   = [A, M | M, D] + [A, B | C, D]        (x_t | x0, positions 0..3 twice)
    noisy output 0 -> position 1 (B), same block      weight 1/t_0
    clean output 1 -> position 2 (C), a block start   weight 1/t_1
    scored   = positions 1..3 (3)    loss = (CE(B)/t_0 + CE(C)/t_1) / 3

**Memory and speed.** The stream's attention is described, not built: ``model_inputs`` passes
a ``TwoStream`` pattern (``rnd1.model.attention_masks``, where the dense builder
``two_stream_mask`` and the FlexAttention ``mask_mod`` sit side by side). With the ``sdpa``
backend the model builds the boolean 2L x 2L mask, (2L)^2 bytes (64 MiB at L = 4096), shared by
every row and head unless documents are masked (then one per row); never a dense float tensor of
[B, heads, 2L, 2L] (8 GiB per row at L = 4096, 32 heads, fp32: the OOM users of other trainers
report). With ``flex`` it builds a BlockMask of (2L / 128)^2 tiles and FlexAttention skips the
empty ones (about 70% at L = 2048, blocks of 32). One block covering the whole row needs no
clean half: it is the plain objective, run on L tokens.
"""

from __future__ import annotations

import torch

from rnd1.diffusion.corruption import Corruption, corrupt_rows
from rnd1.diffusion.objective import Objective, Targets
from rnd1.model.attention_masks import TwoStream, block_causal_mask, block_ids, two_stream_mask  # noqa: F401


class BlockDiffusion(Objective):
    """Shared by both variants; ``shift`` says which (0: MDLM blocks, 1: A2D blocks)."""

    masks = True
    attention = "bidirectional"  # inside a block; the structure comes with ``model_inputs``

    def __init__(self, *, block_size: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"{self.name} needs block_size, a positive int (got {block_size!r})")
        self.block_size = block_size

    def two_streams(self, length: int) -> bool:
        """Whether the forward needs the clean half: more than one block."""
        return self.block_size < length

    # ----------------------------------------------------------------- corruption
    def corrupt(self, x0: torch.Tensor, mask_id: int, *, seed: int, sample_ids: torch.Tensor,
                samples_per_step: int, fixed_t: float | None = None,
                loss_mask: torch.Tensor | None = None, complementary: bool = False) -> Corruption:
        """One t per block (``fixed_t``: every block at that level)."""
        return corrupt_rows(x0, mask_id, seed=seed, sample_ids=sample_ids, samples_per_step=samples_per_step,
                            eps=self.eps, low_discrepancy=self.low_discrepancy, fixed_t=fixed_t,
                            protect=~self.maskable(x0, loss_mask), block_size=self.block_size,
                            complementary=complementary)

    # ----------------------------------------------------------------- the forward pass
    def model_inputs(self, c: Corruption, x0: torch.Tensor, doc_ids: torch.Tensor | None = None) -> dict:
        B, L = x0.shape
        if not self.two_streams(L):
            return {"input_ids": c.x_t, "doc_ids": doc_ids}
        pos = torch.arange(L, device=x0.device)
        return {"input_ids": torch.cat([c.x_t, x0.to(c.x_t.device)], dim=1),
                "positions": torch.cat([pos, pos]).expand(B, 2 * L),
                "attn_mask": TwoStream(L, self.block_size, doc_ids, device=x0.device)}

    def _predicting_output(self, length: int, device=None) -> torch.Tensor:
        """[L] index into the 2L outputs of the one that predicts each position: the noisy output
        j - shift when it lies in j's block, else (a block start, A2D) the clean output L + j - shift.
        Negative for the first ``shift`` positions, which no output predicts."""
        src = torch.arange(length, device=device) - self.shift
        blk = block_ids(length, self.block_size, device)
        inner = (src >= 0) & (blk[src.clamp_min(0)] == blk)
        return torch.where(inner | (src < 0), src, length + src)

    # ----------------------------------------------------------------- supervision
    def targets(self, x0: torch.Tensor, c: Corruption) -> Targets:
        """On the grid of outputs: [B, L] with one block, [B, 2L] (noisy, then clean) otherwise."""
        B, L = x0.shape
        if not self.two_streams(L):
            return super().targets(x0, c)
        s = self.shift
        pos = self.supervised_positions(x0, c)
        w = self.position_weights(c).to(x0.device)
        select = torch.zeros(B, 2 * L, dtype=torch.bool, device=x0.device)
        targets = torch.zeros(B, 2 * L, dtype=x0.dtype, device=x0.device)
        weights = torch.zeros(B, 2 * L, dtype=torch.float32, device=x0.device)
        out = self._predicting_output(L, x0.device)
        ok = torch.arange(L, device=x0.device) >= s  # positions some output predicts
        out = out[ok]
        select[:, out] = pos[:, ok]
        targets[:, out] = x0[:, ok]
        weights[:, out] = w[:, ok]
        return Targets(select, targets, torch.where(select, weights, 0.0))

    # ----------------------------------------------------------------- reading predictions
    def predictions(self, outputs: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """[B, 2L, ...] outputs of the two-stream forward (or [B, L, ...] with one block) ->
        [B, L, ...] predictions for each position (position 0 of A2D: NaN)."""
        L = outputs.shape[1] if length is None else length
        if outputs.shape[1] != 2 * L:
            return super().predictions(outputs)
        pred = outputs[:, self._predicting_output(L, outputs.device).clamp_min(0)]
        if self.shift:
            pred[:, :self.shift] = float("nan")
        return pred


class BlockA2D(BlockDiffusion):
    name = "block_a2d"
    shift = 1


class BlockMDLM(BlockDiffusion):
    name = "block_mdlm"
    shift = 0
