"""The [MASK] input embedding as a parameter of its own (issue 14): lookups of the mask id read it,
its init (table row / mean of the trained rows), its optimiser group with its own lr, the HF
round trip through the table's mask row, old DCP checkpoints without it, and bad config values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rnd1.checkpoint.hf import load_pretrained, save_pretrained
from rnd1.config import ConfigError, load_config
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model
from rnd1.optim import GroupSpec, TokenSchedule, build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"
MASK = 511  # the debug presets' mask id


def _ids(seed=0, B=2, L=24, vocab=500):
    x = torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))
    x[:, 1::3] = MASK
    return x


# --------------------------------------------------------------------------- lookups and init
@torch.no_grad()
def test_mask_id_reads_the_separate_row_not_the_table():
    model = build_model(get_preset("debug"), seed=0, attention_mode="bidirectional").eval()
    assert torch.equal(model.mask_embedding, model.embed_tokens.weight[MASK])  # random init: the row itself
    x = _ids()
    before = model(x)
    model.embed_tokens.weight[MASK] += 1.0  # the table row: no longer read (untied head: not used at all)
    assert torch.equal(model(x), before)
    model.mask_embedding += 1.0
    after = model(x)
    assert (after - before).abs().amax(dim=-1).min() > 1e-4  # every position sees a mask token
    no_mask = x.masked_fill(x == MASK, 7)
    model.mask_embedding -= 1.0
    first = model(no_mask)
    model.mask_embedding += 5.0
    assert torch.equal(model(no_mask), first)  # only the mask id reads it


def test_init_table_and_mean_of_trained_rows():
    model = build_model(get_preset("debug", mask_token_id=257), seed=3)  # the byte tokenizer's ids, as trained
    table = model.embed_tokens.weight.detach()
    model.init_mask_embedding("mean", trained_rows=258)  # bytes + eos; the mask row 257 and rows 258.. unused
    torch.testing.assert_close(model.mask_embedding.detach(), table[:257].mean(0), rtol=0, atol=1e-7)
    model.init_mask_embedding("mean", trained_rows=300)
    want = torch.cat([table[:257], table[258:300]]).mean(0)  # the mask row never counts
    torch.testing.assert_close(model.mask_embedding.detach(), want, rtol=0, atol=1e-7)
    assert not torch.allclose(model.mask_embedding, table[257])
    model.init_mask_embedding("table")
    assert torch.equal(model.mask_embedding, table[257])
    with pytest.raises(ValueError, match=r"trained_rows=0 must be in \[1, vocab_size=512\]"):
        model.init_mask_embedding("mean", trained_rows=0)
    with pytest.raises(ValueError, match="'median' unknown"):
        model.init_mask_embedding("median")


# --------------------------------------------------------------------------- optimiser group
def _names(model, group):
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)] for p in group["params"]}


def test_own_group_learns_while_non_attention_is_frozen_or_nearly():
    """Setting 4 (non-attention lr 1e-8, or 0): the mask row moves at its own lr, the table does not."""
    for lr_rest in (0.0, 1e-8):
        model = build_model(get_preset("debug"), seed=0)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model, attention=GroupSpec(1e-3, 0.1), non_attention=GroupSpec(lr_rest, 0.1),
                              mask_embedding=GroupSpec(1e-2, 0.0))
        groups = {g["name"]: g for g in opt.param_groups}
        assert _names(model, groups["mask_embedding"]) == {"mask_embedding"}
        assert "mask_embedding" not in _names(model, groups.get("non_attention", {"params": []}))
        lrs = TokenSchedule(warmup_tokens=0, total_tokens=100).apply(opt, 0)
        assert lrs["mask_embedding"] == 1e-2
        for _ in range(2):
            model(_ids()).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        moved = (model.mask_embedding - init["mask_embedding"]).abs().max().item()
        assert moved > 5e-3  # Adam: ~lr per step
        table = (model.embed_tokens.weight - init["embed_tokens.weight"]).abs().max().item()
        assert table <= 10 * lr_rest  # 0 when frozen; a few lr (Adam's step, fp32 rounding) otherwise
        assert (not model.embed_tokens.weight.requires_grad) == (lr_rest == 0)


def test_without_own_group_it_is_non_attention_and_lr_zero_freezes_it():
    model = build_model(get_preset("debug"), seed=0)
    groups = {g["name"]: g for g in param_groups(model, attention=GroupSpec(1e-3), non_attention=GroupSpec(1e-4))}
    assert set(groups) == {"attention", "non_attention"} and "mask_embedding" in _names(model, groups["non_attention"])
    groups = {g["name"]: g for g in param_groups(model, attention=GroupSpec(1e-3), non_attention=GroupSpec(1e-4),
                                                 mask_embedding=GroupSpec(0.0))}
    assert "mask_embedding" not in groups and not model.mask_embedding.requires_grad
    assert "mask_embedding" not in _names(model, groups["non_attention"])


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("preset", ["debug", "debug_dense"])
def test_hf_export_writes_the_learned_row_into_the_table_and_loads_back(preset, tmp_path):
    from safetensors.torch import load_file

    model = build_model(get_preset(preset), seed=1).eval()
    with torch.no_grad():
        model.mask_embedding.copy_(torch.linspace(-1, 1, model.config.hidden_size))  # "learned"
    table_before = model.embed_tokens.weight.detach().clone()
    out = save_pretrained(model, tmp_path / "export")
    assert torch.equal(model.embed_tokens.weight, table_before)  # export left the live model alone
    files = load_file(out / "model.safetensors")
    assert not any("mask_embedding" in k for k in files)  # the standard Qwen3 layout
    emb = files["model.embed_tokens.weight"]
    assert torch.equal(emb[MASK], model.mask_embedding.detach())
    assert torch.equal(emb[:MASK], table_before[:MASK])

    back = load_pretrained(out).eval()
    assert torch.equal(back.mask_embedding, model.mask_embedding)
    x = _ids()
    with torch.no_grad():
        ours, again = model(x), back(x)
    if model.config.tie_word_embeddings:
        # the head's mask column now scores with the learned row: the mask id is never a target
        assert torch.equal(ours[..., :MASK], again[..., :MASK])
    else:
        assert torch.equal(ours, again)
    if preset == "debug":
        transformers = pytest.importorskip("transformers")
        ref = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
        with torch.no_grad():
            assert (ref(x).logits - ours).abs().max().item() <= 1e-4  # transformers reads the table row


def test_dcp_checkpoint_without_the_row_fills_it_from_the_table(tmp_path):
    """Checkpoints written before the row existed load for conversion, export and generation."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from rnd1.checkpoint.dcp import CheckpointError, CheckpointManager, load_model_weights

    src = build_model(get_preset("debug"), seed=1)
    folder = tmp_path / "old" / "step-00000001"
    state = {k: v for k, v in get_model_state_dict(src).items() if k != "mask_embedding"}
    dcp.save({"app": {"model": state}}, checkpoint_id=str(folder))
    (folder / "COMPLETE").write_text(json.dumps({"step": 1}))
    dst = build_model(get_preset("debug"), seed=2)
    load_model_weights(dst, tmp_path / "old")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k

    with torch.no_grad():
        src.mask_embedding.fill_(0.5)  # a new checkpoint keeps its own row
    CheckpointManager(tmp_path / "new").save(2, src, None, {})
    load_model_weights(dst, tmp_path / "new")
    assert torch.equal(dst.mask_embedding, torch.full_like(dst.mask_embedding, 0.5))

    del state["norm.weight"]  # anything else missing still fails
    dcp.save({"app": {"model": state}}, checkpoint_id=str(tmp_path / "bad" / "step-00000001"))
    (tmp_path / "bad" / "step-00000001" / "COMPLETE").write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match=r"lacks 2 model parameters: mask_embedding, norm\.weight$"):
        load_model_weights(dst, tmp_path / "bad")


