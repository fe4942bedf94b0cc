"""scripts/estimate_memory.py (rnd1/tools/memory_estimate.py): every shipped config fits the
device it is written for, at its full size and world size; bad input is one line and exit 2.

The estimate runs the trainer's own step on fake tensors (nothing allocated), so a 30B model at
64 ranks takes seconds. Configs that differ only in fields that change no tensor's shape or
lifetime (learning rates, schedules, data paths, intervals) share one estimate. Its agreement
with real steps is tested in tests/parallel/test_memory_estimate.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rnd1.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "train_configs").rglob("*.toml"))
SCRIPT = REPO / "scripts" / "estimate_memory.py"
# sections and fields that shape no tensor and no tensor's lifetime
_IRRELEVANT_SECTIONS = ("job", "optimizer", "lr_schedule", "data", "checkpoint", "metrics", "eval")
_IRRELEVANT_FIELDS = {"model": ("init", "tokenizer_path", "mask_embedding_init"),
                      "objective": ("attention_recipe", "grafting_tokens", "eps", "moe_aux_loss_coef"),
                      "training": ("steps", "total_tokens", "seed", "max_norm")}


def _memory_key(cfg) -> str:
    d = dataclasses.asdict(cfg)
    for s in _IRRELEVANT_SECTIONS:
        d.pop(s)
    for s, fields in _IRRELEVANT_FIELDS.items():
        for f in fields:
            d[s].pop(f, None)
    d["optimizer_implementation"] = cfg.optimizer.implementation  # foreach keeps temporaries, fused none
    return json.dumps(d, sort_keys=True)


def _groups() -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in CONFIGS:
        groups.setdefault(_memory_key(load_config(path)), []).append(path)
    return groups


GROUPS = list(_groups().values())


def test_every_shipped_config_states_its_world_size():
    missing = [str(p.relative_to(REPO)) for p in CONFIGS if load_config(p).hardware.world_size <= 0]
    assert not missing, f"configs without hardware.world_size (the estimate needs it): {missing}"


TABLE = ("parameters (shards)", "gradients (shards)", "optimizer state (AdamW)", "activations saved by forward",
         "attention", "experts", "all-to-all buffers (EP)", "largest micro-batch that fits", "routing assumed",
         "all_gather", "reduce_scatter", "all_to_all", "Hugging Face import (sliced): this rank reads")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.parametrize("paths", GROUPS, ids=lambda ps: "+".join(p.stem for p in ps))
def test_shipped_config_fits_its_device(paths):
    """At the world size and on the device the config names ([hardware]). The 30B-A3B recipe goes
    through the command line exactly as the README gives it, and its table is checked."""
    cfg = load_config(paths[0])
    names = [str(p.relative_to(REPO)) for p in paths]
    if "train_configs/qwen3_30b_a3b_rnd1.toml" in names:
        p = _cli("train_configs/qwen3_30b_a3b_rnd1.toml", "--world-size", "64")
        assert p.returncode == 0, p.stderr[-3000:]
        assert "rank 0 of 64" in p.stdout and "EP 8 x FSDP 8" in p.stdout
        for needle in TABLE:
            assert needle in p.stdout, f"{needle!r} missing from:\n{p.stdout}"
        assert "-> fits" in p.stdout, f"{names} does not fit {cfg.hardware.device_memory}:\n{p.stdout}"
        return
    from rnd1.tools.memory_estimate import estimate, format_estimate

    est = estimate(cfg, world_size=cfg.hardware.world_size, config_name=names[0])
    assert est.fits, f"{names} does not fit hardware.device_memory={cfg.hardware.device_memory}:\n{format_estimate(est)}"


def test_the_estimate_says_when_a_config_does_not_fit():
    """The check above can fail: the 4B recipe at its old micro-batch of 8 needs ~96 GiB per GPU."""
    from rnd1.tools.memory_estimate import estimate

    cfg = load_config(REPO / "train_configs" / "qwen3_4b_scp.toml", ["--training.local_batch_size=8"])
    est = estimate(cfg, world_size=8)
    assert not est.fits and est.peak > 85 * 2**30
    assert 4 <= est.largest_micro_batch() < 8


@pytest.mark.parametrize("args, needle", [
    (["train_configs/qwen3_30b_a3b_rnd1.toml", "--world-size", "12"], "expert_parallel_degree=8 must divide"),
    (["train_configs/qwen3_30b_a3b_rnd1.toml", "--device-memory", "1GiB"], "cannot hold even"),
    (["train_configs/qwen3_30b_a3b_rnd1.toml", "--device-memory", "lots"], "--device-memory 'lots' is not a size"),
    (["train_configs/qwen3_30b_a3b_rnd1.toml", "--training.no_such_key=1"], "no_such_key"),
    (["train_configs/qwen3_30b_a3b_rnd1.toml", "--imbalance", "0.5"], "--imbalance 0.5: must be >= 1"),
    (["train_configs/no_such.toml"], "no_such.toml"),
    (["train_configs/debug_model_ep.toml", "--rank", "2"], "--rank 2: must be in [0, 2)"),
    (["train_configs/debug_model.toml", "--model.hf_config=/no/such/folder"], "model.hf_config: /no/such/folder"),
    (["train_configs/debug_model.toml", "--hardware.device_memory=lots"],
     "hardware.device_memory (from --hardware.device_memory): 'lots' is not a size;"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    p = _cli(*args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert needle in lines[0] and "Traceback" not in p.stderr
