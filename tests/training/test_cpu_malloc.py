"""training.cpu_keep_freed_memory: after keep_freed_memory(), a freed 64 MiB tensor stays in the
process (the next step reuses it without page faults); by default glibc unmaps it."""

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import os, sys, torch
from rnd1.training.cpu_malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
t = torch.ones(16 * 2**20)  # 64 MiB, touched
del t
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_only_when_asked():
    kept = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        kept[mode] = float(out.stdout.strip().splitlines()[-1])
    assert kept["default"] < 16  # munmap'd on free
    assert kept["keep"] > 60  # still resident, ready for reuse


def test_config_key_is_on_by_default_and_can_be_turned_off():
    from rnd1.config import parse_args

    cfg = parse_args(["--training.cpu_keep_freed_memory=false"])
    assert cfg.training.cpu_keep_freed_memory is False
    assert parse_args([]).training.cpu_keep_freed_memory is True
