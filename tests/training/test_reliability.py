"""Crash safety: atomic checkpoints, preemption by signal, the numerics guard, the fault drill."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnd1.checkpoint.dcp import CheckpointError, CheckpointManager
from rnd1.config import load_config
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model
from rnd1.parallel.env import DistEnv
from rnd1.train import Trainer
from rnd1.training.guards import NonFiniteError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _args(run_dir, data, **extra):
    kv = {"job.dump_folder": run_dir, "data.datasets": data, "data.prepare": "", "training.steps": 8,
          "training.local_batch_size": 2, "training.seq_len": 64, "metrics.log_freq": 1,
          "job.print_config": "false", "checkpoint.interval": 2, "eval.interval": 0, "metrics.peak_flops": 1e12}
    kv.update(extra)
    return [f"--{k}={v}" for k, v in kv.items()]


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def test_incomplete_checkpoints_are_ignored_and_pruning_keeps_complete_ones(tmp_path):
    model = build_model(get_preset("debug"), seed=0)
    cm = CheckpointManager(tmp_path, keep_latest_k=2)
    for step in (1, 2, 3):
        cm.save(step, model, None, {"step": step})
    assert [s for s, _ in cm.complete_checkpoints()] == [2, 3]
    # a save interrupted before COMPLETE/rename, and a renamed folder whose marker is missing
    (tmp_path / ".step-00000004.tmp").mkdir()
    (tmp_path / "step-00000005").mkdir()
    assert cm.latest()[0] == 3
    assert {p.name for p in cm.incomplete_checkpoints()} == {".step-00000004.tmp", "step-00000005"}
    cm.save(6, model, None, {})
    assert [s for s, _ in cm.complete_checkpoints()] == [3, 6]
    assert not (tmp_path / ".step-00000004.tmp").exists()
    assert (tmp_path / "latest").read_text().strip() == "step-00000006"


def test_non_finite_weights_are_never_saved(tmp_path):
    model = build_model(get_preset("debug"), seed=0)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match="norm.weight has non-finite values"):
        CheckpointManager(tmp_path).save(1, model, None, {})
    assert not list(tmp_path.glob("step-*"))


def test_guard_skips_non_finite_steps_then_stops(tmp_path, byte_dataset, monkeypatch, capsys):
    import rnd1.training.step as step_mod

    real = step_mod.weighted_ce_sum
    bad_steps = {3, 5, 6}

    def flaky(*a, **k):
        out = real(*a, **k)
        return out * float("nan") if trainer.step + 1 in bad_steps else out

    monkeypatch.setattr(step_mod, "weighted_ce_sum", flaky)
    cfg = load_config(CONFIG, _args(tmp_path / "run", byte_dataset, **{"training.max_nonfinite_skips": 2}))
    trainer = Trainer(cfg, _env())
    before = {}
    with pytest.raises(NonFiniteError, match=r"step 6: 3 non-finite steps exceed training.max_nonfinite_skips=2; "
                                             r"last good checkpoint: .*step-00000004"):
        while trainer.step < 8:
            if trainer.step + 1 == 3:
                before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            trainer.train_step()
            if trainer.step in (2, 4):
                trainer.save_checkpoint()
            if trainer.step == 3:  # the skipped step left the weights untouched
                assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.guard.skipped == 3
    assert "update skipped (1/2 allowed)" in capsys.readouterr().out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, byte_dataset):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rnd1.train", "--config", str(CONFIG)] + _args(
        run, byte_dataset, **{"training.steps": 100000, "checkpoint.interval": 0})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in out and "preempted: checkpoint saved at step" in out
    step = CheckpointManager(run / "checkpoint").latest()[0]
    logged = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert step == max(logged) >= 3  # the step in flight was finished and saved


def test_fault_drill_is_bit_exact(tmp_path):
    spec = importlib.util.spec_from_file_location("fault_drill", REPO / "scripts" / "fault_drill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = []
    res = mod.drill(kills=4, steps=40, interval=3, seed=1, work=tmp_path, log=lines.append, slow_save_s=1.5,
                    with_dead_rank=True)
    assert res["kills"] >= 3
    # one kill provably inside each phase of a save (the trainer stopped itself there), none counted
    # for a stale temp folder left by an earlier kill
    assert set(res["save_phases"]) == {"writing", "sealing", "publishing"}
    assert min(res["save_phases"].values()) >= 1 and res["during_save"] <= res["kills"]
    # scheduler preemptions (SIGTERM, SIGUSR1, SIGHUP to launcher and worker, every save longer than
    # torchrun's close timeout): one save at the step reached, exit 0
    assert [r["signal"] for r in res["scheduler_signals"]] == ["SIGTERM", "SIGUSR1", "SIGHUP"], lines
    for sched in res["scheduler_signals"]:
        assert sched["exit"] == 0 and not sched["traceback"], sched
        assert sched["saved_step"] == sched["step_reached"], sched
    early = res["before_first_step"]  # SIGTERM after "resumed from", before the next step
    assert early == {"exit": 0, "said": True, "checkpoint_unchanged": True, "traceback": False}, early
    dead = res["dead_rank"]  # two processes, rank 1 SIGKILLed, resumed: one line, then bit-exact
    assert dead["exit"] == 3 and dead["one_line"], lines
    assert dead["loss_steps_differing"] == [] and dead["weights_differing"] == [], dead
    # silent corruption of the newest checkpoint: detected, set aside, resume from an intact one
    assert res["corrupted"] and len(res["set_aside"]) == 1
    assert res["loss_steps_differing"] == [] and res["weights_differing"] == []
    assert res["steps"] == 40
