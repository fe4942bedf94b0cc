import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str | Path, *args, timeout: int = 300, env: dict | None = None) -> list[str]:
    """Run ``script`` under torchrun on CPU (gloo) and return its stdout lines; fail with stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout.splitlines()


def last_json(lines: list[str]) -> dict:
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output: {lines[-20:]}")
