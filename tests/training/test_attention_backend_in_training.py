"""``model.attention_backend`` in the trainer: ``flex`` cannot train on the CPU and says so in one
line (exit 2, on one process and on two); ``auto`` logs what it chose; validation and the ELBO
scorer run on FlexAttention and get what they get on SDPA; the block sampler decodes the same
tokens on both, with and without its KV cache."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from rnd1.config import load_config
from rnd1.model import attention
from rnd1.parallel.env import DistEnv
from rnd1.train import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _cfg(run, data, **extra):
    kv = {"job.dump_folder": run, "data.datasets": str(data), "data.prepare": "", "training.steps": 1,
          "training.local_batch_size": 2, "training.seq_len": 64, "metrics.log_freq": 1,
          "job.print_config": "false", "checkpoint.enable": "false", "eval.interval": 0, "metrics.peak_flops": 1e12,
          "training.document_masking": "true", "eval.val_steps": 2, "eval.val_t_grid": "[0.3, 0.7]"}
    kv.update(extra)
    return [f"--{k}={v}" for k, v in kv.items()]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_flex_training_on_the_cpu_is_refused_in_one_line(tmp_path, byte_dataset, nproc):
    out = subprocess.run(["./run_train.sh", *_cfg(tmp_path / "run", byte_dataset),
                          "--model.attention_backend=flex", "--training.device=cpu"],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NPROC": str(nproc)})
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "model.attention_backend='flex'" in lines[0] and "use 'auto'" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_bad_backend_is_a_config_error(tmp_path, byte_dataset):
    from rnd1.config import ConfigError

    with pytest.raises(ConfigError, match="model.attention_backend"):
        load_config(CONFIG, _cfg(tmp_path / "run", byte_dataset, **{"model.attention_backend": "fast"}))


def test_validation_on_flex_equals_sdpa_and_auto_logs_its_choice(tmp_path, byte_dataset, monkeypatch, capsys):
    """Training on the CPU stays on SDPA (auto's logged reason); validation (no gradients) is
    sent to FlexAttention and gives SDPA's loss (fp32: under bf16 autocast they differ by bf16
    rounding, 1.2e-5 relative here)."""
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    attention.reset_choices()
    trainer = Trainer(load_config(CONFIG, _cfg(tmp_path / "run", byte_dataset, **{"training.autocast": "none"})), env)
    trainer.train()
    assert any("attention auto [documents B 2 q 64 k 64" in line and "fwd+bwd]: sdpa (FlexAttention has no "
               "backward" in line for line in capsys.readouterr().out.splitlines())
    trainer.model.set_attention_backend("sdpa")
    ref = trainer.validate()["val_loss"]
    prepared = []
    real = attention.block_mask

    def spy(pattern, device):
        prepared.append(pattern.kind)
        return real(pattern, device)

    monkeypatch.setattr(attention, "block_mask", spy)
    trainer.model.set_attention_backend("flex")
    got = trainer.validate()["val_loss"]
    assert prepared and set(prepared) == {"documents"}  # validation really ran on FlexAttention
    assert got == pytest.approx(ref, rel=1e-5)
    attention.reset_choices()


@pytest.fixture(scope="module")
def block_model():
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    return build_model(get_preset("debug"), seed=0, attention_mode="bidirectional").eval()


def test_elbo_scorer_on_flex_equals_sdpa(block_model):
    from rnd1.diffusion import get_objective
    from rnd1.eval.likelihood import elbo_loglikelihood

    obj = get_objective("block_a2d", block_size=4)
    got = {}
    for backend in ("sdpa", "flex"):
        block_model.set_attention_backend(backend)
        with torch.no_grad():
            got[backend] = elbo_loglikelihood(block_model, [5, 6, 7], list(range(10, 31)), mask_id=511,
                                              objective=obj, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert got["flex"] == pytest.approx(got["sdpa"], rel=1e-5)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_block_sampler_on_flex_decodes_what_sdpa_decodes(block_model, kv_cache):
    from rnd1.diffusion import get_objective
    from rnd1.generate import diffusion_generate

    obj = get_objective("block_a2d", block_size=4)
    outs = {}
    for backend in ("sdpa", "flex"):
        block_model.set_attention_backend(backend)
        outs[backend] = diffusion_generate(block_model, [[5, 6, 7, 8, 9, 10]], objective=obj, gen_length=12,
                                           steps=12, mask_id=511, kv_cache=kv_cache)
    assert outs["flex"].tokens == outs["sdpa"].tokens
