#!/usr/bin/env python
"""Fault drill: kill a training run with SIGKILL at random moments and in every phase of a
checkpoint save, resume it each time, and check that the final weights and the loss log equal an
uninterrupted run's, bit for bit.

    python scripts/fault_drill.py --kills 5 --steps 60          # about a minute on 2 CPU cores

After the kills come the scheduler's faults and one cluster fault:

- a stop signal to every process of the job, launcher included, as Slurm and Kubernetes send it:
  SIGTERM, SIGUSR1 (Slurm's usual ``--signal``) and SIGHUP, each with every checkpoint save slowed
  to ``--slow-save`` seconds and torchrun's close timeout set to 1 s, so the save outlasts the
  timeout torchrun would SIGKILL at (30 s by default; a 30B-A3B save takes minutes). Expected:
  one save at the step reached, exit 0;
- SIGTERM during start-up, after "resumed from" and before the next step (start-up slowed by the
  same hook): exit 0, nothing new to save;
- silent corruption of the newest checkpoint (the resume must detect it, set it aside and fall
  back to an intact one).

``--dead-rank`` adds a two-process drill: rank 1 is SIGKILLed mid-run (one line naming it, exit
3), the run is resumed, and its weights and loss log must equal an uninterrupted two-process run's.

A save has three phases a kill can interrupt (``SAVE_PHASES``): ``writing`` (the ``.step-*.tmp``
folder holds DCP's shards, not yet this rank's extra state, manifest or COMPLETE marker),
``sealing`` (COMPLETE written, the folder not yet renamed) and ``publishing`` (renamed, ``latest``
not yet updated). The trainer runs under a hook (``HOOK``) that, in the phase the drill asks for,
writes a marker file and stops itself (SIGSTOP); the drill then SIGKILLs it — so a kill counted
"during a save" provably landed inside that phase of this process's save (a stale temp folder
from an earlier kill counts for nothing). The first kills go one to each phase; the rest are
random: a phase, or a kill once the loss log reaches a random step.

Prints the kills survived, per save phase, and any difference; exits 1 if anything differs."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAVE_PHASES = ("writing", "sealing", "publishing")
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
FAULT_HOOKS = REPO / "scripts" / "fault_hooks"  # sitecustomize: RND1_FAULT_SLOW slows named functions

# Run rnd1.train with a stop in one phase of a checkpoint save: RND1_DRILL_PHASE names the phase,
# RND1_DRILL_SKIP how many saves to let through first, RND1_DRILL_MARK the file written (with the
# phase) just before the process stops itself for the drill's SIGKILL.
HOOK = r"""
import os, re, signal, runpy, torch
phase, mark = os.environ.get("RND1_DRILL_PHASE", ""), os.environ.get("RND1_DRILL_MARK", "")
left = [int(os.environ.get("RND1_DRILL_SKIP", "0"))]
TMP = re.compile(r"^\.step-\d+\.tmp$")

def _hit(name):
    if phase != name:
        return
    if left[0] > 0:
        left[0] -= 1
        return
    with open(mark + ".w", "w") as f:
        f.write(name)
    _replace(mark + ".w", mark)  # the marker appears whole
    os.kill(os.getpid(), signal.SIGSTOP)

_save, _replace = torch.save, os.replace
def save(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)) and TMP.match(os.path.basename(os.path.dirname(os.fspath(f)))):
        _hit("writing")
    return _save(obj, f, *a, **k)
def replace(src, dst, *a, **k):
    if TMP.match(os.path.basename(os.fspath(src))):
        _hit("sealing")
    elif os.path.basename(os.fspath(dst)) == "latest":
        _hit("publishing")
    return _replace(src, dst, *a, **k)
