"""End-to-end runs of the trainer on CPU: the loss falls, resume is bit-exact, bad input fails
at start-up with a clear message and leaves nothing half-written."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rnd1.config import load_config
from rnd1.train import Trainer, main
from rnd1.parallel.env import DistEnv

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _overrides(tmp, data, **extra):
    base = {"job.dump_folder": tmp, "data.datasets": str(data), "data.prepare": "", "training.steps": 6,
            "training.local_batch_size": 4, "training.seq_len": 64, "metrics.log_freq": 1,
            "job.print_config": "false", "checkpoint.interval": 3, "eval.interval": 0}
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def _losses(run_dir):
    recs = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_default_config_trains_and_loss_falls(tmp_path, byte_dataset):
    cfg = load_config(CONFIG, _overrides(tmp_path / "run", byte_dataset, **{"training.steps": 40,
                                                                           "checkpoint.enable": "false"}))
    Trainer(cfg, _env()).train()
    losses = _losses(tmp_path / "run")
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("objective,recipe", [("a2d", "scp"), ("ar", "causal"), ("mdlm", "grafting")])
def test_resume_is_bit_exact(tmp_path, byte_dataset, objective, recipe, capsys):
    extra = {"objective.name": objective, "objective.attention_recipe": recipe,
             "objective.grafting_tokens": 4 * 64 * 2, "lr_schedule.warmup_tokens": 4 * 64 * 3,
             "training.global_batch_tokens": 4 * 64 * 2, "eval.interval": 3}
    full = tmp_path / "full"
    Trainer(load_config(CONFIG, _overrides(full, byte_dataset, **extra)), _env()).train()
    part = tmp_path / "part"
    Trainer(load_config(CONFIG, _overrides(part, byte_dataset, **{**extra, "training.steps": 3})), _env()).train()
    capsys.readouterr()
    Trainer(load_config(CONFIG, _overrides(part, byte_dataset, **extra)), _env()).train()  # resumes at 3
    log = capsys.readouterr().out
    mode, since = {"scp": ("bidirectional", "since step 0"), "causal": ("causal", "since step 0"),
                   "grafting": ("bidirectional", "since 512 tokens")}[recipe]
    assert f"resumed at step 3 with {mode} attention ({recipe} recipe, {since})" in log, log
    assert "attention ->" not in log  # nothing switched in the resumed run: the switch was at step 2 / 0
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical floats
    from rnd1.checkpoint.dcp import CheckpointManager

    wa = torch.load(next((full / "checkpoint").glob("step-00000006")) / "extra_rank0.pt", weights_only=False)
    wb = torch.load(next((part / "checkpoint").glob("step-00000006")) / "extra_rank0.pt", weights_only=False)
    assert wa["loader"] == wb["loader"] and wa["tokens_seen"] == wb["tokens_seen"]
    ma, mb = CheckpointManager(full / "checkpoint"), CheckpointManager(part / "checkpoint")
    assert ma.latest()[0] == mb.latest()[0] == 6


def test_gradient_accumulation_matches_one_big_batch(tmp_path, byte_dataset):
    """The same global batch as 1 x 8 sequences or 4 x 2 sequences gives the same loss."""
    one = load_config(CONFIG, _overrides(tmp_path / "a", byte_dataset, **{
        "training.local_batch_size": 8, "training.steps": 1, "checkpoint.enable": "false"}))
    four = load_config(CONFIG, _overrides(tmp_path / "b", byte_dataset, **{
        "training.local_batch_size": 2, "training.global_batch_tokens": 8 * 64, "training.steps": 1,
        "checkpoint.enable": "false"}))
    t1, t4 = Trainer(one, _env()), Trainer(four, _env())
    assert t4.batch.grad_accum == 4
    # same sequences in both: the loader yields the same stream of windows
    b1 = next(t1.train_loader)["input_ids"]
    b4 = torch.cat([next(t4.train_loader)["input_ids"] for _ in range(4)])
    assert torch.equal(b1, b4)


def test_bad_inputs_fail_clearly(tmp_path, byte_dataset, capsys):
    # missing data with preparation disabled
    rc = main(["--config", str(CONFIG)] + _overrides(tmp_path / "r1", tmp_path / "nope"))
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    # seq_len beyond the model's max positions
    rc = main(["--config", str(CONFIG)] + _overrides(tmp_path / "r2", byte_dataset, **{"training.seq_len": 4096}))
    assert rc == 2 and "max_position_embeddings" in capsys.readouterr().err
    # tokenizer / shard mismatch: shards built with the byte tokenizer, run with a fake identity
    bad = tmp_path / "bad_data"
    shutil.copytree(byte_dataset, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["tokenizer"] = "some-other-tokenizer"
    (bad / "meta.json").write_text(json.dumps(meta))
    rc = main(["--config", str(CONFIG)] + _overrides(tmp_path / "r3", bad))
    assert rc == 2 and "built with tokenizer some-other-tokenizer" in capsys.readouterr().err
    # token id >= vocab: a model whose vocabulary is smaller than the data's ids
    meta["tokenizer"] = "byte-258"
    (bad / "meta.json").write_text(json.dumps(meta))
    (bad / meta["splits"]["train"][0]["file"]).write_bytes(
        (bad / meta["splits"]["train"][0]["file"]).read_bytes()[:-4] + (600).to_bytes(4, "little"))
    rc = main(["--config", str(CONFIG)] + _overrides(tmp_path / "r4", bad))
    assert rc == 2 and "token id 600 >= the model's vocab_size 512" in capsys.readouterr().err
    # config errors
    rc = main(["--config", str(CONFIG), "--training.stepz=3"])
    assert rc == 2 and "did you mean 'steps'" in capsys.readouterr().err
    # batch sizes that do not divide
    rc = main(["--config", str(CONFIG)] + _overrides(tmp_path / "r5", byte_dataset, **{
        "training.global_batch_tokens": 1000}))
    assert rc == 2 and "not a multiple" in capsys.readouterr().err
    # nothing was written for runs that failed before training
    for r in ("r1", "r2", "r4", "r5"):
        assert not (tmp_path / r / "checkpoint").exists()


@pytest.mark.parametrize("fmt", ["rnd1", "rnd1_release"])
def test_export_hf_at_end_records_how_to_run_the_model(tmp_path, byte_dataset, fmt):
    from rnd1.checkpoint.hf import load_pretrained

    cfg = load_config(CONFIG, _overrides(tmp_path / "run", byte_dataset, **{
        "training.steps": 2, "checkpoint.export_hf_at_end": "true", "checkpoint.export_hf_format": fmt}))
    trainer = Trainer(cfg, _env())
    trainer.train()
    out = tmp_path / "run" / "hf_export"
    conf = json.loads((out / "config.json").read_text())
    assert conf["rnd1"] == {"attention": "bidirectional", "objective": "a2d", "mask_token_id": 257}
    assert conf["model_type"] == ("rnd1" if fmt == "rnd1_release" else "qwen3_moe")
    # the byte tokenizer's own ids (not Qwen's 151645/151643, outside a 512-token vocabulary)
    assert (conf["eos_token_id"], conf["pad_token_id"], conf["mask_token_id"]) == (256, 256, 257)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
    model = load_pretrained(out, attention="bidirectional")
    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(model(x), trainer.model(x))


def test_in_training_task_scores_are_logged(tmp_path, byte_dataset):
    task = tmp_path / "mc.jsonl"
    task.write_text('{"context": "import", "choices": [" os", " zzqx"], "label": 0}\n')
    cfg = load_config(CONFIG, _overrides(tmp_path / "run", byte_dataset, **{
        "training.steps": 2, "checkpoint.enable": "false", "eval.tasks": str(task), "eval.task_interval": 2}))
    Trainer(cfg, _env()).train()
    recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    scored = [r for r in recs if "task/mc" in r]
    assert len(scored) == 1 and scored[0]["step"] == 2 and scored[0]["task/mc"] in (0.0, 1.0)