# --------------------------------------------------------------------------- config and builders
@pytest.mark.parametrize("override,match", [
    ("--model.mask_embedding_init=median", r"model\.mask_embedding_init .*'median' is not one of 'keep', 'mean'"),
    ("--optimizer.lr_mask_embedding=-0.5", r"optimizer\.lr_mask_embedding .*-0\.5 must be >= 0, or -1"),
    ("--optimizer.weight_decay_mask_embedding=-1", r"optimizer\.weight_decay_mask_embedding .*must be >= 0"),
])
def test_bad_values_fail_with_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(CONFIG, [override])
    assert "\n" not in str(err.value)


def test_builders_apply_mean_init_and_the_groups_lr(tmp_path):
    from rnd1.parallel.env import DistEnv
    from rnd1.training import build as B

    cfg = load_config(CONFIG, [f"--job.dump_folder={tmp_path}", "--model.init=random",
                               "--model.mask_embedding_init=mean", "--optimizer.lr_non_attention=1e-8",
                               "--optimizer.lr_mask_embedding=2e-3", "--lr_schedule.scale_with_batch=true",
                               "--training.local_batch_size=2", "--training.seq_len=32"])
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    tok = B.build_tokenizer(cfg)
    mcfg = B.build_model_config(cfg, tok)
    dims = B.build_parallel_dims(cfg, env)
    model = B.build_and_load_model(cfg, mcfg, dims, env, tokenizer=tok)
    table = model.embed_tokens.weight.detach()
    trained = [i for i in range(tok.vocab_size) if i != tok.mask_id]
    torch.testing.assert_close(model.mask_embedding.detach(), table[trained].mean(0), rtol=0, atol=1e-7)
    batch = B.batch_plan(cfg, dims)
    cfg.lr_schedule.base_batch_tokens = batch.global_batch_tokens * 4  # sqrt rule: lrs halve
    opt, _ = B.build_optimizer_and_schedule(cfg, model, batch)
    peaks = {g["name"]: g["peak_lr"] for g in opt.param_groups}
    assert peaks["mask_embedding"] == pytest.approx(1e-3) and peaks["non_attention"] == pytest.approx(5e-9)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups}["mask_embedding"] == 0.0


