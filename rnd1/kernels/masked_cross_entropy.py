"""Weighted cross-entropy of a linear head at selected positions, without the [N, V] logits.

    loss = sum_{i selected} weights[i] * (logsumexp(hidden[i] @ W^T) - hidden[i] @ W[targets[i]])

For A2D training on Qwen3 (V = 151,936) the logits of a micro-batch are the largest tensor of
the step; this op never materialises them. Both paths compute the gradients of ``hidden`` and
``weight`` during the forward pass, chunk by chunk (Liger-Kernel's fused-linear-CE idea), and
scale them by the incoming gradient in backward, so each chunk's logits are computed exactly
once and freed at once.

- reference (CPU, and the semantics): loops over chunks of ``chunk_tokens`` rows; per chunk, one
  [c, V] logits block in fp32, softmax, the gradient block, two matmuls.
- triton (CUDA, or CPU under TRITON_INTERPRET=1): ``rnd1/kernels/masked_cross_entropy_triton.py``,
  vocabulary-tiled with an online log-sum-exp for the loss; the gradients go through bounded
  blocks of g = w (softmax - onehot) (at most 2^25 elements) and GEMMs that write each gradient
  element once: no atomics, deterministic.
"""

from __future__ import annotations

import torch

from rnd1.kernels.backend import autocast_operands, resolve_backend

DEFAULT_CHUNK_TOKENS = 256
CHUNK_CANDIDATES = (128, 256, 512, 1024, 2048)  # what ``auto`` measures (rnd1.kernels.autotune)
_tuned_chunk: int | None = None


def set_tuned_chunk_tokens(n: int | None) -> None:
    """The token-chunk size a measurement chose for this run (None: ``DEFAULT_CHUNK_TOKENS``).
    Used by calls that do not pass ``chunk_tokens``; any size computes the same loss."""
    global _tuned_chunk
    if n is not None and n <= 0:
        raise ValueError(f"chunk size must be > 0, got {n}")
    _tuned_chunk = n


def tuning_candidates(rows: int, hidden: int, vocab: int, *, dtype=torch.float32, device="cpu",
                      seed: int = 0) -> dict:
    """Closures running the loss with gradients at these shapes, one per chunk size (sizes
    beyond ``rows`` are the same computation as ``rows`` and are left out)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=g) * 0.1).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    tgt = torch.randint(0, vocab, (rows,), generator=g).to(device)
    wt = torch.ones(rows, device=device)
    sizes = [c for c in CHUNK_CANDIDATES if c < rows] + [min(rows, CHUNK_CANDIDATES[-1])]

    def run(c):
        def f():
            masked_cross_entropy(h, w, tgt, wt, chunk_tokens=c).backward()
            h.grad = w.grad = None
        return f

    return {str(c): run(c) for c in dict.fromkeys(sizes)}
# chunk_tokens=0 selects the two-pass vocabulary-chunked path; its logits block holds this many elements
VOCAB_CHUNK_ELEMS = 1 << 23  # 32 MiB of fp32 logits: small next to dW, large enough for efficient matmuls


def _mask_rows(targets, weights, select, ignore_index):
    """Unselected and ignored rows get weight 0 (and a valid dummy target): no data-dependent
    shapes, so the op compiles with fullgraph. Gather the rows you need first when few are
    selected: the trainer passes only supervised rows."""
    keep = targets != ignore_index
    if select is not None:
        keep = keep & select
    return torch.where(keep, targets, torch.zeros_like(targets)), torch.where(keep, weights, torch.zeros_like(weights))


@torch.no_grad()
def _fused_forward_reference(hidden, weight, targets, weights, chunk_tokens, need_grads):
    """Returns (loss scalar, d_hidden [N, H], d_weight [V, H]) accumulated in fp32 (fp64 for
    fp64 inputs, which the tests use as an oracle)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    N = hidden.shape[0]
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    dh = torch.empty(N, hidden.shape[1], dtype=acc, device=hidden.device) if need_grads else None
    dw = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_grads else None
    for s in range(0, N, chunk_tokens):
        h = hidden[s:s + chunk_tokens]
        logits = (h @ weight.t()).to(acc)  # [c, V]: the only logits block alive
        t = targets[s:s + chunk_tokens]
        wt = weights[s:s + chunk_tokens].to(acc)
        # One exp pass serves both the loss and the gradient (logsumexp + a second exp took two).
        target_logit = logits.gather(1, t[:, None]).squeeze(1)
        row_max = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: unnormalised softmax
        sum_exp = probs.sum(dim=-1)
        lse = row_max.squeeze(1) + sum_exp.log()
        loss += (wt * (lse - target_logit)).sum()
        if need_grads:
            # d loss / d logits = w * (softmax - onehot), computed in place on the logits block
            probs.mul_((wt / sum_exp)[:, None])
            probs.scatter_add_(1, t[:, None], -wt[:, None])
            g = probs.to(hidden.dtype)  # matmuls in the input dtype (bf16 on the fast path)
            dh[s:s + chunk_tokens] = g @ weight
            dw.addmm_(g.t().to(acc), h.to(acc))
    return loss, dh, dw


