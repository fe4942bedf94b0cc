"""Verifiers score rollouts and never raise; task files are checked whole, naming file:line."""

import json

import pytest

from rnd1.rl import verifiers
from rnd1.rl.tasks import TaskSetError, load_prompts


def test_number_verifier_reads_the_final_number():
    row = {"answer": "85"}
    assert verifiers.reward("37 + 48 = 85.<|im_end|>", row).value == 1.0
    assert verifiers.reward("37 + 48 = 84.", row).value == 0.0
    assert verifiers.reward("85, no: 86<|im_end|>85", row).value == 0.0  # cut at the turn's end
    assert verifiers.reward("no number", row).value == 0.0
    assert verifiers.reward("37 + 48 = 85.0", row).value == 0.0  # integers, as eval_task reads them


def test_code_verifier_runs_the_tests_in_the_sandbox():
    row = {"verifier": "code", "tests": "assert add(2, 3) == 5"}
    assert verifiers.reward("```python\ndef add(a, b):\n    return a + b\n```", row).value == 1.0
    assert verifiers.reward("def add(a, b):\n    return a - b", row).value == 0.0
    assert verifiers.reward("```py\ndef add(a, b):\n    return a + b\n", row).value == 1.0  # ```py, unclosed
    for early_exit in ("import os\nos._exit(0)", "raise SystemExit(0)"):  # exits before any test runs
        assert verifiers.reward(early_exit, row).value == 0.0


def test_a_verifier_that_raises_scores_zero_and_says_why():
    r = verifiers.reward("85", {"verifier": "number"})  # no "answer": the verifier raises KeyError
    assert r.value == 0.0 and r.error.startswith("verifier 'number': KeyError")

    @verifiers.register("test_out_of_range")
    def _bad(reply, row):
        return 2.0

    try:
        r = verifiers.reward("x", {"verifier": "test_out_of_range"})
        assert r.value == 0.0 and "outside [0, 1]" in r.error
        with pytest.raises(ValueError, match="registered already"):
            verifiers.register("test_out_of_range")(_bad)
    finally:
        verifiers._REGISTRY.pop("test_out_of_range")


def _write(tmp_path, rows):
    p = tmp_path / "tasks.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_task_file_rows_and_refusals(tmp_path):
    rows = load_prompts(_write(tmp_path, [{"question": "What is 1 + 2?", "answer": "3"},
                                          {"prompt": "f?", "tests": "assert 1", "verifier": "code"}]))
    assert rows[0]["prompt"] == "What is 1 + 2?" and rows[0]["verifier"] == "number"
    cases = [([{"prompt": "q"}], r"tasks.jsonl:1: verifier 'number' needs string field\(s\) answer"),
             ([{"answer": "3"}, {"answer": "4"}], r"tasks.jsonl:1: expected a non-empty string \"prompt\""),
             ([{"prompt": "q", "answer": "1"}, {"prompt": "q", "answer": "1", "verifier": "nope"}],
              r"tasks.jsonl:2: verifier 'nope' unknown; expected one of code, number"),
             ([], "holds no prompts")]
    for bad, message in cases:
        with pytest.raises(TaskSetError, match=message):
            load_prompts(_write(tmp_path, bad))
    with pytest.raises(TaskSetError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
