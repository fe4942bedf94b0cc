"""Held-out NELBO / perplexity bound (rnd1/eval/perplexity.py, scripts/eval_ppl.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnd1.data.shards import TokenDataset
from rnd1.diffusion.objective import get_objective
from rnd1.eval.perplexity import heldout_nelbo, midpoint_grid
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model

REPO = Path(__file__).resolve().parents[2]


def test_training_validation_and_eval_ppl_share_one_quadrature():
    """Issue 32: val 2.198 in training, 2.737 from eval_ppl.py for one checkpoint (5 points on
    [0.1, 0.9] against 8 midpoints). One default grid now, and it reaches small t."""
    from rnd1.config import JobConfig
    from rnd1.eval.perplexity import DEFAULT_T_POINTS

    assert JobConfig().eval.val_t_grid == midpoint_grid(DEFAULT_T_POINTS)
    assert min(midpoint_grid(DEFAULT_T_POINTS)) < 0.1


def test_midpoint_grid():
    assert midpoint_grid(4) == [0.125, 0.375, 0.625, 0.875]
    with pytest.raises(ValueError):
        midpoint_grid(0)


@pytest.mark.parametrize("objective", ["a2d", "mdlm"])
def test_a_uniform_model_has_nelbo_log_v(byte_dataset, objective):
    model = build_model(get_preset("debug"), seed=0, attention_mode="bidirectional")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    split = TokenDataset(byte_dataset).split("val")
    res = heldout_nelbo(model, objective, split, mask_id=model.config.mask_token_id, seq_len=128, num_sequences=64,
                        batch_size=16, t_grid=midpoint_grid(8), seed=3)
    V = model.config.vocab_size
    assert res.nelbo == pytest.approx(math.log(V), rel=0.01)
    assert 0 < res.stderr < 0.05 * res.nelbo and res.ppl_low < res.ppl_bound < res.ppl_high
    assert res.tokens == 64 * len(get_objective(objective).scored(128).nonzero())


def test_ar_reports_the_exact_nll(byte_dataset):
    model = build_model(get_preset("debug"), seed=0, attention_mode="causal")
    split = TokenDataset(byte_dataset).split("val")
    res = heldout_nelbo(model, "ar", split, mask_id=model.config.mask_token_id, seq_len=32, num_sequences=4,
                        batch_size=4)
    x = torch.from_numpy(split.slice(0, 4 * 32).astype("int64")).view(4, 32)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, model.config.vocab_size),
                                                x[:, 1:].reshape(-1))
    assert res.nelbo == pytest.approx(nll.item(), rel=1e-5) and res.t_grid == []


def test_script_reports_and_writes_json(tmp_path, byte_dataset):
    from rnd1.checkpoint.hf import save_pretrained

    ckpt = tmp_path / "hf"
    save_pretrained(build_model(get_preset("debug"), seed=0), ckpt)
    out = tmp_path / "ppl.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_ppl.py"), "--checkpoint", str(ckpt),
                           "--data", str(byte_dataset), "--num-sequences", "4", "--seq-len", "64",
                           "--t-points", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "NELBO/token" in proc.stdout and "PPL <=" in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["objective"] == "a2d" and rec["sequences"] == 4 and rec["t_grid"] == [0.25, 0.75]
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_ppl.py"), "--checkpoint", str(tmp_path / "nope"),
                          "--data", str(byte_dataset)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