@torch.library.custom_op("rnd1_kernels::masked_ce_fused", mutates_args=())
def _fused_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              chunk_tokens: int, backend: str, need_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_hidden, d_weight) for an incoming gradient of 1 (empty grads if not needed)."""
    if backend == "triton":
        from rnd1.kernels.masked_cross_entropy_triton import fused_forward_triton

        loss, dh, dw = fused_forward_triton(hidden, weight, targets, weights, need_grads)
    elif chunk_tokens <= 0:
        loss, dh, dw = _two_pass_vocab_chunked_reference(hidden, weight, targets, weights, VOCAB_CHUNK_ELEMS,
                                                         need_grads)
    else:
        loss, dh, dw = _fused_forward_reference(hidden, weight, targets, weights, chunk_tokens, need_grads)
    if not need_grads:
        dh, dw = hidden.new_empty(0, dtype=loss.dtype), weight.new_empty(0, dtype=loss.dtype)
    return loss, dh, dw


@_fused_op.register_fake
def _(hidden, weight, targets, weights, chunk_tokens, backend, need_grads):
    acc = torch.promote_types(hidden.dtype, torch.float32)
    loss = hidden.new_empty((), dtype=acc)
    if not need_grads:
        return loss, hidden.new_empty(0, dtype=acc), weight.new_empty(0, dtype=acc)
    if backend == "triton":  # every gradient element written once by a GEMM, in the input dtype
        return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape, dtype=hidden.dtype)
    dw_dtype = weight.dtype if (chunk_tokens <= 0 and weight.dtype != torch.float64) else acc
    return loss, hidden.new_empty(hidden.shape, dtype=acc), weight.new_empty(weight.shape, dtype=dw_dtype)


@torch.no_grad()
def _two_pass_vocab_chunked_reference(hidden, weight, targets, weights, vocab_chunk_elems, need_grads):
    """Low-memory variant: chunks of the VOCABULARY, two passes. Pass 1 folds each [N, cv]
    logits block into an online log-sum-exp; pass 2 recomputes the block, forms
    g = w (softmax - onehot) and writes dW[chunk] = g^T h straight into a weight-dtype buffer
    (each slice written once, fp32 accumulation inside the matmul) while d hidden accumulates in
    fp32 ([N, H], small). Peak extra memory: one logits block + dW in the weight's dtype; the
    price is one more [N, V, H] matmul than the token-chunked path."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    N, V = hidden.shape[0], weight.shape[0]
    cv = max(128, min(V, vocab_chunk_elems // max(N, 1)))
    m = torch.full((N,), float("-inf"), dtype=acc, device=hidden.device)
    ssum = torch.zeros(N, dtype=acc, device=hidden.device)
    tlogit = torch.zeros(N, dtype=acc, device=hidden.device)
    for v0 in range(0, V, cv):
        lg = (hidden @ weight[v0:v0 + cv].t()).to(acc)
        new_m = torch.maximum(m, lg.max(1).values)
        ssum = ssum * torch.exp(m - new_m) + torch.exp(lg - new_m[:, None]).sum(1)
        m = new_m
        hit = (targets >= v0) & (targets < v0 + lg.shape[1])
        idx = (targets - v0).clamp(0, lg.shape[1] - 1)
        tlogit += torch.where(hit, lg.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(tlogit))
    lse = m + torch.log(ssum)
    wt = weights.to(acc)
    loss = (wt * (lse - tlogit)).sum()
    if not need_grads:
        return loss, None, None
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype if weight.dtype != torch.float64 else acc, device=hidden.device)
    for v0 in range(0, V, cv):
        wc = weight[v0:v0 + cv]
        g = (hidden @ wc.t()).to(acc)
        g.sub_(lse[:, None]).exp_()
        hit = (targets >= v0) & (targets < v0 + g.shape[1])
        idx = (targets - v0).clamp(0, g.shape[1] - 1)
        g.scatter_add_(1, idx[:, None], -hit.to(acc)[:, None])
        g.mul_(wt[:, None])
        gc = g.to(hidden.dtype)
        dh += (gc @ wc).to(acc)
        torch.mm(gc.t(), hidden, out=dw[v0:v0 + cv]) if dw.dtype == hidden.dtype else \
            dw[v0:v0 + cv].copy_(gc.t().to(acc) @ hidden.to(acc))
    return loss, dh, dw


class _MaskedCE(torch.autograd.Function):
    """Gradients are computed in the forward pass (each logits chunk exists once) and scaled by
    the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk_tokens, backend):
        need = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        loss, dh, dw = _fused_op(hidden, weight, targets, weights, chunk_tokens, backend, need)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        # in place: the fp32 buffers are not needed again, and a [V, H] temporary is 1.2 GB at Qwen3 size
        gh = dh.mul_(grad).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = dw.mul_(grad).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def masked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor, select: torch.Tensor | None = None, *,
                         chunk_tokens: int | None = None, backend: str = "auto",
                         ignore_index: int = -100) -> torch.Tensor:
    """Weighted CE sum (fp32 scalar; fp64 for fp64 inputs) over selected rows of ``hidden`` [N, H] against ``weight``
    [V, H]; ``targets`` [N] int64, ``weights`` [N] (e.g. 1/t), ``select`` [N] bool or None.
    ``chunk_tokens`` None: the measured size (``set_tuned_chunk_tokens``), else the default."""
    if chunk_tokens is None:
        chunk_tokens = _tuned_chunk or DEFAULT_CHUNK_TOKENS
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"masked_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         f"must be [N, H] and [V, H]")
    if targets.shape != hidden.shape[:1] or weights.shape != hidden.shape[:1]:
        raise ValueError(f"masked_cross_entropy: targets {tuple(targets.shape)} and weights "
                         f"{tuple(weights.shape)} must be [N] with N = {hidden.shape[0]}")
    targets, weights = _mask_rows(targets, weights, select, ignore_index)
    backend = resolve_backend(backend, hidden.device)
    if backend == "triton":
        hidden, weight = autocast_operands(hidden, weight)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # no_grad / inference_mode / frozen inputs: loss only, no gradient pass and no dW buffer
        # (ctx.needs_input_grad inside a Function ignores grad mode)
        return _fused_op(hidden, weight, targets, weights, chunk_tokens, backend, False)[0]
    return _MaskedCE.apply(hidden, weight, targets, weights, chunk_tokens, backend)


def masked_cross_entropy_reference_full(hidden, weight, targets, weights, select=None, ignore_index=-100):
    """The naive definition (full fp32 logits): the oracle for tests and the benchmark baseline."""
    targets, weights = _mask_rows(targets, weights, select, ignore_index)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ weight.to(acc).t()
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return (ce * weights.to(acc)).sum()
