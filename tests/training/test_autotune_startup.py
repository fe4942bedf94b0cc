"""At start-up a run says which precision it chose and why (bf16 only where the hardware has bf16
matrix units), measures its ``auto`` kernels at its own shapes, logs each choice in one line and
records it in the run folder; a resumed run reuses the record instead of measuring again."""

import json
from pathlib import Path

import pytest

from rnd1.kernels.cpu import cpu_info
from rnd1.tools import rehearsal

pytestmark = [pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]


def test_precision_and_kernel_choices_are_measured_said_and_kept(tmp_path, byte_dataset, monkeypatch):
    monkeypatch.setenv("RND1_AUTOTUNE_CACHE", str(tmp_path / "machine.json"))
    run = tmp_path / "run"
    ov = {"job.dump_folder": str(run), "job.print_config": False, "training.steps": 2, "training.seq_len": 256,
          "training.local_batch_size": 2, "training.autocast": "auto", "data.datasets": f'["{byte_dataset}"]',
          "data.prepare": "", "eval.interval": 0, "checkpoint.interval": 2}
    got = rehearsal.run(REPO / "train_configs" / "debug_model.toml", 1, ov)
    assert got.returncode == 0, got.output[-3000:]
    units = cpu_info().bf16_units
    want = f"precision: bf16 autocast (auto: the CPU has bf16 matrix units ({units}" if units else \
        "precision: fp32 (auto: fp32, the CPU has no bf16 matrix units"
    assert want in got.output
    lines = [x for x in got.output.splitlines() if "autotune " in x]
    assert any("autotune grouped_mm [rows 1024, experts 8" in x and "(measured: grouped" in x for x in lines), lines
    assert any("autotune cross_entropy [rows 256," in x for x in lines), lines
    assert any("autotune adamw [" in x and "(measured: " in x and "fused" in x and "foreach" in x for x in lines), lines
    record = json.loads((run / "autotune.json").read_text())
    (entries,) = record.values()
    assert {k.split("|")[0] for k in entries} == {"grouped_mm", "cross_entropy", "adamw"}
    # the resumed run (same folder) takes the recorded choices
    again = rehearsal.run(REPO / "train_configs" / "debug_model.toml", 1, {**ov, "training.steps": 3})
    assert again.returncode == 0, again.output[-3000:]
    assert sum("(cached:" in x for x in again.output.splitlines() if "autotune " in x) == 3


def test_a_configured_adamw_kernel_wins_over_the_resumed_checkpoints_flags(tmp_path, byte_dataset, monkeypatch):
    """A checkpoint's param groups carry the AdamW flags of the run that saved it; resuming with
    another ``optimizer.implementation`` must run the configured kernel, and say nothing of auto."""
    import torch

    from rnd1 import train as train_mod
    from rnd1.config import load_config
    from rnd1.parallel.env import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)

    monkeypatch.setenv("RND1_AUTOTUNE_CACHE", str(tmp_path / "machine.json"))
    run = tmp_path / "run"
    args = [f"--job.dump_folder={run}", "--job.print_config=false", "--training.steps=2", "--training.seq_len=64",
            "--training.local_batch_size=2", f"--data.datasets={byte_dataset}", "--data.prepare=", "--metrics.peak_flops=1e12",
            "--eval.interval=0", "--checkpoint.interval=2"]
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen[len(seen)] = {(g["fused"], g["foreach"]) for g in self.param_groups}
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = load_config(REPO / "train_configs" / "debug_model.toml", [*args, "--optimizer.implementation=foreach"])
    train_mod.Trainer(cfg, env).train()
    assert len(seen) == 2 and all(v == {(False, True)} for v in seen.values()), seen
    seen.clear()
    cfg = load_config(REPO / "train_configs" / "debug_model.toml",
                      [*args, "--training.steps=4", "--optimizer.implementation=fused"])
    train_mod.Trainer(cfg, env).train()
    # (loading a checkpoint may take one zero-lr step first, to create the state it fills)
    steps = [seen[k] for k in sorted(seen)][-2:]
    assert len(steps) == 2 and all(v == {(True, False)} for v in steps), seen
    # auto: the steps run the kernel the measurement chose and recorded
    seen.clear()
    cfg = load_config(REPO / "train_configs" / "debug_model.toml",
                      [*args, "--training.steps=6", "--optimizer.implementation=auto"])
    train_mod.Trainer(cfg, env).train()
    (entries,) = json.loads((run / "autotune.json").read_text()).values()
    chosen = next(v["chosen"] for k, v in entries.items() if k.startswith("adamw|"))
    want = {(chosen == "fused", chosen == "foreach")}
    steps = [seen[k] for k in sorted(seen)][-2:]
    assert len(steps) == 2 and all(v == want for v in steps), (chosen, seen)
