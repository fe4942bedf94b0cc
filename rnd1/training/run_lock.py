"""One trainer per run folder: ``<run folder>/.rnd1.lock`` holds the pid, host and start time of the
process that owns the folder (rank 0 of the job; the other ranks of the same job never take it).

A second trainer started in the same folder (a restart while an orphaned worker is still
training, two jobs pointed at one folder) refuses with one line naming the holder, instead of
crashing later on the other run's half-written checkpoint files. A lock left behind by a process
that is gone is stale and taken over: on the same host the holder is gone when its pid no longer
exists, or exists with another start time (the pid was reused). A holder on another host cannot be
checked from here, so it is trusted until its file is removed."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".rnd1.lock"


class RunLockError(RuntimeError):
    """The run folder belongs to a live trainer."""


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), or None when the process
    does not exist or /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after the last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from this host
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    start = process_start_time(pid)
    if start is None:
        try:
            os.kill(pid, 0)  # no /proc here: existence is all that can be checked
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return holder.get("start_time") is None
    return start == holder.get("start_time")


class RunLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._created_dir = False
        self._held = False

    def acquire(self) -> "RunLock":
        try:
            return self._acquire()
        except RunLockError:
            raise
        except OSError as e:  # a read-only or foreign folder: the first write of the run fails here
            self._cleanup_dir()
            raise RunLockError(f"job.dump_folder={self.run_dir}: cannot write there ({e.strerror or e}); "
                               f"choose a writable folder") from None

    def _acquire(self) -> "RunLock":
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self._created_dir = True
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": process_start_time(os.getpid())}
        for _ in range(3):  # a stale file is removed, then the exclusive create is tried again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except FileNotFoundError:
                    continue  # released meanwhile
                except (OSError, ValueError):
                    holder = {}  # torn or foreign file: no live holder can be named
                if holder and _holder_alive(holder):
                    self._cleanup_dir()
                    raise RunLockError(
                        f"{self.run_dir} is in use by another trainer (pid {holder.get('pid')} on "
                        f"{holder.get('host')}); stop it, or set job.dump_folder to another folder "
                        f"(if that process is gone, delete {self.path})")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        self._cleanup_dir()
        raise RunLockError(f"{self.path}: could not take the run folder lock (it keeps changing)")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        """A start that failed leaves no run folder behind (the folder is made for the lock)."""
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty
            except OSError:
                pass
