"""The trainer's one step function and the loss as a per-token bound.

A model whose LM head is zero predicts uniformly over V; its per-token NELBO is exactly log V.
Training (the step with noise drawn per sample) and validation (the fixed t quadrature) must
both read log V within 1%: the loss is per token and unbiased, not per supervised position."""

import math

import pytest
import torch

from rnd1.config import load_config
from rnd1.parallel.env import DistEnv
from rnd1.train import Trainer

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _trainer(tmp_path, data, *extra):
    args = [f"--job.dump_folder={tmp_path / 'run'}", f"--data.datasets=[\"{data}\"]", "--data.prepare=",
            "--job.print_config=false", "--metrics.peak_flops=1e11", "--eval.val_steps=8", *extra]
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    return Trainer(load_config(CONFIG, args), env)


@pytest.mark.parametrize("objective", ["a2d", "mdlm", "ar"])
def test_a_uniform_model_reads_log_v_in_training_and_validation(tmp_path, byte_dataset, objective):
    recipe = "causal" if objective == "ar" else "scp"
    tr = _trainer(tmp_path, byte_dataset, f"--objective.name={objective}", f"--objective.attention_recipe={recipe}",
                  "--training.local_batch_size=16", "--training.global_batch_tokens=65536")  # 16 micro-batches
    with torch.no_grad():
        tr.model.lm_head.weight.zero_()
    log_v = math.log(tr.model_cfg.vocab_size)
    val = tr.validate()
    assert val["val_loss"] == pytest.approx(log_v, rel=0.01)
    bound_key = "val_ppl" if objective == "ar" else "val_ppl_bound"
    assert val[bound_key] == pytest.approx(tr.model_cfg.vocab_size, rel=0.07)
    from rnd1.training.step import MicroBatch, run_step

    losses = []
    for _ in range(4):  # four training steps' worth of noise (the estimator has a heavy tail at small t)
        micro = [MicroBatch(b["input_ids"], b["sample_ids"], seed=0)
                 for b in (next(tr.train_loader) for _ in range(tr.batch.grad_accum))]
        out = run_step(tr.model, tr.objective, micro, mask_id=tr.model_cfg.mask_token_id,
                       samples_per_step=tr.batch.global_batch_tokens // tr.batch.seq_len, backward=False)
        losses.append(out.loss.item())
    assert sum(losses) / len(losses) == pytest.approx(log_v, rel=0.01), losses
    # the supervised-count normaliser (the old convention) is about twice the bound for 1/t weights
    if objective != "ar":
        assert out.weighted_ce.item() / out.supervised.item() > 1.5 * log_v


def test_train_step_and_the_benchmark_run_the_same_step_function(tmp_path, byte_dataset, monkeypatch):
    import sys

    import rnd1.train as train_mod
    import rnd1.training.step as step_mod

    calls = []
    real = step_mod.run_step

    def spy(*a, **k):
        calls.append(k.get("backward"))
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "run_step", spy)
    monkeypatch.setattr(step_mod, "run_step", spy)
    tr = _trainer(tmp_path, byte_dataset, "--training.seq_len=64", "--training.local_batch_size=2")
    tr.train_step()
    tr.validate()
    assert calls == [True, False]
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_train_step as bench

    a = bench.parse(["--vocab", "512", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                     "--head-dim", "16", "--experts", "4", "--topk", "2", "--moe-inter", "16", "--seq", "16",
                     "--batch", "2", "--dtype", "fp32", "--objective", "a2d"])
    mcfg = bench.model_config(a)
    step = bench.rnd1_step_fn(a, bench.build_rnd1(a, mcfg), mcfg)
    loss = step(torch.randint(0, 500, (2, 16)))
    assert calls == [True, False, True] and torch.isfinite(loss)
