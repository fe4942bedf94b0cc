"""scripts/bench_train_step.py at a tiny size: it runs end to end, and its peers are built with
the same weights as the rnd1 model (otherwise the side-by-side numbers compare different models)."""

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_train_step as bench  # noqa: E402

TINY = ["--vocab", "512", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--experts", "4", "--topk", "2", "--moe-inter", "32", "--seq", "32", "--batch", "2", "--dtype", "fp32"]
# A given matmul peak: tests never measure one (bf16 on a CPU without bf16 units takes minutes).
FIXED_PEAK = ["--peak-gflops", "100"]


def _tiny_model():
    a = bench.parse(TINY)
    mcfg = bench.model_config(a)
    torch.manual_seed(0)
    return a, mcfg, bench.build_rnd1(a, mcfg)


def test_bench_runs_and_reports_the_ratio_to_transformers():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_train_step.py"), *TINY, *FIXED_PEAK,
                          "--steps", "2", "--warmup", "1", "--vs-hf"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "matmul peak given: bf16 100 GFLOP/s, fp32 100 GFLOP/s" in out.stdout
    lines = out.stdout.splitlines()
    assert any(line.split()[0] == "rnd1" and "tok/s" in line for line in lines if line.strip())
    assert any(line.split()[0] == "hf" and "tok/s" in line for line in lines if line.strip())
    ratio = [line for line in lines if line.startswith("speed-up vs the faster peer (hf)")]
    assert ratio and float(ratio[0].split(":")[1].split("x")[0]) > 0


def test_step_functions_see_the_same_loss_at_the_same_weights():
    """rnd1's AR step and transformers' step start from the same loss on the same batch."""
    pytest.importorskip("transformers")
    a, mcfg, model = _tiny_model()
    x = torch.randint(0, 511, (2, 32), generator=torch.Generator().manual_seed(3))
    hf_loss = bench.hf_step_fn(a, model, mcfg)(x).item()
    with torch.no_grad():
        logits = model(x[:, :-1])
        ours = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    assert abs(hf_loss - ours) < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                    reason="torchtitan peer not installed (pip install --no-deps torchtitan==0.3.0 and the bench extra)")
def test_torchtitan_peer_has_the_same_weights():
    from peers.torchtitan_qwen3 import build_torchtitan_model
    from rnd1.checkpoint.hf import save_pretrained

    a, mcfg, model = _tiny_model()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        tt = build_torchtitan_model(mcfg, d)
    x = torch.randint(0, 511, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = model(x), tt(x)
    # torchtitan runs expert matmuls in bf16 even with fp32 parameters: bf16-level agreement
    assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_bench_two_processes_with_expert_parallelism():
    """--nprocs 2 --ep 2: the trainer's EP + FSDP2 step under torchrun (gloo), global tokens/s."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_train_step.py"), *TINY, *FIXED_PEAK,
                          "--steps", "2", "--warmup", "1", "--nprocs", "2", "--ep", "2"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line for line in out.stdout.splitlines() if line.strip().startswith("rnd1 ws2 ep2")]
    assert row and float(row[0].split("tok/s")[0].split()[-1].replace(",", "")) > 0


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                    reason="torchtitan peer not installed (pip install --no-deps torchtitan==0.3.0 and the bench extra)")
def test_torchtitan_peer_step_is_next_token_cross_entropy():
    """The peer's loss shifts the labels (as transformers does) and equals the mean next-token CE
    over the L-1 predicted positions."""
    import torch.nn.functional as F

    from peers.torchtitan_qwen3 import torchtitan_step_fn

    a, mcfg, model = _tiny_model()
    step = torchtitan_step_fn(a, model, mcfg)
    x = torch.randint(0, 511, (2, 32), generator=torch.Generator().manual_seed(5))
    tt = step.model
    with torch.no_grad():
        logits = tt(x)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(step(x).detach(), want, rtol=1e-5, atol=1e-5)