def test_trainer_run_moves_only_the_mask_row_under_a_frozen_non_attention_group(tmp_path, byte_dataset):
    """End to end (a2d, masked inputs): mean init, then the row learns at its own lr while every
    non-attention parameter, the table included, stays frozen; the lr is logged per group."""
    from rnd1.parallel.env import DistEnv
    from rnd1.train import Trainer

    over = {"job.dump_folder": tmp_path / "run", "data.datasets": byte_dataset, "data.prepare": "",
            "training.steps": 3, "training.local_batch_size": 2, "training.seq_len": 32, "metrics.log_freq": 1,
            "job.print_config": "false", "checkpoint.enable": "false", "eval.interval": 0,
            "lr_schedule.warmup_tokens": 0, "model.mask_embedding_init": "mean",
            "optimizer.lr_non_attention": 0.0, "optimizer.lr_mask_embedding": 1e-2}
    cfg = load_config(CONFIG, [f"--{k}={v}" for k, v in over.items()])
    trainer = Trainer(cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None))
    table = trainer.model.embed_tokens.weight.detach().clone()
    start = trainer.model.mask_embedding.detach().clone()
    torch.testing.assert_close(start, table[:257].mean(0), rtol=0, atol=1e-7)  # byte ids, mask 257
    trainer.train()
    assert torch.equal(trainer.model.embed_tokens.weight, table)
    assert (trainer.model.mask_embedding - start).abs().max() > 1e-2  # 3 Adam steps at 1e-2
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(r.get("lr/mask_embedding") == 1e-2 for r in logged)
