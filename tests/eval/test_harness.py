"""The lm-evaluation-harness adapter, end to end on local task files (no downloads)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[eval]'")


class OracleB(torch.nn.Module):
    """Predicts the byte 'b' everywhere, with certainty (for a2d: at every output position)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(mask_token_id=257)

    def forward(self, x, doc_ids=None, positions=None):
        logits = torch.full((*x.shape, 258), -30.0)
        logits[..., ord("b")] = 30.0
        return logits


def _task_dir(tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in [
        {"question": "x", "choices": ["a", "b"], "label": 1},
        {"question": "y", "choices": ["b", "c"], "label": 0},
        {"question": "z", "choices": ["c", "a"], "label": 1}]) + "\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "answer": "bbb"}, {"prompt": "q", "answer": "abc"}]) + "\n")
    (tmp_path / "rnd1_toy_mc.yaml").write_text(f"""
task: rnd1_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (tmp_path / "rnd1_toy_gen.yaml").write_text(f"""
task: rnd1_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
metric_list:
  - metric: exact_match
""")
    return tmp_path


@pytest.mark.parametrize("objective", ["a2d", "ar"])
def test_harness_runs_local_tasks_end_to_end(tmp_path, monkeypatch, objective):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from rnd1.eval.harness import RND1HarnessLM

    lm = RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective=objective, mc_samples=4, gen_steps=4,
                       gen_length=3, block_length=3, kv_cache="none")  # the oracle has no keys to cache
    res = simple_evaluate(model=lm, tasks=["rnd1_toy_mc", "rnd1_toy_gen"],
                          task_manager=TaskManager(include_path=str(_task_dir(tmp_path))))
    mc, gen = res["results"]["rnd1_toy_mc"], res["results"]["rnd1_toy_gen"]
    # the oracle always prefers "b": right on docs 1 and 2, wrong on doc 3 (no "b" among its choices... picks by
    # likelihood of 'c' vs 'a', both impossible); generation always writes "bbb"
    assert mc["acc,none"] >= 2 / 3 - 1e-9
    assert gen["exact_match,none"] == pytest.approx(0.5)
    rec = res["config"]["rnd1_record"]  # lm_eval keeps the harness's record next to the scores
    assert rec["sampler"]["gen_steps"] == 4 and rec["sampler"]["kv_cache"] == "none" and rec["model_hash"]


def test_harness_passes_the_sampler_settings(monkeypatch):
    from rnd1.eval import harness

    seen = {}
    real = harness.diffusion_generate

    def spy(model, prompts, **kw):
        seen.update(kw)
        return real(model, prompts, **dict(kw, kv_cache="none"))  # the oracle has no keys to cache

    monkeypatch.setattr(harness, "diffusion_generate", spy)

    class Req:
        args = ("ab", {"until": ["\n"], "max_gen_toks": 4})

    lm = harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective="a2d", gen_steps=4, gen_length=4,
                               block_length=4, kv_cache="dual", cache_refresh="2", factor="1.5", suffix_window="3")
    lm.generate_until([Req()])
    assert (seen["kv_cache"], seen["cache_refresh"], seen["factor"], seen["threshold"], seen["suffix_window"]) == \
        ("dual", 2, 1.5, None, 3)
    assert lm.get_model_info()["rnd1_record"]["sampler"]["suffix_window"] == 3
    assert lm.get_model_info()["rnd1_record"]["sampler"]["factor"] == 1.5


def test_harness_defaults_are_the_fast_settings():
    from rnd1.eval import harness
    from rnd1.generate import FAST_DEFAULTS

    lm = harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective="a2d")
    got = lm.sampler_settings()
    assert (got["kv_cache"], got["threshold"], got["factor"], got["block_length"], got["suffix_window"]) == \
        (FAST_DEFAULTS["kv_cache"], FAST_DEFAULTS["threshold"], FAST_DEFAULTS["factor"], FAST_DEFAULTS["block_length"],
         FAST_DEFAULTS["suffix_window"]) == ("dual", 0.9, None, 32, 32)
    from rnd1.diffusion.objective import get_objective as objective_of

    block = harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective=objective_of("block_a2d", block_size=4))
    assert block.suffix_window == 0  # block diffusion reads no later block: nothing to window
    with pytest.raises(ValueError, match="no suffix to window"):  # refused at once, not at the first generation
        harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective=objective_of("block_a2d", block_size=4),
                              suffix_window="4")
    with pytest.raises(ValueError, match="suffix_window 'x'"):
        harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective="a2d", suffix_window="x")
    exact = harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective="a2d", kv_cache="none", parallel="False")
    assert (exact.kv_cache, exact.threshold, exact.factor) == ("none", None, None)
    other = harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective="a2d", factor="1.0")
    assert (other.threshold, other.factor) == (None, 1.0)  # a factor replaces the default threshold rule
    with pytest.raises(ValueError, match="not both"):
        harness.RND1HarnessLM(lm=OracleB(), tokenizer="byte", objective="a2d", threshold="0.9", factor="1")
    from rnd1.diffusion.objective import get_objective
    from rnd1.generate import fast_kv_cache

    assert fast_kv_cache(get_objective("block_a2d", block_size=4)) == "prefix"  # block diffusion: its exact cache


def test_registered_for_the_cli():
    from lm_eval.api.registry import get_model

    import rnd1.eval.harness  # noqa: F401

    assert get_model("rnd1").__name__ == "RND1HarnessLM"


def test_eval_script_writes_table(tmp_path, monkeypatch):
    """scripts/eval.py on a real (debug) checkpoint and local tasks: JSON + Markdown table."""
    import importlib.util

    from rnd1.checkpoint.hf import save_pretrained
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ckpt = tmp_path / "hf"
    save_pretrained(build_model(get_preset("debug", mask_token_id=257), seed=0), ckpt)
    tasks = _task_dir(tmp_path / "tasks_dir") if (tmp_path / "tasks_dir").mkdir() is None else None
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("eval_script", os.path.join(repo, "scripts", "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--checkpoint", str(ckpt), "--tokenizer", "byte", "--objective", "a2d", "--tasks", "rnd1_toy_mc:0",
                   "rnd1_toy_gen:0", "--include-path", str(tasks), "--mc-samples", "2", "--gen-steps", "3",
                   "--out", str(tmp_path / "out"), "--name", "debug"])
    assert rc == 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith("| model | rnd1_toy_mc (0-shot) | rnd1_toy_gen (0-shot) |") and "| debug |" in table
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["scores"]["rnd1_toy_mc"]["metric"] == "acc,none"
    assert data["record"]["sampler"]["gen_steps"] == 3 and data["record"]["seeds"] == {"sampler": 0}
    assert (data["record"]["sampler"]["kv_cache"], data["record"]["sampler"]["threshold"]) == ("dual", 0.9)


def test_the_cli_without_lm_eval_is_one_line_and_exit_2(monkeypatch, capsys):
    """rnd1-lm-eval is installed with rnd1 even without the eval extra: it says what to install."""
    import sys

    from rnd1.eval import lm_eval_cli

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # import lm_eval... -> ImportError
    monkeypatch.delitem(sys.modules, "rnd1.eval.harness", raising=False)
    monkeypatch.delattr("rnd1.eval.harness", raising=False)
    assert lm_eval_cli.main(["--model", "rnd1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[eval]'" in err, err


def test_the_cli_help_says_how_to_name_the_model(capsys):
    from rnd1.eval import lm_eval_cli

    with pytest.raises(SystemExit) as e:
        lm_eval_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("rnd1-lm-eval: lm_eval's command line with --model rnd1 registered")
    assert "--model_args checkpoint=" in out and "usage:" in out  # ours, then lm_eval's own help
