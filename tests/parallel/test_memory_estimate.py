"""The memory estimate (rnd1/tools/memory_estimate.py, fake tensors) against the same step on real
tensors: parameters, gradients and optimizer state exact; the peak within 10% of the real step's
peak, counted twice over: by the same ledger on real CPU tensors, and by the process itself (the
rise of its resident set during the step, on top of the parameters and optimizer state it held).

The model is a 33M-parameter MoE (hidden 512, 8 experts) so that tensors dominate the process's
memory; the step runs with selective recompute and bf16 autocast, as the GPU configs do. glibc's
mmap threshold is fixed for the real run (``MALLOC_MMAP_THRESHOLD_``): by default it grows, and
freed activations then stay in the heap, so the resident set would measure the allocator's
reuse, not the tensors (a caching GPU allocator has the same effect; the estimate's headroom is
for it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import last_json, torchrun

pytestmark = [pytest.mark.multiprocess]

HERE = Path(__file__).parent
REPO = HERE.parents[1]
WORKER = HERE / "worker_memory.py"
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> Path:
    from rnd1.model.config import get_preset

    cfg = get_preset("debug").replace(hidden_size=512, moe_intermediate_size=512, intermediate_size=1024,
                                      vocab_size=4096, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                      mask_token_id=4095)
    path = tmp_path_factory.mktemp("mid") / "config.json"
    path.write_text(json.dumps(cfg.to_hf_config()))
    return path


def _overrides(model: Path, batch: int) -> list[str]:
    return [f"--model.hf_config={model}", f"--training.local_batch_size={batch}", "--training.seq_len=512",
            "--activation_checkpoint.mode=selective", "--training.autocast=bfloat16"]


def _fake(config: str, world: int, rank: int, overrides: list[str]) -> dict:
    p = subprocess.run([sys.executable, str(WORKER), "fake", str(world), str(rank), config, *overrides],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return last_json(p.stdout.splitlines())


def _check(fake: dict, real: dict) -> None:
    for key in ("params", "grads", "optimizer"):
        assert fake[key] == real[key], (key, fake[key], real[key])
    assert abs(fake["peak"] - real["peak"]) <= 0.10 * real["peak"], (fake["peak"], real["peak"])
    process_peak = real["params"] + real["optimizer"] + real["rss_rise"]
    assert abs(fake["peak"] - process_peak) <= 0.10 * process_peak, (fake["peak"], process_peak, real)


def test_estimate_matches_a_real_step_in_one_process(mid_model):
    overrides = _overrides(mid_model, 8)
    fake = _fake("train_configs/debug_model.toml", 1, 0, overrides)
    p = subprocess.run([sys.executable, str(WORKER), "real", "1", "0", "train_configs/debug_model.toml", *overrides],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, **MALLOC})
    assert p.returncode == 0, p.stderr[-3000:]
    real = last_json(p.stdout.splitlines())
    assert real["peak"] > 500 * 2**20  # tensors dominate the process
    _check(fake, real)


def test_estimate_matches_a_real_step_on_two_processes_ep2_fsdp(mid_model):
    """EP 2 (one half of the experts per rank, all-to-all token exchange) + FSDP 2 of the dense
    parameters, on gloo. The estimate assumes a balanced router; the real router is near balanced
    at random init, which is what the 10% allows for."""
    overrides = _overrides(mid_model, 4)
    reals = [json.loads(line) for line in torchrun(2, WORKER, "real", 2, "-", "train_configs/debug_model_ep.toml",
                                                   *overrides, env=MALLOC) if line.startswith("{")]
    assert sorted(r["rank"] for r in reals) == [0, 1]
    for real in reals:
        _check(_fake("train_configs/debug_model_ep.toml", 2, real["rank"], overrides), real)
