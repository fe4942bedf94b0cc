"""Signals to a real torchrun process tree (run_train.sh -> rnd1.launch -> rnd1.train): one
preemption is one save and exit 0, Ctrl-C saves, kill -9 on the launcher does not leave an orphan
training on, and a run folder has one trainer at a time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnd1.checkpoint.dcp import CheckpointManager
from rnd1.training.run_lock import LOCK_NAME, RunLock, RunLockError, process_start_time

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, /proc")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _overrides(run, data, steps=100000):
    kv = {"job.dump_folder": run, "data.datasets": data, "data.prepare": "", "training.steps": steps,
          "training.local_batch_size": 2, "training.seq_len": 64, "metrics.log_freq": 1,
          "job.print_config": "false", "checkpoint.interval": 0, "eval.interval": 0, "metrics.peak_flops": 1e12}
    return [f"--{k}={v}" for k, v in kv.items()]


def _start(run, data, steps=100000):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONFIG_FILE": str(CONFIG), "NPROC": "1"}
    return subprocess.Popen([str(REPO / "run_train.sh"), *_overrides(run, data, steps)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _logged(run):
    path = run / "metrics.jsonl"
    return [json.loads(l)["step"] for l in path.read_text().splitlines()] if path.exists() else []


def _wait_for_steps(proc, run, n=3):
    deadline = time.time() + 180
    while len(_logged(run)) < n:
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1][-3000:])
        assert time.time() < deadline, "no training steps logged"
        time.sleep(0.05)


def _worker_pid(launcher_pid):
    kids = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    assert len(kids) == 1, kids
    return int(kids[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_every_process_of_the_job_saves_once_and_exits_0(tmp_path, byte_dataset, sig):
    """What Slurm/Kubernetes do with SIGTERM and a terminal with Ctrl-C: the signal reaches the
    launcher and the worker, and torchrun forwards its copy: still one graceful save, exit 0."""
    run = tmp_path / "run"
    proc = _start(run, byte_dataset)
    _wait_for_steps(proc, run)
    os.killpg(proc.pid, sig)  # the whole process group: launcher and worker together
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert "exiting now" not in out  # the forwarded copy is not a "second signal"
    assert ("Ctrl-C: finishing this step" if sig == signal.SIGINT else "received SIGTERM") in out
    assert f"launcher: {sig.name}: every worker saved and exited 0" in err
    step = CheckpointManager(run / "checkpoint").latest()[0]
    assert step == max(_logged(run)) >= 3  # the step reached, not the last interval save
    assert not (run / LOCK_NAME).exists()
    # the resume continues from that step
    proc = _start(run, byte_dataset, steps=step + 1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from" in out and f"at step {step}" in out
    assert CheckpointManager(run / "checkpoint").latest()[0] == step + 1


def test_sigterm_to_run_train_sh_exits_0_without_traceback(tmp_path, byte_dataset):
    run = tmp_path / "run"
    proc = _start(run, byte_dataset)
    _wait_for_steps(proc, run)
    proc.send_signal(signal.SIGTERM)  # run_train.sh execs the launcher: only the launcher is signalled
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert "preempted: checkpoint saved at step" in out
    assert CheckpointManager(run / "checkpoint").latest()[0] == max(_logged(run))


def test_copies_within_the_grace_window_are_one_request_a_later_signal_exits_at_once():
    """The handler in a real process: Ctrl-C plus torchrun's copy is one request; Ctrl-C again
    after the grace window exits at once (128 + SIGINT), without waiting for a save."""
    script = (
        "import os, signal, time\n"
        "from rnd1.training.preemption import GRACE_S, PreemptionHandler\n"
        "h = PreemptionHandler()\n"
        "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.1)\n"
        "print('requested', h.should_stop(), flush=True)\n"
        "time.sleep(GRACE_S + 0.5)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('still running', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[rnd1] Ctrl-C: finishing this step, then checkpoint and exit")
    assert lines[1:] == ["requested True", "[rnd1] second SIGINT: exiting now, without a checkpoint"]
    assert "Traceback" not in proc.stderr


def test_kill_9_on_the_launcher_stops_the_worker_and_releases_the_lock(tmp_path, byte_dataset):
    run = tmp_path / "run"
    proc = _start(run, byte_dataset)
    _wait_for_steps(proc, run)
    worker = _worker_pid(proc.pid)
    lock = json.loads((run / LOCK_NAME).read_text())
    assert lock["pid"] == worker and lock["start_time"] == process_start_time(worker)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 120
    while Path(f"/proc/{worker}").exists() and "Z" not in Path(f"/proc/{worker}/stat").read_text().split(")")[1][:3]:
        assert time.time() < deadline, "the orphaned worker keeps training"
        time.sleep(0.1)
    assert not (run / LOCK_NAME).exists()
    assert CheckpointManager(run / "checkpoint").latest()[0] == max(_logged(run))
    # a restart in the same folder continues from the orphan's save
    step = max(_logged(run))
    proc = _start(run, byte_dataset, steps=step + 1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"at step {step}" in out and CheckpointManager(run / "checkpoint").latest()[0] == step + 1


def test_a_second_trainer_refuses_a_folder_held_by_a_live_one(tmp_path, byte_dataset):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        run.mkdir()
        (run / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                 "start_time": process_start_time(holder.pid)}))
        proc = subprocess.run([sys.executable, "-m", "rnd1.train", "--config", str(CONFIG),
                               *_overrides(run, byte_dataset, steps=1)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [
            f"error: {run} is in use by another trainer (pid {holder.pid} on {os.uname().nodename}); stop it, or "
            f"set job.dump_folder to another folder (if that process is gone, delete {run / LOCK_NAME})"]
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing of the holder's was touched
    finally:
        holder.kill()
        holder.wait()


def test_stale_locks_are_taken_over(tmp_path):
    run = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = os.uname().nodename
    for stale in ({"pid": gone.pid, "host": host, "start_time": "1"},  # holder gone
                  {"pid": os.getpid(), "host": host, "start_time": "1"}):  # pid reused: other start time
        run.mkdir(exist_ok=True)
        (run / LOCK_NAME).write_text(json.dumps(stale))
        lock = RunLock(run).acquire()
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # while held, a second one is refused
        lock.release()
        assert not (run / LOCK_NAME).exists()
    # a lock taken in a folder that did not exist leaves no folder behind when released
    fresh = tmp_path / "fresh"
    RunLock(fresh).acquire().release()
    assert not fresh.exists()
