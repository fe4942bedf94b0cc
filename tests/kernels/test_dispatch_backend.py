"""Issue 15, part 3: the Triton token dispatch is the model's dispatch path when the backend says
so, through the one backend switch (``rnd1.kernels.backend``) shared by grouped_mm, dispatch and
cross_entropy, and it stays compile-friendly.

Why these tests: the Triton dispatch kernels were dead code once (the model used index_select /
bmm and ``kernels.dispatch`` was read by nothing), so the checks here count the kernels' calls
from a real Qwen3 MoE forward/backward rather than testing ``rnd1.kernels.token_dispatch`` alone, and
compare that run with the reference path's outputs and gradients."""

import os
import typing

import pytest
import torch

import rnd1.kernels.token_dispatch as td
from rnd1.kernels.backend import BACKENDS, op_backend, set_op_backend

INTERPRET = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                               reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _restore_backends():
    saved = {op: op_backend(op) for op in ("grouped_mm", "dispatch", "cross_entropy")}
    yield
    for op, name in saved.items():
        set_op_backend(op, name)


# --------------------------------------------------------------------------- one vocabulary
def test_one_backend_vocabulary_and_old_values_fail_in_one_line():
    from types import SimpleNamespace as NS

    from rnd1.config import ConfigError, Kernels, KernelBackend, load_config
    from rnd1.model.grouped_mm import get_grouped_mm_backend, set_grouped_mm_backend
    from rnd1.training.build import StartupError, set_kernel_backends

    assert typing.get_args(KernelBackend) == BACKENDS
    assert {f.name for f in __import__("dataclasses").fields(Kernels)} == {"grouped_mm", "dispatch", "cross_entropy"}
    for old in ("loop", "torch", "kernels"):  # the grouped_mm-only vocabulary is gone
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"--kernels.grouped_mm={old}"])
        assert "\n" not in str(e.value) and "'auto', 'reference', 'triton'" in str(e.value)
        with pytest.raises(ValueError):
            set_grouped_mm_backend(old)
    with pytest.raises(StartupError, match=r"^kernels.dispatch: .*'loop'") as e:
        set_kernel_backends(NS(kernels=NS(grouped_mm="auto", dispatch="loop", cross_entropy="auto")))
    assert "\n" not in str(e.value)
    cfg = load_config(None, ["--kernels.dispatch=reference", "--kernels.grouped_mm=triton"])
    set_kernel_backends(cfg)  # the trainer's start-up: the model's ops read these settings
    assert op_backend("dispatch") == "reference" and get_grouped_mm_backend() == "triton"


def test_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    from rnd1.model.moe import LocalDispatcher

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    set_op_backend("dispatch", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        LocalDispatcher().dispatch(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2), 3)


# --------------------------------------------------------------------------- compile-friendly
def test_dispatch_with_padding_compiles_fullgraph_without_host_sync():
    """No .item() / boolean indexing: a padded dispatch + combine traces as one graph (the fake
    implementations give the custom ops their shapes) and matches eager, gradients included."""
    torch.manual_seed(0)
    T, k, E, H = 9, 2, 5, 8
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    x = torch.randn(T, H, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)

    def f(x, w, ids):
        xs, info = td.dispatch(x, ids, E, align=4, backend="reference")
        return td.combine(torch.tanh(xs), info, w, backend="reference"), info.offs

    eager_out, eager_offs = f(x, w, ids)
    eager_grads = torch.autograd.grad(eager_out.pow(2).sum(), (x, w))
    torch._dynamo.reset()
    out, offs = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, ids)
    grads = torch.autograd.grad(out.pow(2).sum(), (x, w))
    assert torch.equal(offs, eager_offs)
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- the model's path
class _Spy:
    """Counts calls of the Triton launchers while still running them."""

    NAMES = ("gather_rows_triton", "combine_triton", "combine_backward_triton")

    def __init__(self, monkeypatch):
        self.calls = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            real = getattr(td, name)

            def wrapped(*a, _real=real, _name=name, **kw):
                self.calls[_name] += 1
                return _real(*a, **kw)

            monkeypatch.setattr(td, name, wrapped)


def _moe_step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = logits.float().pow(2).mean() + model.moe_aux_loss()
    loss.backward()
    return logits.detach(), {n.replace("._orig_mod", ""): p.grad.clone()  # compiled blocks: same params
                             for n, p in model.named_parameters() if p.grad is not None}


