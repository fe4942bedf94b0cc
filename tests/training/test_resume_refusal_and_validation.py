"""A resume only continues the same run (objective, model, tokenizer), and validation attends
the way training does (document masking)."""

import json
from pathlib import Path

import pytest
import torch

from rnd1.checkpoint.dcp import COMPLETE, CheckpointManager, checkpoint_info
from rnd1.config import load_config
from rnd1.parallel.env import DistEnv
from rnd1.train import Trainer, main
from rnd1.training import build as B

CONFIG = Path(__file__).resolve().parents[2] / "train_configs" / "debug_model.toml"


def _cfg(run, data, **extra):
    kv = {"job.dump_folder": run, "data.datasets": str(data), "data.prepare": "", "training.steps": 2,
          "training.local_batch_size": 4, "training.seq_len": 64, "metrics.log_freq": 1,
          "job.print_config": "false", "checkpoint.interval": 2, "eval.interval": 0, "metrics.peak_flops": 1e12}
    kv.update(extra)
    return [f"--{k}={v}" for k, v in kv.items()]


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def test_resume_with_another_objective_model_or_tokenizer_is_refused(tmp_path, byte_dataset, capsys):
    run = tmp_path / "run"
    assert main(["--config", str(CONFIG)] + _cfg(run, byte_dataset)) == 0
    step, ckpt = CheckpointManager(run / "checkpoint").latest()
    info = checkpoint_info(ckpt)
    assert step == 2 and info["objective"] == "a2d" and info["tokenizer"] == "byte-258"
    before, config_before = (ckpt / COMPLETE).read_text(), (run / "config.toml").read_text()
    capsys.readouterr()

    # the example: the finished a2d run, asked for mdlm (more steps: it would train)
    rc = main(["--config", str(CONFIG)] + _cfg(run, byte_dataset, **{"objective.name": "mdlm",
                                                                      "training.steps": 4}))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{run}: checkpoint step-00000002 was trained with objective.name='a2d' but this config gives 'mdlm'" in err
    assert "job.dump_folder" in err
    rc = main(["--config", str(CONFIG)] + _cfg(run, byte_dataset, **{"model.name": "debug_dense"}))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model config architectures=['Qwen3MoeForCausalLM'] but " \
        "this config gives ['Qwen3ForCausalLM']" in err, err
    # a tokenizer change (shards are checked first, so fake the checkpoint's record of it)
    (ckpt / COMPLETE).write_text(json.dumps({**info, "tokenizer": "qwen3-abc"}))
    rc = main(["--config", str(CONFIG)] + _cfg(run, byte_dataset))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "trained with tokenizer='qwen3-abc' but this config gives 'byte-258'" in err, err
    # nothing trained or saved by the refused runs
    (ckpt / COMPLETE).write_text(before)
    assert CheckpointManager(run / "checkpoint").latest() == (2, ckpt)
    steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl")]
    assert max(steps) == 2 and (run / "config.toml").read_text() == config_before
    # the same settings resume (and here, finished, train nothing more)
    assert main(["--config", str(CONFIG)] + _cfg(run, byte_dataset)) == 0


@pytest.mark.parametrize("document_masking", [True, False])
def test_validation_passes_doc_ids_when_training_does(tmp_path, byte_dataset, document_masking):
    cfg = load_config(CONFIG, _cfg(tmp_path / "run", byte_dataset, **{
        "checkpoint.enable": "false", "training.document_masking": str(document_masking).lower(),
        "eval.val_steps": 2, "eval.val_t_grid": "[0.3, 0.7]"}))
    trainer = Trainer(cfg, _env())
    seen, forward = [], trainer.model.forward

    def spy(*args, doc_ids=None, **kw):
        seen.append(doc_ids)
        return forward(*args, doc_ids=doc_ids, **kw)

    trainer.model.forward = spy
    loss = trainer.validate()["val_loss"]
    assert torch.isfinite(torch.tensor(loss))
    loader = B.build_loader(cfg, trainer.datasets, "val", trainer.batch, trainer.parallel, seed=cfg.eval.val_seed)
    batches = [next(loader)["doc_ids"] for _ in range(2)]  # val_steps
    expected = [d for d in batches for _ in range(2)]  # each at every t of the grid
    assert len(seen) == 4
    if document_masking:
        assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    else:
        assert all(d is None for d in seen)
