"""The trainer itself under torchrun: the same loss curve in 1 process and in 2 (EP 2), and DCP
checkpoints that load across layouts (EP 2 x FSDP <-> one process) with identical outputs."""

import json
from pathlib import Path

import pytest
import torch

from .conftest import HERE, last_json, torchrun

pytestmark = [pytest.mark.multiprocess]

REPO = HERE.parents[1]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _args(run_dir, data, **extra):
    kv = {"job.dump_folder": run_dir, "data.datasets": data, "data.prepare": "", "training.steps": 20,
          "training.local_batch_size": 2, "training.seq_len": 64, "training.global_batch_tokens": 4 * 64,
          "metrics.log_freq": 1, "job.print_config": "false", "checkpoint.interval": 10, "eval.interval": 0,
          "training.mixed_precision_param": "float32"}
    kv.update(extra)
    return ["-m", "rnd1.train", "--config", str(CONFIG)] + [f"--{k}={v}" for k, v in kv.items()]


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in sorted((r for r in recs if "loss" in r), key=lambda r: r["step"])]


def _run(nproc, args):
    import os
    import subprocess
    import sys

    from .conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_loss_curve_one_process_vs_ep2(tmp_path, byte_dataset):
    """Same global batch (4 sequences): 1 process with 2 accumulation steps vs 2 ranks x 2 sequences."""
    _run(1, _args(tmp_path / "one", byte_dataset))
    _run(2, _args(tmp_path / "ep2", byte_dataset, **{"parallelism.expert_parallel_degree": 2}))
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "ep2")
    assert len(a) == len(b) == 20
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=2e-3), (a, b)


def test_dcp_checkpoint_loads_across_layouts(tmp_path, byte_dataset):
    # saved by 2 ranks (EP 2 x FSDP), loaded by 1 process: the same logits as the 2-rank model
    _run(2, _args(tmp_path / "ep2", byte_dataset, **{"parallelism.expert_parallel_degree": 2,
                                                     "training.steps": 10}))
    ckpt = tmp_path / "ep2" / "checkpoint"
    out = last_json(torchrun(2, HERE / "worker_logits.py", ckpt, 2))
    from rnd1.checkpoint.dcp import load_model_weights
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    model = build_model(get_preset("debug"), seed=123, attention_mode="bidirectional")
    load_model_weights(model, ckpt)
    x = torch.arange(64).remainder(250).view(2, 32)
    single = model(x).float()
    assert out["sum"] == pytest.approx(single.sum().item(), rel=1e-5)
    assert out["abs_sum"] == pytest.approx(single.abs().sum().item(), rel=1e-5)
    # and the other way round: a 1-process checkpoint resumed by 2 ranks with EP 2
    _run(1, _args(tmp_path / "one", byte_dataset, **{"training.steps": 10}))
    out2 = last_json(torchrun(2, HERE / "worker_logits.py", tmp_path / "one" / "checkpoint", 2))
    model2 = build_model(get_preset("debug"), seed=7, attention_mode="bidirectional")
    load_model_weights(model2, tmp_path / "one" / "checkpoint")
    assert out2["sum"] == pytest.approx(model2(x).float().sum().item(), rel=1e-5)
