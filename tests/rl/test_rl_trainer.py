"""The RL run end to end on CPU (tiny random-weight debug MoE, byte tokens): it logs every RL
metric, resumes bit-exactly, runs sharded (FSDP + EP, 2 processes) with the same rollouts as one
process, saves on SIGTERM, counts a verifier that raises instead of dying, and refuses bad task
files in one line naming file:line, on 1 process and on 2."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from rnd1.config import load_config
from rnd1.parallel.env import DistEnv
from rnd1.rl.trainer import RLTrainer
from rnd1.tools.rehearsal import RL_METRICS

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "task" / "task_rl.toml"
PATTERN = "^[ -~]"  # the reply starts with printable ASCII: a random byte model, about a third of the time


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}.", "pattern": PATTERN, "verifier": "regex"}) + "\n"
                            for i in range(12)))
    return path


def _overrides(run, prompts, **extra):
    kv = {"job.dump_folder": run, "job.print_config": "false", "model.init": "random",
          "checkpoint.initial_load_path": "", "rl.tasks": prompts, "rl.eval_tasks": prompts, "rl.eval_limit": 3,
          "rl.prompts_per_step": 2, "rl.group_size": 4, "rl.gen_length": 16, "rl.block_length": 8,
          "training.seq_len": 128, "training.local_batch_size": 3, "training.steps": 4, "training.autocast": "none",
          "optimizer.lr_attention": 1e-2, "optimizer.lr_non_attention": 1e-2,
          "metrics.log_freq": 1, "metrics.peak_flops": 1e12, "checkpoint.interval": 2, "eval.interval": 2}
    kv.update(extra)
    return [f"--{k}={v}" for k, v in kv.items()]


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def _steps(run):
    recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}, [r for r in recs if "val_accuracy" in r]


def _run(run, prompts, **extra):
    RLTrainer(load_config(CONFIG, _overrides(run, prompts, **extra)), _env()).train()
    return _steps(run)


def _launch(run, prompts, nproc, **extra):
    env = {**os.environ, "CONFIG_FILE": str(CONFIG), "NPROC": str(nproc), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", str(REPO / "run_train.sh"), *_overrides(run, prompts, **extra)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_an_rl_run_logs_every_metric_and_moves_the_weights(tmp_path, prompts):
    steps, val = _run(tmp_path / "run", prompts, **{"training.steps": 6})
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for rec in steps.values():
        for key in RL_METRICS + ("loss", "grad_norm", "clipped_frac", "kl"):
            assert key in rec, key
        assert 0 <= rec["reward_mean"] <= 1 and 0 <= rec["zero_adv_frac"] <= 1 and 0 < rec["rollout_share"] < 1
        assert 1 <= rec["completion_len"] <= 16 and rec["rollout_tokens_per_s"] > 0
    assert any(0 < r["reward_mean"] < 1 and r["zero_adv_frac"] < 1 for r in steps.values()), steps
    assert any(r["grad_norm"] > 0 for r in steps.values())  # a group with unequal rewards pushes the weights
    assert [v["step"] for v in val] == [2, 4, 6] and all(v["val_n"] == 3 for v in val)
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "scripts" / "plot_metrics.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    assert plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "rl.png")]) == 0
    assert (tmp_path / "rl.png").stat().st_size > 10_000


def test_rl_resume_is_bit_exact(tmp_path, prompts):
    """Rollouts, prompt masks and the prompt order are keyed by step and rollout: a run stopped at
    step 2 and resumed logs the same rewards, losses and gradient norms as one that never stopped."""
    extra = {"rl.inner_steps": 2}  # mu = 2: pi_old, clipping and the second prompt mask all run
    full, _ = _run(tmp_path / "full", prompts, **extra)
    _run(tmp_path / "part", prompts, **{**extra, "training.steps": 2})
    part, _ = _run(tmp_path / "part", prompts, **extra)
    for s in (3, 4):
        for key in ("reward_mean", "reward_std", "completion_len", "loss", "grad_norm", "clipped_frac"):
            assert part[s][key] == full[s][key], (s, key, part[s][key], full[s][key])
    assert any(full[s]["clipped_frac"] > 0 for s in full) or any(full[s]["loss"] != 0 for s in full)


def test_kl_to_the_frozen_initial_policy(tmp_path, prompts):
    steps, _ = _run(tmp_path / "run", prompts, **{"rl.kl_beta": 0.1, "training.steps": 3})
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy still is the reference
    assert steps[3]["kl"] > 0  # two updates later it is not


def test_the_rollout_sampler_settings_come_from_the_config(tmp_path, prompts, monkeypatch):
    import rnd1.generate as generate

    seen, real = [], generate.diffusion_generate

    def spy(model, prompts_, **kw):
        seen.append(kw)
        return real(model, prompts_, **kw)

    monkeypatch.setattr(generate, "diffusion_generate", spy)  # rollout.py imports it at call time
    _run(tmp_path / "run", prompts, **{"training.steps": 1, "rl.eval_tasks": "", "rl.suffix_window": 4,
                                       "rl.kv_cache": "prefix", "rl.decoding": "factor", "rl.factor": 1.5})
    kw = seen[0]
    assert (kw["suffix_window"], kw["kv_cache"], kw["factor"], kw["threshold"], kw["block_length"]) == \
        (4, "prefix", 1.5, None, 8)
    assert kw["temperature"] == 1.0 and kw["gen_length"] == 16


def test_a_verifier_that_raises_scores_0_and_is_counted(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"Say {i}.", "pattern": "([" if i % 2 else PATTERN,
                                       "verifier": "regex"}) + "\n" for i in range(6)))
    steps, _ = _run(tmp_path / "run", bad, **{"training.steps": 2, "rl.eval_tasks": ""})
    assert steps[2]["verifier_errors"] > 0
    out = capsys.readouterr().out
    # Bad patterns sit on rows 1, 3, 5 (lines 2, 4, 6); the stream is shuffled, so any may be first.
    assert "a verifier raised" in out, out
    assert re.search(re.escape(str(bad)) + r":[246]: verifier 'regex': error: ", out), out


@pytest.mark.multiprocess
def test_two_processes_fsdp_and_ep_sample_what_one_process_samples(tmp_path, prompts):
    """EP 2 x FSDP on 2 processes (gloo), fp32: every forward is a collective, so the sampler runs in
    lockstep; the rollouts are keyed per sample, so the 2-process run draws the same completions as
    one process and logs the same rewards."""
    one = _launch(tmp_path / "one", prompts, 1, **{"training.steps": 2, "training.mixed_precision_param": "float32"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(tmp_path / "two", prompts, 2, **{"training.steps": 2, "parallelism.expert_parallel_degree": 2,
                                                   "training.mixed_precision_param": "float32"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, va = _steps(tmp_path / "one")
    b, vb = _steps(tmp_path / "two")
    for s in (1, 2):
        assert b[s]["reward_mean"] == a[s]["reward_mean"] and b[s]["completion_len"] == a[s]["completion_len"]
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-3)
    assert vb[0]["val_accuracy"] == va[0]["val_accuracy"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [1, 2])
def test_bad_task_files_are_one_line_naming_file_and_line(tmp_path, prompts, nproc):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "pattern": "x", "verifier": "regex"}) + "\n"
                   + json.dumps({"prompt": "no answer"}) + "\n")
    got = _launch(tmp_path / "run", prompts, nproc, **{"rl.tasks": bad})
    err = got.stderr.strip().splitlines()
    assert got.returncode == 2 and len(err) == 1 and "Traceback" not in got.stderr, got.stderr[-2000:]
    assert f"{bad}:2" in err[0] and "answer" in err[0]
    assert not (tmp_path / "run").exists()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 100, "pattern": "x", "verifier": "regex"}) + "\n")
    got = _launch(tmp_path / "run", prompts, nproc, **{"rl.tasks": long})
    assert got.returncode == 2 and f"{long}:1" in got.stderr and "seq_len" in got.stderr, got.stderr[-2000:]


@pytest.mark.multiprocess
def test_sigterm_saves_and_the_run_resumes(tmp_path, prompts):
    run = tmp_path / "run"
    env = {**os.environ, "CONFIG_FILE": str(CONFIG), "NPROC": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", str(REPO / "run_train.sh"),
                             *_overrides(run, prompts, **{"training.steps": 1000, "checkpoint.interval": 0,
                                                          "eval.interval": 0})],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "preempted: checkpoint saved" in out
    assert any((run / "checkpoint").glob("step-*"))
