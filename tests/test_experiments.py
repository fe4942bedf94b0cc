"""The experiment tools: CBS branch construction and estimate, run comparison, and the miniature
study end to end at a few steps."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rnd1.data.loader import PackedLoader
from rnd1.data.shards import TokenDataset
from rnd1.tools.cbs import estimate_cbs, make_branches

REPO = Path(__file__).resolve().parents[1]


def _branches(**kw):
    args = dict(checkpoint="ck", batch_tokens=[4096, 1024, 2048], token_budget=8192, base_batch_tokens=1024,
                lr_attention=1e-3, lr_non_attention=1e-5, warmup_tokens=512, eval_tokens=4096, seq_len=256,
                out_dir="o")
    args.update(kw)
    return make_branches(**args)


def test_branches_scale_lr_and_align_tokens():
    bs = _branches()
    assert [b.batch_tokens for b in bs] == [1024, 2048, 4096]
    assert [b.steps for b in bs] == [8, 4, 2]  # same token budget
    assert [b.eval_interval for b in bs] == [4, 2, 1]  # evaluations at the same token counts
    assert bs[2].lr_attention == pytest.approx(2e-3) and bs[1].lr_non_attention == pytest.approx(1e-5 * 2 ** 0.5)
    for b in bs:  # identical warmup in tokens, same starting checkpoint
        assert "--lr_schedule.warmup_tokens=512" in b.overrides and "--checkpoint.initial_load_path=ck" in b.overrides
    with pytest.raises(ValueError, match="not a multiple of batch 3072"):
        _branches(batch_tokens=[1024, 3072])
    with pytest.raises(ValueError, match="evaluation every 1024 tokens"):
        _branches(eval_tokens=1024)


def test_cbs_sweep_warms_up_over_1_percent_of_the_budget_by_default():
    """The paper's warmup for the branched runs: 1% of the token budget, whatever the config's
    warmup_fraction says (which would otherwise apply per branch)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "scripts" / "cbs_sweep.py"), "--config", str(REPO / "train_configs" /
           "debug_model.toml"), "--checkpoint", "ck", "--batch-tokens", "1024", "2048", "--token-budget", "409600",
           "--eval-tokens", "4096", "--print-only"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all("--lr_schedule.warmup_tokens=4096" in line for line in lines)
    assert all("--lr_schedule.warmup_fraction=0" in line for line in lines)
    out = subprocess.run(cmd + ["--warmup-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert "--lr_schedule.warmup_tokens=0" in out.stdout


def test_branches_see_identical_data_order(tmp_path, byte_dataset):
    """The sample stream does not depend on the batch size: 4 batches of 2 == 1 batch of 8."""
    sp = TokenDataset(byte_dataset).split("train")
    small = PackedLoader([sp], seq_len=64, batch_size=2, eos_id=256, seed=3)
    big = PackedLoader([sp], seq_len=64, batch_size=8, eos_id=256, seed=3)
    a = torch.cat([next(small)["input_ids"] for _ in range(4)])
    b = next(big)
    assert torch.equal(a, b["input_ids"]) and b["sample_ids"].tolist() == list(range(8))


def test_cbs_estimate_on_synthetic_curves():
    # loss at equal tokens flat up to 4096, worse beyond: CBS = 4096
    final = {1024: 2.000, 2048: 1.995, 4096: 2.010, 8192: 2.20, 16384: 2.6}
    cbs, rule = estimate_cbs(final, tolerance=0.01)
    assert cbs == 4096 and "within 1.0%" in rule
    assert estimate_cbs(final, tolerance=0.2)[0] == 8192
    with pytest.raises(ValueError):
        estimate_cbs({})


def test_miniature_study_runs_end_to_end(tmp_path, byte_dataset):
    spec = importlib.util.spec_from_file_location("mini", REPO / "scripts" / "miniature_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "doc"
    rc = mod.main(["--out", str(out), "--runs", str(tmp_path / "runs"), "--data", str(byte_dataset),
                   "--ar-steps", "4", "--convert-steps", "4", "--seq-len", "64", "--batch", "4",
                   "--cbs-batch-seqs", "1", "2", "4", "--cbs-budget", "1024"])
    assert rc == 0
    table = (out / "recipes.md").read_text()
    for name in ("random", "grafting", "scp"):
        assert f"| {name} |" in table
    cbs = json.loads((out / "cbs.json").read_text())
    assert set(map(int, cbs["final_val_loss"])) == {64, 128, 256} and cbs["cbs"] in (64, 128, 256)
    assert (out / "recipes.png").stat().st_size > 0 and (out / "cbs.png").stat().st_size > 0
