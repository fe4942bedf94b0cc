"""The one-command GPU check (rnd1/kernels/bench/gpu_check.py) in its CPU mode: Triton interpreter,
tiny shapes, fp32/fp16. It must exit 0 and print every section."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_runs_on_cpu():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("RND1_KERNEL_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "rnd1.kernels.bench.gpu_check", "--tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for section in ("== environment ==", "== correctness:", "== reproducibility:", "== speed: NOT MEASURED",
                    "== targets (issue 27)", "== training:", "0 failed check(s)"):
        assert section in text, f"missing {section!r}:\n{text[-4000:]}"
    targets = text.split("== targets (issue 27)")[1].split("== training:")[0]
    for row in ("host reads (item/int/tolist) | 0", "grouped GEMM fwd", "grouped GEMM dx", "grouped GEMM dW",
                "masked CE"):
        assert row in targets, f"missing {row!r}:\n{targets}"
    assert "unmeasured" in targets and "met" not in targets.replace("unmeasured", "")  # no speed claimed on CPU
    assert "FAIL" not in text and "DIFFER" not in text
    assert "bfloat16" not in text.split("== correctness:")[1].split("== training:")[0]  # interpreter: no bf16 checks
