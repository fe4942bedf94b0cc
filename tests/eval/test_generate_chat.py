"""scripts/generate.py --chat: a question goes through the Qwen3 chat template (generation prompt,
thinking off) and the answer is printed; block models need their block size."""

import importlib.util
from pathlib import Path

import pytest

from rnd1.checkpoint.hf import save_pretrained
from rnd1.data.chat import encode_chat_prompt
from rnd1.data.tokenizer import load_tokenizer
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    save_pretrained(build_model(get_preset("debug"), seed=0), out, overwrite=True)
    return out


def test_chat_goes_through_the_template(folder, capsys, monkeypatch):
    gen = _script()
    seen = {}
    real = gen.diffusion_generate

    def spy(model, prompts, **kw):
        seen["prompts"], seen["eos"] = prompts, kw["eos_id"]
        return real(model, prompts, **kw)

    monkeypatch.setattr(gen, "diffusion_generate", spy)
    rc = gen.main(["--checkpoint", str(folder), "--chat", "What is 2 + 2?", "--gen-length", "8", "--steps", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    tok = load_tokenizer("byte")
    assert seen["prompts"] == [encode_chat_prompt([{"role": "user", "content": "What is 2 + 2?"}], tok)]
    assert "Q: What is 2 + 2?" in out and "\nA: " in out and "NFE" in out


def test_block_models_need_their_block_size(folder, capsys):
    gen = _script()
    assert gen.main(["--checkpoint", str(folder), "--objective", "block_a2d", "--prompt", "ab"]) == 2
    err = capsys.readouterr().err
    assert "needs its block size" in err and err.count("\n") == 1
    assert gen.main(["--checkpoint", str(folder), "--objective", "block_a2d", "--block-size", "4", "--prompt", "ab",
                     "--gen-length", "8", "--steps", "8"]) == 0


def test_a_block_models_nfe_says_which_forwards_are_cache_writes(folder, capsys):
    """--steps 8 on a block model with its cache: NFE counts the cache-writing passes too, and says
    so (issue 32: "NFE 36" for --steps 32 was unexplained)."""
    import re

    gen = _script()
    assert gen.main(["--checkpoint", str(folder), "--objective", "block_a2d", "--block-size", "4", "--prompt",
                     "abcdef", "--gen-length", "12", "--steps", "8"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    m = re.match(r"NFE (\d+) \((\d+) denoising \+ (\d+) that write the block cache: the prompt's prefill and "
                 r"each finished block's clean pass\)", line)
    assert m, line
    nfe, steps, writes = map(int, m.groups())
    assert nfe == steps + writes and steps <= 8 and writes >= 1


def test_a_missing_or_wrong_checkpoint_path_names_both_kinds(tmp_path, capsys):
    """The one line names what a checkpoint can be: the trainer's own folder or a HF folder."""
    gen = _script()
    for path, what in [(tmp_path / "nope", "no such folder"), (tmp_path, "neither a trainer checkpoint")]:
        assert gen.main(["--checkpoint", str(path), "--prompt", "ab"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, err
        assert "RUN/checkpoint" in err and "Hugging Face checkpoint folder" in err


def test_cache_and_parallel_rule_reach_the_sampler(folder, capsys, monkeypatch):
    gen = _script()
    seen = {}
    real = gen.diffusion_generate

    def spy(model, prompts, **kw):
        seen.update(kw)
        return real(model, prompts, **kw)

    monkeypatch.setattr(gen, "diffusion_generate", spy)
    assert gen.main(["--checkpoint", str(folder), "--prompt", "ab", "--gen-length", "8", "--steps", "8",
                     "--block-length", "4", "--kv-cache", "dual", "--cache-refresh", "2", "--factor", "1.0",
                     "--suffix-window", "3"]) == 0
    assert (seen["kv_cache"], seen["cache_refresh"], seen["factor"], seen["threshold"], seen["suffix_window"]) == \
        ("dual", 2, 1.0, None, 3)
    for bad in (["--suffix-window", "-1"], ["--cache-refresh", "-1"]):  # the sampler refuses: one line, exit 2
        capsys.readouterr()
        assert gen.main(["--checkpoint", str(folder), "--prompt", "ab", "--gen-length", "8", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "must be >= 0" in err, err
    with pytest.raises(SystemExit):  # one rule at a time
        gen.main(["--checkpoint", str(folder), "--prompt", "ab", "--threshold", "0.9", "--factor", "1.0"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_examples_keep_their_line_breaks():
    """A lone backslash at a docstring line's end joined two example lines in --help."""
    doc = _script().__doc__
    assert "qwen3_tokenizer \\\n        --chat" in doc


def test_defaults_are_the_fast_settings(folder, monkeypatch):
    from rnd1.generate import FAST_DEFAULTS

    gen = _script()
    seen = []
    real = gen.diffusion_generate

    def spy(model, prompts, **kw):
        seen.append(kw)
        return real(model, prompts, **kw)

    monkeypatch.setattr(gen, "diffusion_generate", spy)
    assert gen.main(["--checkpoint", str(folder), "--prompt", "ab", "--gen-length", "40"]) == 0
    kw = seen[-1]
    assert (kw["kv_cache"], kw["threshold"], kw["factor"], kw["block_length"], kw["steps"], kw["suffix_window"]) == \
        (FAST_DEFAULTS["kv_cache"], FAST_DEFAULTS["threshold"], FAST_DEFAULTS["factor"], FAST_DEFAULTS["block_length"], 40,
         FAST_DEFAULTS["suffix_window"]) == ("dual", 0.9, None, 32, 40, 32)
    assert gen.main(["--checkpoint", str(folder), "--prompt", "ab", "--gen-length", "8", "--steps", "4",
                     "--kv-cache", "none", "--no-parallel", "--suffix-window", "0"]) == 0
    kw = seen[-1]
    assert (kw["kv_cache"], kw["threshold"], kw["factor"], kw["steps"], kw["suffix_window"]) == ("none", None, None, 4, 0)
