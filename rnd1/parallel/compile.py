"""torch.compile per transformer block (torchtitan's granularity), with the expert-parallel
token exchange left to eager mode.

Compiling blocks one by one keeps compile time independent of depth (all blocks share one
compiled graph), composes with FSDP2 (which hooks around each block) and with activation
checkpointing (applied before, so the checkpointed region is what gets compiled).

Why an MoE block under expert parallelism is compiled in pieces
---------------------------------------------------------------
The all-to-all dispatcher must know, on the host, how many rows it sends to and receives from
every peer: ``all_to_all_single`` takes its split sizes as Python ints. Those counts come from
the router's choices, so they are data-dependent; Dynamo cannot specialise a graph on them
(``Could not guard on data-dependent expression``), and a graph break is an error under
``fullgraph=True``. FSDP2's hooks around separately sharded experts (EP x FSDP layouts) break
graphs too. So, as torchtitan does for its MoE blocks, such a block is compiled around its
dispatcher rather than through it:

    block (eager: residual adds, the checkpoint wrapper, FSDP hooks)
      input_layernorm, self_attn, post_attention_layernorm    compiled modules
      mlp (eager)
        router                                                compiled module
        dispatcher.dispatch / combine                         eager: host split sizes, collectives
        experts' SwiGLU over expert-sorted rows               compiled function (one graph)

Every compiled piece honours ``compile.fullgraph``, so ``fullgraph=true`` still means "no graph
breaks anywhere we compile". ``nn.Module.compile`` compiles in place, so parameter names (and
with them checkpoints, optimiser groups and exports) are the same as without compilation.
Blocks whose dispatcher runs inside the graph (``LocalDispatcher``: a sort, no host sync) and
dense blocks are compiled whole.
"""

from __future__ import annotations

import torch

from rnd1.model.moe import MoE


def _inner_block(block: torch.nn.Module) -> torch.nn.Module:
    """The Block inside an activation-checkpoint wrapper (compile is applied after AC)."""
    return getattr(block, "_checkpoint_wrapped_module", block)


def compiles_whole(block: torch.nn.Module) -> bool:
    """A block can be one graph unless its MoE dispatcher needs host-side split sizes."""
    mlp = getattr(_inner_block(block), "mlp", None)
    return not isinstance(mlp, MoE) or getattr(mlp.dispatcher, "traceable", False)


def apply_compile(model: torch.nn.Module, *, backend: str = "inductor", fullgraph: bool = True) -> None:
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    if backend not in known:  # torch.compile would only fail at the first step, with a trace
        raise ValueError(f"compile.backend={backend!r} is not a torch.compile backend; expected one of "
                         f"{', '.join(sorted(known))}")
    for i, block in enumerate(model.layers):
        if compiles_whole(block):
            model.layers[i] = torch.compile(block, backend=backend, fullgraph=fullgraph)
            continue
        inner = _inner_block(block)
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm"):
            getattr(inner, name).compile(backend=backend, fullgraph=fullgraph)
        inner.mlp.router.compile(backend=backend, fullgraph=fullgraph)
        inner.mlp.experts.compile_compute(backend=backend, fullgraph=fullgraph)