torch.save, os.replace = save, replace
runpy.run_module("rnd1.train", run_name="__main__", alter_sys=True)
"""


def train_cmd(run_dir: Path, data: Path, steps: int, interval: int, hooked: bool = False) -> list[str]:
    head = [sys.executable, "-c", HOOK] if hooked else [sys.executable, "-m", "rnd1.train"]
    return head + ["--config", str(REPO / "train_configs" / "debug_model.toml"),
            f"--job.dump_folder={run_dir}", f"--data.datasets={data}", "--data.prepare=", f"--training.steps={steps}",
            "--training.local_batch_size=4", "--training.seq_len=64", "--metrics.log_freq=1",
            "--job.print_config=false", f"--checkpoint.interval={interval}", "--checkpoint.keep_latest_k=2",
            "--eval.interval=0", "--metrics.peak_flops=1e12"]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in open(run_dir / "metrics.jsonl"):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a resumed run re-logs re-done steps: keep the last
    return out


def _safe_losses(run_dir: Path) -> dict[int, float]:
    """losses() of a log another process may be writing (a torn last line is skipped)."""
    out = {}
    for line in open(run_dir / "metrics.jsonl"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from rnd1.checkpoint.dcp import load_model_weights
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    model = build_model(get_preset("debug"), seed=12345)
    load_model_weights(model, run_dir / "checkpoint")
    return {k: v.clone() for k, v in model.state_dict().items()}


def launcher_cmd(run_dir: Path, data: Path, steps: int, interval: int, nproc: int = 1) -> list[str]:
    """The trainer under rnd1.launch (torchrun), as run_train.sh starts it."""
    cmd = train_cmd(run_dir, data, steps, interval)
    if nproc > 1:  # the two-process layout: EP 2
        cmd = [c.replace("debug_model.toml", "debug_model_ep.toml") for c in cmd]
    return [sys.executable, "-m", "rnd1.launch", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"] + cmd[1:]


def _hooked(env: dict, slow: str) -> dict:
    """``env`` with the fault hooks on the path and ``slow`` (module:function:seconds) slowed."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(FAULT_HOOKS), env.get("PYTHONPATH", "")]),
            "RND1_FAULT_SLOW": slow}


