"""The arithmetic task and what measures on it: the data generator holds questions out of every
training file; scripts/eval_task.py and scripts/bench_sampler.py score, time and record; the
same command twice gives the same numbers; the record changes with the weights."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rnd1.checkpoint.hf import save_pretrained
from rnd1.eval.record import evaluation_record, model_hash
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import build_model

REPO = Path(__file__).resolve().parents[2]


def _script(name):
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    _script("make_chat_data").main(["--task", "--out", str(out), "--docs", "300", "--conversations", "500"])
    return out


def test_heldout_questions_are_in_no_training_file(task):
    held = [json.loads(line) for line in (task / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 1000 and len({h["question"] for h in held}) == 1000
    keys = {h["question"][len("What is "):-1] for h in held}  # "43 + 17"
    pretrain = "".join(json.loads(line)["text"] for line in (task / "pretrain.jsonl").read_text().splitlines())
    seen = {line.rsplit(" = ", 1)[0] for line in pretrain.splitlines()}
    for line in (task / "sft.jsonl").read_text().splitlines():
        seen.add(json.loads(line)["messages"][1]["content"].rsplit(" = ", 1)[0])
    assert len(seen) > 3000 and not keys & seen
    rl = [json.loads(line) for line in (task / "rl.jsonl").read_text().splitlines()]
    assert len(rl) == 15050 - 1000 and not keys & {r["prompt"][len("What is "):-1] for r in rl}
    for h in held:  # the answers are right
        a, op, b = h["question"][len("What is "):-1].split()
        assert int(h["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_the_generator_is_seeded(task, tmp_path):
    _script("make_chat_data").main(["--task", "--out", str(tmp_path), "--docs", "300", "--conversations", "500"])
    for name in ("pretrain.jsonl", "sft.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (task / name).read_bytes()


def test_reply_number():
    """eval_task reads a reply as the RL number verifier does (one function for both)."""
    from rnd1.rl.verifiers import final_number

    assert final_number("37 + 48 = 85.<|im_end|>\n") == "85"
    assert final_number("12 - 30 = -18.") == "-18"
    assert final_number("no digits<|im_end|>99") is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    save_pretrained(build_model(get_preset("debug"), seed=0), out, overwrite=True)
    return out


def _questions(tmp_path, task, n=6):
    q = tmp_path / "q.jsonl"
    q.write_text("".join((task / "heldout.jsonl").read_text().splitlines(keepends=True)[:n]))
    return q


TIMING = ("seconds", "tokens_per_s")


def test_the_same_command_gives_the_same_numbers(checkpoint, task, tmp_path, capsys):
    ev = _script("eval_task")
    q = _questions(tmp_path, task)
    args = ["--checkpoint", str(checkpoint), "--questions", str(q), "--gen-length", "16", "--block-length", "8",
            "--kv-cache", "dual", "--factor", "1.0", "--batch-size", "4"]
    assert ev.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert ev.main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    for r in (a, b):
        for k in TIMING:
            r.pop(k)
        r["record"].pop("command")
    assert a == b
    rec = a["record"]
    assert rec["sampler"]["kv_cache"] == "dual" and rec["sampler"]["factor"] == 1.0
    assert rec["seeds"] == {"sampler": 0, "torch": 0} and "torch" in rec["packages"] and "CPU" in rec["device"]
    assert len(a["replies"]) == a["n"] == 6 and "accuracy 0.0000 +- 0.0000 (n=6)" in capsys.readouterr().out


def test_the_record_changes_with_the_weights():
    m = build_model(get_preset("debug"), seed=0)
    h = model_hash(m)
    assert model_hash(build_model(get_preset("debug"), seed=0)) == h
    with torch.no_grad():
        m.norm.weight[0] += 1e-3
    assert model_hash(m) != h
    rec = evaluation_record(model=m, checkpoint="x", sampler={"a": 1}, seeds={"s": 0}, command=["c"])
    assert rec["model_hash"] == model_hash(m) and rec["command"] == ["c"]


def test_bench_sampler_table_json_and_frontier(checkpoint, task, tmp_path, capsys):
    bench = _script("bench_sampler")
    q = _questions(tmp_path, task, 4)
    rc = bench.main(["--checkpoint", str(checkpoint), "--questions", str(q), "--gen-lengths", "16", "24",
                     "--block-length", "8", "--settings", "dual/factor", "none/fixed", "prefix/threshold",
                     "dual/threshold/1", "none/threshold", "dual/threshold/2/w4", "--out", str(tmp_path / "bench")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "CPU" in out and out.count("none/fixed") == 2
    res = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = res["results"]
    assert [r["setting"] for r in rows] == ["none/fixed", "dual/factor", "prefix/threshold", "dual/threshold/1",
                                            "none/threshold", "dual/threshold/2/w4"] * 2
    assert rows[3]["sampler"]["cache_refresh"] == 1 and rows[2]["sampler"]["cache_refresh"] == 0
    assert (rows[5]["sampler"]["cache_refresh"], rows[5]["sampler"]["suffix_window"]) == (2, 4)
    assert rows[0]["sampler"]["suffix_window"] == 0
    for cached, uncached in zip(rows[3::6], rows[4::6]):  # a dual cache refreshed every step is exact
        assert cached["correct"] == uncached["correct"] and cached["nfe"] == uncached["nfe"]
    base = rows[0]
    assert base["speedup"] == 1.0 and base["accuracy_change"] == 0.0
    assert base["nfe"] <= 16 and base["tokens_per_forward"] <= 1.0  # one token per forward at most
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / base["tokens_per_s"])
    assert base["accuracy_change_stderr"] == 0.0 and len(base["correct"]) == 4  # per question, paired
    d = [int(a) - int(b) for a, b in zip(rows[1]["correct"], base["correct"])]
    assert rows[1]["accuracy_change"] == pytest.approx(sum(d) / 4)
    assert res["record"]["model_hash"] and (tmp_path / "bench" / "frontier.png").stat().st_size > 1000


def test_the_paired_standard_error_of_an_accuracy_change():
    paired = _script("bench_sampler").paired_stderr
    assert paired("1111", "1111") == 0.0  # the same answers: no doubt about the change
    assert paired("1100", "1010") == pytest.approx(math.sqrt(2 / 3 / 4))  # d = 0, +1, -1, 0
    with pytest.raises(ValueError):
        paired("11", "111")  # not the same questions


def test_bench_sampler_appends_a_gen_length_measured_whole(checkpoint, task, tmp_path, capsys):
    """--append adds a gen length (with its own settings) to results.json of the same model; a
    gen length measured again replaces its rows; another model is refused in one line."""
    bench = _script("bench_sampler")
    q = _questions(tmp_path, task, 2)
    common = ["--checkpoint", str(checkpoint), "--questions", str(q), "--block-length", "8", "--out",
              str(tmp_path / "b")]
    assert bench.main(common + ["--gen-lengths", "8", "16", "--settings", "none/fixed", "dual/threshold"]) == 0
    assert bench.main(common + ["--gen-lengths", "16", "24", "--settings", "none/fixed", "--append"]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [(r["gen_length"], r["setting"]) for r in res["results"]] == [
        (8, "none/fixed"), (8, "dual/threshold"), (16, "none/fixed"), (24, "none/fixed")]
    assert len(res["record"]["earlier_runs"]) == 1
    capsys.readouterr()
    assert bench.main(["--checkpoint", str(checkpoint), "--questions", str(q), "--append"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--suffix-window", "--cache-refresh"])
def test_eval_task_refuses_a_negative_count(checkpoint, capsys, flag):
    with pytest.raises(SystemExit) as e:
        _script("eval_task").main(["--checkpoint", str(checkpoint), flag, "-1"])
    assert e.value.code == 2 and "expected a count >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["full/fixed", "none/fixed/2", "dual/threshold/0", "dual/threshold/x",
                                     "dual/threshold/2/2", "dual/threshold/w0", "dual/threshold/w8/2",
                                     "none/fixed/w8/w8"])
def test_bench_sampler_refuses_an_unknown_setting(checkpoint, capsys, setting):
    bench = _script("bench_sampler")
    with pytest.raises(SystemExit) as e:
        bench.main(["--checkpoint", str(checkpoint), "--settings", setting])
    assert e.value.code == 2 and "expected CACHE/RULE" in capsys.readouterr().err


@pytest.mark.slow
def test_the_recipe_runs_its_four_stages_each_from_the_last(task, tmp_path):
    """scripts/train_task_model.py with 4 steps a stage: four runs, each after the first started
    from the previous checkpoint, the last on 1,152-token windows; a finished recipe
    reused; the result loads and scores."""
    import subprocess

    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "scripts" / "train_task_model.py"), "--out", str(out), "--data", str(task),
           "--training.steps=4", "--checkpoint.interval=4", "--eval.interval=0", "--metrics.log_freq=2",
           "--compile.enable=false"]  # the stages' compile is rehearsed in tests/test_shipped_configs.py
    got = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    for stage in ("ar", "a2d", "sft", "sft_long"):
        assert (out / stage / "checkpoint" / "step-00000004").is_dir()
    assert "[task] 4/4 task_sft_long.toml: done" in got.stdout
    assert f"4 steps from {out / 'sft' / 'checkpoint'} -> {out / 'sft_long'}" in got.stdout
    assert "(micro-batch 4 x 1152," in got.stdout + got.stderr  # one conversation per long window
    assert f"4 steps from {out / 'a2d' / 'checkpoint'} -> {out / 'sft'}" in got.stdout
    assert f"4 steps from {out / 'ar' / 'checkpoint'} -> {out / 'a2d'}" in got.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("is finished, reused") == 4
    bad = subprocess.run(cmd[:6] + ["--training.stepz=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "stepz" in bad.stderr
    ev = _script("eval_task")
    assert ev.main(["--checkpoint", str(out / "sft_long" / "checkpoint"), "--questions", str(task / "heldout.jsonl"),
                    "--limit", "4", "--gen-length", "8", "--block-length", "8"]) == 0


def test_bad_inputs_are_one_line(checkpoint, tmp_path, capsys):
    ev, bench = _script("eval_task"), _script("bench_sampler")
    assert ev.main(["--checkpoint", str(checkpoint), "--questions", str(tmp_path / "none.jsonl")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"question": 3}\n')
    assert bench.main(["--checkpoint", str(checkpoint), "--questions", str(bad)]) == 2
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    assert ev.main(["--checkpoint", str(tmp_path / "nope"), "--questions", str(good)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "none.jsonl does not exist" in err[0] and f"{bad}:2: expected" in err[1]
    assert "nope" in err[2]