@INTERPRET
@pytest.mark.parametrize("compiled", [False, True])
def test_qwen3_moe_forward_and_backward_go_through_triton_dispatch(monkeypatch, compiled):
    """Debug preset, fp32: with ``dispatch = triton`` every MoE layer's dispatch gathers and
    combines with the Triton kernels (forward: one gather + one combine; backward: the combine's
    backward kernel and the gather's backward, a unit-weight combine), and logits and all
    gradients equal the reference path's. Compiled, the blocks are still whole graphs
    (``fullgraph=True``: the LocalDispatcher is traced, the kernels are custom ops)."""
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    set_op_backend("grouped_mm", "reference")  # only the dispatch changes between the two runs
    model = build_model(get_preset("debug"), seed=0).float()
    n_moe = sum(1 for layer in model.layers if layer.is_moe)
    assert n_moe > 0
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    set_op_backend("dispatch", "reference")
    ref_logits, ref_grads = _moe_step(model, ids)

    if compiled:
        from rnd1.parallel.compile import apply_compile, compiles_whole

        torch._dynamo.reset()
        assert all(compiles_whole(b) for b in model.layers)
        apply_compile(model, backend="aot_eager", fullgraph=True)
    spy = _Spy(monkeypatch)
    set_op_backend("dispatch", "triton")
    logits, grads = _moe_step(model, ids)
    assert spy.calls == {"gather_rows_triton": n_moe, "combine_triton": 2 * n_moe,
                         "combine_backward_triton": n_moe}, spy.calls
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reference_backend_keeps_the_index_select_path(monkeypatch):
    """CPU default (``auto``): the dispatcher must not touch rnd1.kernels.token_dispatch at all (its
    index_select / bmm path is what the CPU measurements were taken with)."""
    from rnd1.model.moe import LocalDispatcher

    def boom(*a, **kw):
        raise AssertionError("token_dispatch used on the reference path")

    monkeypatch.setattr(td, "dispatch", boom)
    monkeypatch.setattr(td, "combine_rows", boom)
    set_op_backend("dispatch", "auto")
    d = LocalDispatcher()
    x = torch.randn(5, 4)
    ids = torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0], [2, 1]])
    w = torch.rand(5, 2)
    xs, offs, ctx = d.dispatch(x, ids, w, 3)
    assert offs.tolist() == [3, 6, 10]
    out = d.combine(xs * 3, ctx)
    torch.testing.assert_close(out, 3 * x * w.sum(1, keepdim=True))


# --------------------------------------------------------------------------- EP receiving side
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRET)])
def test_permutation_gather_is_index_select_and_its_inverse(backend):
    """The EP dispatcher's regroup (received rows -> expert-major order) and its inverse in
    combine, as ``gather_rows`` with a permutation and its inverse: same values and gradients as
    ``index_select`` / ``index_copy_``; empty inputs (a rank that receives nothing) work."""
    torch.manual_seed(5)
    for n in (11, 0):
        perm = torch.randperm(n)
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(n))
        x = torch.randn(n, 6, requires_grad=True)
        a = td.gather_rows(x, perm, inv.unsqueeze(1), backend)
        torch.testing.assert_close(a, x.index_select(0, perm))
        back = td.gather_rows(a, inv, perm.unsqueeze(1), backend)
        torch.testing.assert_close(back, torch.empty_like(a).index_copy_(0, perm, a))
        torch.testing.assert_close(back, x)
        g = torch.randn(n, 6)
        (gx,) = torch.autograd.grad(a, x, g)
        torch.testing.assert_close(gx, torch.zeros_like(g).index_copy_(0, perm, g))


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRET)])
def test_expert_parallel_dispatch_uses_the_backend_and_matches_local(backend):
    """2 ranks, EP 2: with ``triton`` the send-side sort, the receiving side's regroup and its
    inverse in combine are Triton gathers (3 per layer forward; their backward is the unit-weight
    combine kernel) and outputs / gradients equal the single-process layer's; with ``reference``
    no Triton kernel runs."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(Path(__file__).with_name("worker_ep_dispatch.py")), backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    expected = ({"gather_rows_triton": 3, "combine_triton": 4, "combine_backward_triton": 1} if backend == "triton"
                else {"gather_rows_triton": 0, "combine_triton": 0, "combine_backward_triton": 0})
    assert out["calls"] == expected, out
    assert max(out["diffs"].values()) < 1e-5, out