def scheduler_signal(run_dir: Path, data: Path, steps: int, interval: int, rng: random.Random, env: dict,
                     sig: signal.Signals = signal.SIGTERM, slow_save_s: float = 3.0, log=print) -> dict | None:
    """A scheduler preemption: ``sig`` to every process of the job (launcher and worker, as Slurm
    and Kubernetes send it) once the run is past a random step, every save slowed to
    ``slow_save_s`` and torchrun's close timeout set to 1 s. Expected: one graceful save at the
    step reached, exit 0."""
    done = max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
    if done >= steps - 2:
        log(f"scheduler {sig.name}: skipped (the run is nearly finished)")
        return None
    target = rng.randint(done + 1, min(done + 3, steps - 2))
    env = {**_hooked(env, f"rnd1.checkpoint.dcp:CheckpointManager.save:{slow_save_s}"),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"}
    proc = subprocess.Popen(launcher_cmd(run_dir, data, steps, interval), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    while proc.poll() is None and not ((run_dir / "metrics.jsonl").exists()
                                       and max(_safe_losses(run_dir), default=0) >= target):
        time.sleep(0.005)
    if proc.poll() is not None:
        log(f"scheduler {sig.name}: the run ended before it ({proc.returncode})")
        return None
    os.killpg(proc.pid, sig)  # every process of the tree
    _, err = proc.communicate(timeout=300)
    from rnd1.checkpoint.dcp import CheckpointManager

    latest = CheckpointManager(run_dir / "checkpoint", 0).latest()
    reached = max(_safe_losses(run_dir), default=0)
    res = {"signal": sig.name, "exit": proc.returncode, "saved_step": latest[0] if latest else None,
           "step_reached": reached, "traceback": "Traceback" in err}
    log(f"scheduler {sig.name} to the whole job after step {reached} (saves take {slow_save_s:g} s, torchrun's "
        f"close timeout 1 s): exit {proc.returncode}, checkpoint at step {res['saved_step']}"
        f"{', TRACEBACK' if res['traceback'] else ''}")
    return res


def signal_before_first_step(run_dir: Path, data: Path, steps: int, interval: int, env: dict, log=print) -> dict:
    """SIGTERM to the whole job after the worker printed "resumed from" and before its next step
    (the start-up kernel measurement slowed to 3 s). Expected: exit 0, nothing new saved."""
    from rnd1.checkpoint.dcp import CheckpointManager

    before = CheckpointManager(run_dir / "checkpoint", 0).latest()
    proc = subprocess.Popen(launcher_cmd(run_dir, data, steps, interval), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=_hooked(env, "rnd1.training.build:autotune_kernels:3"))
    out = []
    for line in proc.stdout:
        out.append(line)
        if "resumed from" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=300)
    text = "".join(out) + rest
    after = CheckpointManager(run_dir / "checkpoint", 0).latest()
    res = {"exit": proc.returncode, "said": "nothing new to save" in text, "checkpoint_unchanged": before == after,
           "traceback": "Traceback" in err + text}
    log(f"SIGTERM before the first step: exit {proc.returncode}, "
        f"{'said nothing new to save' if res['said'] else 'did NOT say so'}, checkpoint "
        f"{'unchanged' if res['checkpoint_unchanged'] else 'CHANGED'}")
    return res


def dead_rank(steps: int, interval: int, data: Path, work: Path, env: dict, log=print) -> dict:
    """Two processes: SIGKILL rank 1 mid-run (expected: one line naming it, exit 3), resume, and
    compare with an uninterrupted two-process run, bit for bit."""
    ref, run = work / "reference_2proc", work / "drilled_2proc"
    subprocess.run(launcher_cmd(ref, data, steps, interval, nproc=2), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(launcher_cmd(run, data, steps, interval, nproc=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    while proc.poll() is None and not ((run / "metrics.jsonl").exists()
                                       and max(_safe_losses(run), default=0) >= steps // 2):
        time.sleep(0.005)
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    victim = next(int(p) for p in kids if b"LOCAL_RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"))
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    one_line = len(lines) == 1 and "rank 1 died" in lines[0]
    log(f"dead rank: SIGKILL to rank 1 after step {max(_safe_losses(run), default=0)}: exit {proc.returncode}, "
        f"{'one line: ' + lines[0][:90] if one_line else f'{len(lines)} lines'}")
    subprocess.run(launcher_cmd(run, data, steps, interval, nproc=2), check=True, capture_output=True, env=env)
    a, b = losses(ref), losses(run)
    wa = _weights_of(ref, "debug")
    wb = _weights_of(run, "debug")
    return {"exit": proc.returncode, "one_line": one_line,
            "loss_steps_differing": [s for s in a if a.get(s) != b.get(s)] + [s for s in b if s not in a],
            "weights_differing": [k for k in wa if not torch.equal(wa[k], wb[k])]}


def _weights_of(run_dir: Path, preset: str) -> dict[str, torch.Tensor]:
    from rnd1.checkpoint.dcp import load_model_weights
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    model = build_model(get_preset(preset), seed=12345)
    load_model_weights(model, run_dir / "checkpoint")
    return {k: v.clone() for k, v in model.state_dict().items()}


def corrupt_newest_checkpoint(run_dir: Path, log=print) -> str | None:
    """Silently change bytes in the newest checkpoint's largest shard: the resume must detect
    it (checksums), set the checkpoint aside and fall back to an intact one."""
    from rnd1.checkpoint.dcp import CheckpointManager

    ckpts = CheckpointManager(run_dir / "checkpoint", 0).complete_checkpoints()
    if len(ckpts) < 2:
        log("corruption: skipped (fewer than two checkpoints to fall back between)")
        return None
    step, path = ckpts[-1]
    shard = max((p for p in path.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])  # 1,024 floats changed
    shard.write_bytes(bytes(data))
    log(f"corruption: changed 4,096 bytes of {shard.relative_to(run_dir)} (newest checkpoint, step {step})")
    return str(shard.relative_to(run_dir))


def drill(kills: int, steps: int, interval: int, seed: int, work: Path, log=print, slow_save_s: float = 3.0,
          with_dead_rank: bool = False) -> dict:
    from rnd1.data.prepare import prepare

    data = prepare(["stdlib"], "byte", work / "data", val_fraction=0.05, workers=1, max_docs=200, quiet=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_dir = work / "reference"
    t0 = time.time()
    subprocess.run(train_cmd(ref_dir, data, steps, interval), check=True, capture_output=True, env=env)
    ref_time = time.time() - t0
    log(f"uninterrupted run: {steps} steps in {ref_time:.1f}s")

    rng = random.Random(seed)
    run_dir = work / "drilled"
    mark = work / "drill_phase"
    survived = 0
    phases = {ph: 0 for ph in SAVE_PHASES}
    for k in range(kills):
        done = max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
        if done >= steps - 1:
            break
        # one kill in each save phase first, then a random mix of phases and mid-training kills
        phase = SAVE_PHASES[k] if k < len(SAVE_PHASES) else rng.choice(SAVE_PHASES + ("step",))
        target = rng.randint(done + 1, max(done + 1, steps // 2))  # the second half is the scheduler cases'
        mark.unlink(missing_ok=True)
        proc = subprocess.Popen(train_cmd(run_dir, data, steps, interval, hooked=True), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                env={**env, "RND1_DRILL_PHASE": "" if phase == "step" else phase,
                                     "RND1_DRILL_MARK": str(mark), "RND1_DRILL_SKIP": str(rng.randint(0, 1))})
        while proc.poll() is None:
            if phase != "step" and mark.exists():
                break
            if phase == "step" and (run_dir / "metrics.jsonl").exists() and \
                    max(_safe_losses(run_dir), default=0) >= target:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            survived += 1
            landed = mark.read_text() if phase != "step" and mark.exists() else None
            if landed:
                phases[landed] += 1
            log(f"kill {k + 1}: SIGKILL after step {max(_safe_losses(run_dir), default=0)}"
                f"{f' in the {landed!r} phase of a checkpoint save' if landed else ''}")
        else:
            log(f"kill {k + 1}: the run finished before the kill ({phase})")
    scheduler = [r for sig in SCHEDULER_SIGNALS
                 if (r := scheduler_signal(run_dir, data, steps, interval, rng, env, sig, slow_save_s, log))]
    early = signal_before_first_step(run_dir, data, steps, interval, env, log)
    corrupted = corrupt_newest_checkpoint(run_dir, log)
    final = subprocess.run(train_cmd(run_dir, data, steps, interval), capture_output=True, text=True, env=env)
    if final.returncode:
        raise RuntimeError(f"the final resume failed ({final.returncode}):\n{final.stderr[-2000:]}")
    set_aside = sorted(p.name for p in (run_dir / "checkpoint").glob("*.damaged"))
    if corrupted:
        log(f"final resume set aside {', '.join(set_aside) or 'nothing'} and fell back to an intact checkpoint")
    a, b = losses(ref_dir), losses(run_dir)
    loss_diffs = [s for s in a if a.get(s) != b.get(s)] + [s for s in b if s not in a]
    wa, wb = final_weights(ref_dir), final_weights(run_dir)
    weight_diffs = [k for k in wa if not torch.equal(wa[k], wb[k])]
    dead = dead_rank(steps, interval, data, work, env, log) if with_dead_rank else None
    return {"kills": survived, "during_save": sum(phases.values()), "save_phases": phases,
            "scheduler_signals": scheduler, "before_first_step": early, "dead_rank": dead,
            "corrupted": corrupted, "set_aside": set_aside,
            "loss_steps_differing": loss_diffs,
            "weights_differing": weight_diffs, "steps": len(b)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interval", type=int, default=5, help="checkpoint interval (steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    ap.add_argument("--slow-save", type=float, default=3.0, help="seconds every save takes in the scheduler cases")
    ap.add_argument("--dead-rank", action="store_true", help="also the two-process dead-rank drill")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = drill(args.kills, args.steps, args.interval, args.seed, Path(args.work or tmp),
                    slow_save_s=args.slow_save, with_dead_rank=args.dead_rank)
    per_phase = ", ".join(f"{n} {ph}" for ph, n in res["save_phases"].items())
    print(f"kills survived: {res['kills']} ({res['during_save']} during a checkpoint save: {per_phase}); "
          f"loss log: {res['steps']} steps, {len(res['loss_steps_differing'])} differ; "
          f"final weights: {len(res['weights_differing'])} tensors differ")
    for sched in res["scheduler_signals"]:
        if sched["exit"] != 0 or sched["traceback"] or sched["saved_step"] != sched["step_reached"]:
            print(f"SCHEDULER {sched['signal']}: expected one save at the step reached and exit 0, got {sched}")
            return 1
    early = res["before_first_step"]
    if early["exit"] != 0 or not early["said"] or not early["checkpoint_unchanged"] or early["traceback"]:
        print(f"SIGNAL BEFORE THE FIRST STEP: expected exit 0, nothing saved, said so; got {early}")
        return 1
    dead = res["dead_rank"]
    if dead is not None and (dead["exit"] != 3 or not dead["one_line"] or dead["loss_steps_differing"]
                             or dead["weights_differing"]):
        print(f"DEAD RANK: expected one line, exit 3 and a bit-exact resume; got {dead}")
        return 1
    if res["corrupted"] and not res["set_aside"]:
        print(f"CORRUPTION of {res['corrupted']} was not detected")
        return 1
    if res["loss_steps_differing"] or res["weights_differing"]:
        print(f"DIFFERENCES: steps {res['loss_steps_differing'][:10]}, tensors {res['weights_differing'][:10]}")
        return 1
    missed = [ph for ph, n in res["save_phases"].items() if not n]
    if missed:
        print(f"no kill landed in save phase(s) {', '.join(missed)} (use --kills >= {len(SAVE_PHASES)})")
        return 1
    print("bit-identical to the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
