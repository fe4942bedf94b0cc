"""Faults as a scheduler and a cluster really produce them, on a real torchrun tree (run_train.sh ->
rnd1.launch -> rnd1.train) with two processes: a refusal one rank makes is still one line and
exit 2; SIGUSR1, SIGHUP and SIGQUIT save and exit 0 like SIGTERM, even when the save outlasts
torchrun's close timeout; a signal before the first step exits 0 and says so; a rank killed with
SIGKILL is named in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnd1.checkpoint.dcp import CheckpointManager
from rnd1.training.run_lock import LOCK_NAME, process_start_time

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc"),
              pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
HOOKS = REPO / "scripts" / "fault_hooks"  # sitecustomize: slowed functions in the launched processes


def _overrides(run, data, steps=100000, **extra):
    kv = {"job.dump_folder": run, "data.datasets": data, "data.prepare": "", "training.steps": steps,
          "training.local_batch_size": 2, "training.seq_len": 64, "metrics.log_freq": 1,
          "job.print_config": "false", "checkpoint.interval": 0, "eval.interval": 0, "metrics.peak_flops": 1e12,
          **extra}
    return [f"--{k}={v}" for k, v in kv.items()]


def _start(run, data, nproc=2, steps=100000, env=None, **extra):
    config = "debug_model_ep.toml" if nproc > 1 else "debug_model.toml"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFIG_FILE": str(REPO / "train_configs" / config),
                "NPROC": str(nproc), **(env or {})}
    return subprocess.Popen([str(REPO / "run_train.sh"), *_overrides(run, data, steps, **extra)], cwd=REPO,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _logged(run):
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _wait(proc, ready, what, timeout=240):
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before {what}: " + proc.communicate()[1][-3000:])
        assert time.time() < deadline, f"never {what}"
        time.sleep(0.05)


def _hooked(**faults):
    return {"PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
            **{f"RND1_FAULT_{k.upper()}": v for k, v in faults.items()}}


# --------------------------------------------------------------------------- one line, exit 2
def _held_folder(run, data):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                             "start_time": process_start_time(holder.pid)}))
    return data, holder, f"error: {run} is in use by another trainer (pid {holder.pid}"


def _broken_meta(content: bytes):
    def make(run, data):
        copy = run.parent / "data"
        shutil.copytree(data, copy)
        (copy / "meta.json").write_bytes(content)
        return copy, None, f"error: {copy / 'meta.json'}: "
    return make


class _ReadOnlyFolder:
    """A dump folder on a read-only tmpfs (root ignores permission bits)."""

    def __init__(self, ro):
        self.ro = ro

    def kill(self):
        subprocess.run(["umount", str(self.ro)], capture_output=True)

    def wait(self):
        pass


def _read_only(run, data):
    ro = run.parent / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    return data, _ReadOnlyFolder(ro), f"error: job.dump_folder={ro}: cannot write there"


@pytest.mark.parametrize("fault", ["folder_in_use", "read_only_folder", "meta_not_json", "meta_not_utf8"])
def test_a_refusal_one_rank_makes_is_one_line_and_exit_2_on_two_processes(tmp_path, byte_dataset, fault):
    """Rank 0 refuses alone (the run lock, the dataset it reads first) while rank 1 waits for it in
    a collective: rank 1 must leave quietly, not with gloo's and torchrun's tracebacks."""
    make = {"folder_in_use": _held_folder, "read_only_folder": _read_only, "meta_not_json": _broken_meta(b"{not json"),
            "meta_not_utf8": _broken_meta(b'{"format": "\xff\xfe"}')}[fault]
    run = tmp_path / "run"
    data, holder, expected = make(run, Path(byte_dataset))
    if fault == "read_only_folder":
        run = holder.ro
    try:
        proc = _start(run, data, steps=2)
        out, err = proc.communicate(timeout=300)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert proc.returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), err[-3000:]
    assert "Traceback" not in out


def test_resume_refusals_are_one_line_on_two_processes(tmp_path, byte_dataset):
    """The restart checks every rank makes (another seq_len; every checkpoint damaged): one line,
    exit 2, whichever rank reports first."""
    from test_checkpoint_faults import _biggest_shard, _flip_floats

    run = tmp_path / "run"
    proc = _start(run, byte_dataset, steps=2, **{"checkpoint.interval": 1})
    assert proc.wait(timeout=300) == 0, proc.communicate()[1][-3000:]
    for extra, expected in ((({"training.seq_len": 32}), "was trained with training.seq_len=64 but this config "
                                                          "gives 32"),
                            ({}, "no intact checkpoint left (set aside as damaged: step-00000001.damaged, "
                                 "step-00000002.damaged)")):
        if not extra:
            for step in (1, 2):
                _flip_floats(_biggest_shard(run / "checkpoint" / f"step-{step:08d}"))
        proc = _start(run, byte_dataset, steps=4, **extra)
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], err[-3000:]


# --------------------------------------------------------------------------- scheduler signals
@pytest.mark.parametrize("sig,nproc", [(signal.SIGUSR1, 2), (signal.SIGHUP, 1), (signal.SIGQUIT, 1)])
def test_every_stop_signal_saves_and_exits_0_even_when_the_save_outlasts_torchruns_timeout(
        tmp_path, byte_dataset, sig, nproc):
    """The signal to the whole process group, as Slurm and Kubernetes send it. torchrun's close
    timeout is set to 1 s here (its default is 30 s) and every save takes 4 s: torchrun alone
    would SIGKILL the workers mid-save; the launcher waits for them instead."""
    run = tmp_path / "run"
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1", **_hooked(slow="rnd1.checkpoint.dcp:CheckpointManager.save:4")}
    proc = _start(run, byte_dataset, nproc=nproc, env=env)
    _wait(proc, lambda: len(_logged(run)) >= 2, "two steps logged")
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err + out, err[-3000:]
    assert f"received {sig.name}: finishing this step" in out
    assert f"launcher: {sig.name}: every worker saved and exited 0" in err
    assert CheckpointManager(run / "checkpoint").latest()[0] == max(_logged(run))


def test_a_signal_before_the_first_step_exits_0_with_nothing_to_save(tmp_path, byte_dataset):
    """SIGTERM while the workers start (here: the kernel measurement before step 1, slowed to 5 s)."""
    run = tmp_path / "run"
    proc = _start(run, byte_dataset, env=_hooked(slow="rnd1.training.build:autotune_kernels:5"))
    _wait(proc, lambda: (run / "config.toml").exists(), "the run folder written")  # start-up checks passed
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM before step 1: nothing new to save (the run resumes from step 0); exiting" in out
    assert "Traceback" not in err + out, err[-3000:]
    assert _logged(run) == [] and not (run / "checkpoint").exists()


# --------------------------------------------------------------------------- a dead rank
def _worker_with_local_rank(launcher_pid, local_rank):
    kids = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in kids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} among {kids}")


def test_a_rank_killed_with_sigkill_is_named_in_one_line(tmp_path, byte_dataset):
    run = tmp_path / "run"
    proc = _start(run, byte_dataset, **{"checkpoint.interval": 2})
    _wait(proc, lambda: CheckpointManager(run / "checkpoint").latest() is not None, "a checkpoint saved")
    os.kill(_worker_with_local_rank(proc.pid, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 3, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 of 2 lost its peer: rank 1 died"), err[-3000:]
    assert "run the same command to resume" in lines[0]
    assert "Traceback" not in out


# --------------------------------------------------------------------------- the launcher's rules
def _failures(*codes):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    return ChildFailedError("rnd1.train", {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                                                 error_file="")
                                           for rank, code in enumerate(codes)})


def test_the_launcher_stays_quiet_only_when_a_survivor_named_the_dead_rank(monkeypatch):
    from rnd1.launch import failed_on_lost_peer, stop_grace_s

    assert failed_on_lost_peer(_failures(3, -signal.SIGKILL))
    assert failed_on_lost_peer(_failures(-signal.SIGKILL, 3, 3, -signal.SIGTERM))
    assert not failed_on_lost_peer(_failures(1, -signal.SIGKILL))  # a crash: torchrun's report stays
    assert not failed_on_lost_peer(_failures(3, 1))
    monkeypatch.delenv("RND1_STOP_GRACE_S", raising=False)
    assert stop_grace_s() is None
    monkeypatch.setenv("RND1_STOP_GRACE_S", "90")
    assert stop_grace_s() == 90.0
    monkeypatch.setenv("RND1_STOP_GRACE_S", "soon")
    with pytest.raises(SystemExit, match="RND1_STOP_GRACE_S='soon': expected seconds >= 0"):
        stop_grace_s()
