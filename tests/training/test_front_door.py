"""What a new user meets first: ./run_train.sh with a typo says so in one line and exits 2 (on
one process or three), a real crash keeps torchrun's report, a failed start writes no run folder,
and one flag (checkpoint.initial_load_path) turns the default config into a conversion."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from rnd1.config import load_config
from rnd1.launch import failed_on_bad_input
from rnd1.model.qwen3 import Qwen3
from rnd1.parallel.env import DistEnv
from rnd1.train import main
from rnd1.training import build as B

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def _launch(cmd, **env):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.parametrize("nproc", [1, pytest.param(3, marks=pytest.mark.multiprocess)])
def test_a_config_error_under_run_train_sh_is_one_line_and_exit_2(nproc):
    out = _launch(["./run_train.sh", "--training.stepz=3"], NPROC=str(nproc))
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        "config error: from --training.stepz: unknown key training.stepz; did you mean 'steps'?"], out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_a_misspelled_dataset_path_is_refused_not_built(tmp_path, nproc):
    """The default config builds its own dataset when it is missing; a path given alone on the
    command line (a typo of it, say) is refused in one line, on every rank, and nothing is built."""
    typo = tmp_path / "stdlib_bytee"
    out = _launch(["./run_train.sh", f"--data.datasets={typo}", f"--job.dump_folder={tmp_path / 'run'}"],
                  NPROC=str(nproc))
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        f"error: data.datasets: {typo} does not exist (no meta.json); data.prepare='stdlib' builds only the "
        f"datasets its config names: fix the path, or give --data.prepare=SOURCE too to build it there"], out.stderr
    assert not typo.exists() and not (tmp_path / "run").exists()
    assert "[job]" not in out.stdout  # the config is printed once the checks pass, not before a refusal


def test_a_crash_keeps_torchruns_report():
    out = _launch([sys.executable, "-m", "rnd1.launch", "--standalone", "--nproc_per_node=1",
                   "-m", "rnd1.no_such_module"])
    assert out.returncode == 1
    assert "No module named rnd1.no_such_module" in out.stderr
    assert "ChildFailedError" in out.stderr and "failed (exitcode: 1)" in out.stderr


def _failures(*codes):
    return ChildFailedError("rnd1.train", {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                                                 error_file="")
                                           for rank, code in enumerate(codes)})


def test_only_bad_input_and_torchruns_own_stops_count_as_bad_input():
    assert failed_on_bad_input(_failures(2, 2, 2))
    assert failed_on_bad_input(_failures(2, -signal.SIGTERM, -signal.SIGKILL))
    assert not failed_on_bad_input(_failures(2, 1))  # another rank crashed
    assert not failed_on_bad_input(_failures(2, -signal.SIGSEGV))
    assert not failed_on_bad_input(_failures(-signal.SIGTERM))


def test_a_failed_start_writes_no_run_folder(tmp_path, byte_dataset, capsys):
    base = ["--config", str(CONFIG), f"--job.dump_folder={tmp_path / 'run'}", "--job.print_config=false",
            "--data.prepare=", "--metrics.peak_flops=1e12"]
    assert main(base + [f"--data.datasets=['{tmp_path / 'nope'}']"]) == 2
    assert main(base + [f"--data.datasets=['{byte_dataset}']", "--training.global_batch_tokens=1000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "not a multiple" in err[1]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- model.init
def _build(tmp_path, *overrides):
    cfg = load_config(CONFIG, [f"--job.dump_folder={tmp_path / 'run'}", *overrides])
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    mcfg = B.build_model_config(cfg, B.build_tokenizer(cfg))
    return cfg, mcfg, lambda: B.build_and_load_model(cfg, mcfg, B.build_parallel_dims(cfg, env), env)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_default_config_loads_weights_given_only_the_path(tmp_path):
    from rnd1.checkpoint.hf import save_pretrained

    _, mcfg, _ = _build(tmp_path)
    source = Qwen3(mcfg)
    source.init_weights(seed=1234)
    save_pretrained(source, tmp_path / "hf")
    cfg, _, build = _build(tmp_path, f"--checkpoint.initial_load_path={tmp_path / 'hf'}")
    assert cfg.model.init == "auto"
    assert _same_weights(build(), source)
    # without the path the same config starts from its seeded random init
    cfg, _, build = _build(tmp_path)
    reference = Qwen3(mcfg)
    reference.init_weights(seed=cfg.training.seed)
    assert _same_weights(build(), reference)


def test_an_explicit_init_that_contradicts_the_path_is_refused(tmp_path):
    *_, build = _build(tmp_path, "--model.init=random", "--checkpoint.initial_load_path=/some/dir")
    with pytest.raises(B.StartupError, match="model.init='random' but checkpoint.initial_load_path='/some/dir'"):
        build()
    *_, build = _build(tmp_path, "--model.init=pretrained")
    with pytest.raises(B.StartupError, match="model.init='pretrained' needs checkpoint.initial_load_path"):
        build()
