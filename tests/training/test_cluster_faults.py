"""Cluster faults (issue 16): a frozen rank makes the others fail fast, naming it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnd1.config import load_config
from tests.parallel.conftest import free_port

HERE = Path(__file__).parent
REPO = HERE.parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_frozen_rank_times_out_fast_and_is_named():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "worker_frozen_rank.py"), "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    t0 = time.monotonic()
    lines = []
    try:
        for line in proc.stdout:  # stop reading once rank 0 has said its line (torchrun's tear-down of a
            lines.append(line.rstrip("\n"))  # stopped rank takes its own time)
            if line.startswith("MESSAGE ") or time.monotonic() - t0 > 120:
                break
    finally:
        # the SIGSTOPped rank (SIGKILL works on stopped processes): torchrun puts its workers in
        # their own process group, so killing the launcher's group left it stopped, holding memory
        frozen = [int(l.split()[-1]) for l in lines if l.split(" ", 1)[0].endswith("FROZEN")]
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    out = "\n".join(lines)
    assert time.monotonic() - t0 < 90, out[-3000:]
    msgs = [l for l in out.splitlines() if l.startswith("MESSAGE ")]
    assert msgs, out[-3000:]
    assert msgs[0] == ("MESSAGE collective timed out on rank 0 of 2: rank 1 stopped answering (frozen, hung or "
                       "dead); limit training.collective_timeout_s=3 (Timed out waiting 3000ms for recv "
                       "operation to complete)"), out[-3000:]
    elapsed = float(next(l for l in out.splitlines() if l.startswith("ELAPSED ")).split()[1])
    assert elapsed < 30  # the 3 s limit plus the 5 s grace, not gloo's 600 s


def test_collective_timeout_key_is_validated():
    cfg = load_config(REPO / "train_configs" / "debug_model.toml", ["--training.collective_timeout_s=42"])
    assert cfg.training.collective_timeout_s == 42
    with pytest.raises(Exception, match="collective_timeout_s"):
        load_config(REPO / "train_configs" / "debug_model.toml", ["--training.collective_timeout_s=0"])
