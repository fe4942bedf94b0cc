"""Code execution limits, and the in-training task scorer on local task files."""

import json

import pytest
import torch

from rnd1.eval.code_exec import run_program
from rnd1.eval.tasks import TaskError, load_task, score_tasks


def test_passing_failing_timeout_and_no_network():
    ok = run_program("def add(a, b):\n    return a + b", "assert add(2, 3) == 5")
    assert ok.passed and ok.status == "passed"
    bad = run_program("def add(a, b):\n    return a - b", "assert add(2, 3) == 5")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.output
    slow = run_program("while True:\n    pass", "", timeout_s=1.0)
    assert slow.status == "timeout"
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))", "")
    assert not net.passed and "network access is disabled" in net.output


def test_task_scoring_with_a_scripted_model(tmp_path):
    from rnd1.data.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")

    class Oracle(torch.nn.Module):
        """An AR 'model' that always predicts the byte 'b' with certainty."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, doc_ids=None, positions=None):
            logits = torch.full((*x.shape, 258), -30.0)
            logits[..., ord("b")] = 30.0
            return logits

    f = tmp_path / "mc.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"context": "x", "choices": ["a", "b"], "label": 1},
        {"context": "y", "choices": ["bb", "ab"], "label": 0},
        {"context": "z", "choices": ["b", "a"], "label": 1}]))
    g = tmp_path / "gen.jsonl"
    g.write_text(json.dumps({"prompt": "q", "answer": "bbbb"}) + "\n")
    res = score_tasks(Oracle(), tok, [str(f), str(g)], objective="ar", mask_id=257, gen_length=4)
    assert res["task/mc"] == pytest.approx(2 / 3) and res["task/gen"] == 1.0
    (tmp_path / "bad.jsonl").write_text('{"question": 1}\n')
    with pytest.raises(TaskError, match="bad.jsonl:1: expected context/choices/label or prompt/answer"):
        load_task(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("line,message", [("{not json", "bad2.jsonl:2: not JSON"),
                                          ("[1, 2]", "bad2.jsonl:2: expected a JSON object, got list")])
def test_task_file_errors_name_file_and_line(tmp_path, line, message):
    """Task files and data sources share one JSONL reader (rnd1/data/jsonl.py)."""
    from rnd1.data.prepare import iter_documents
    from rnd1.data.shards import DataError

    bad = tmp_path / "bad2.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "answer": "a", "text": "t"}) + "\n" + line + "\n")
    with pytest.raises(TaskError, match=message):
        load_task(bad)
    with pytest.raises(DataError, match=message):
        list(iter_documents(str(bad)))
