"""Run model-written code against tests (MBPP-style) in a subprocess with a time limit.

Isolation provided: a separate interpreter started with ``-I`` (no user site, no PYTHON* env,
no current directory on sys.path) in a fresh temporary directory; CPU-time and address-space
limits (``resource``); a wall-clock timeout that kills the process group; and network calls
blocked by replacing ``socket.socket`` / ``socket.create_connection`` before the program runs.
Not provided: a filesystem sandbox (the program can read and write what the user can) or
protection against code that restores the socket module from C extensions. Run untrusted
benchmarks in a container as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PRELUDE = """
import resource, socket
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
def _no_network(*a, **k):
    raise OSError("network access is disabled in rnd1 code execution")
socket.socket = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
del _no_network
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    output: str


def run_program(program: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    source = _PRELUDE.format(cpu=max(1, int(timeout_s) + 1), mem=memory_mb * 2**20) + "\n" + program + "\n\n" + tests
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "prog.py")
        with open(path, "w") as f:
            f.write(source)
        proc = subprocess.Popen([sys.executable, "-I", path], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env={"PATH": "/usr/bin:/bin"})
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return ExecResult(False, "timeout", out or "")
    return ExecResult(proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", out)
