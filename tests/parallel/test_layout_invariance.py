"""The global batch, not its split over ranks and micro-batches, defines a step: the MoE aux
loss's gradient and the data stream (also across a resume on another world size) are the same
in 1 process and in 2."""

import json
from pathlib import Path

import pytest
import torch

from .conftest import HERE
from .test_trainer_layouts import _args, _run

pytestmark = [pytest.mark.multiprocess]

WORKER = HERE / "worker_trainer.py"


def _worker(nproc, mode, out, run_dir, data, **extra):
    args = _args(run_dir, data, **{"metrics.peak_flops": 1e12, **extra})
    _run(nproc, [str(WORKER), mode, str(out)] + args[2:])  # drop "-m rnd1.train"


def test_aux_loss_gradient_does_not_depend_on_the_split(tmp_path, byte_dataset):
    """4 sequences of 1 each: 1 process x 4 micro-batches, 2 processes (FSDP, and EP 2) x 2.
    Every micro-batch is one sequence in each layout, so the aux loss (a per-micro-batch mean)
    sees the same groups and its gradient must agree to float noise (it was 2x on 2 ranks)."""
    common = {"training.local_batch_size": 1, "training.max_norm": 0, "checkpoint.enable": "false"}
    _worker(1, "aux_grads", tmp_path / "one.pt", tmp_path / "one", byte_dataset, **common)
    one = torch.load(tmp_path / "one.pt")
    router = [n for n in one if n.endswith("gate.weight") or "router" in n]
    assert router and all(one[n].abs().max() > 0 for n in router), router
    scale = max(g.abs().max().item() for g in one.values())
    for ep in (1, 2):
        out = tmp_path / f"two_ep{ep}.pt"
        _worker(2, "aux_grads", out, tmp_path / f"two_ep{ep}", byte_dataset,
                **{**common, "parallelism.expert_parallel_degree": ep})
        two = torch.load(out)
        assert sorted(two) == sorted(one)
        for n in one:
            torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n} (ep {ep}): {m}")


def _seen(out_dir: Path) -> dict[int, dict[int, str]]:
    """step -> {global sample id: window hash}, over every rank's record."""
    steps: dict[int, dict[int, str]] = {}
    for f in sorted(out_dir.glob("rank*.json")):
        for rec in json.loads(f.read_text()):
            step = steps.setdefault(rec["step"], {})
            for g, h in rec["samples"].items():
                assert int(g) not in step, f"sample {g} seen twice in step {rec['step']}"
                step[int(g)] = h
    return steps


def test_resume_on_another_world_size_continues_the_data(tmp_path, byte_dataset):
    """2 processes for 3 steps, then 1 process to step 6, then 2 again to step 9 (one run folder)
    see exactly the samples of 9 steps in 1 process: same global ids, same windows, per step.
    Two sources with weights 0.7 / 0.3 exercise the mixture's per-source cursors."""
    data = f"{byte_dataset},{byte_dataset}"
    common = {"data.weights": "0.7,0.3", "checkpoint.interval": 3}
    _worker(1, "data_order", tmp_path / "ref", tmp_path / "full", data, **common, **{"training.steps": 9})
    run = tmp_path / "part"
    _worker(2, "data_order", tmp_path / "a", run, data, **common, **{"training.steps": 3})
    _worker(1, "data_order", tmp_path / "b", run, data, **common, **{"training.steps": 6})
    _worker(2, "data_order", tmp_path / "c", run, data, **common, **{"training.steps": 9})
    ref = _seen(tmp_path / "ref")
    parts = [_seen(tmp_path / p) for p in "abc"]
    assert [sorted(p) for p in parts] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # each phase resumed
    got = {k: v for p in parts for k, v in p.items()}
    assert sorted(ref) == sorted(got) == list(range(1, 10))
    for step in ref:
        assert sorted(ref[step]) == list(range(4 * (step - 1), 4 * step))
        assert got[step] == ref[step], step
