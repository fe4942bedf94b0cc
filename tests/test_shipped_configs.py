"""Every TOML file under train_configs/ (recipes included) starts and trains: shrunk only in size
(rnd1/tools/rehearsal.py), through run_train.sh -> torchrun -> rnd1.train, with its parallelism,
compile, activation checkpointing, mixed precision, objective, recipe and schedule. Its loss curve
must equal a 1-process eager run of the same shrunken config up to float noise. A new config file
is picked up by the glob, so no config ships unstarted.

Layouts (OMP_NUM_THREADS=1 per process): the 30B-A3B config runs at its real EP degree, EP 8 on 8
processes (one expert of the tiny preset per rank), and at EP 4 x FSDP 2 on 8 processes, both
compared with one shared 1-process reference. Every other config runs at the rehearsal's default
layout when that needs at most 4 processes (debug configs on their EP ranks, the 4B configs FSDP
on 2); the recipes derived from the 30B config (EP 8 too) run at EP 2 x FSDP 2 on 4 processes, as
8 processes each would add ~25 s per recipe (~2.5 min for the six) to CI on 2 cores."""

import math
from pathlib import Path

import pytest

from rnd1.config import load_config
from rnd1.tools import rehearsal

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "train_configs").rglob("*.toml"))
MAIN_30B = REPO / "train_configs" / "qwen3_30b_a3b_rnd1.toml"
SUITE_MAX_PROCS = 4  # per-config rehearsals above this run at SMALL_LAYOUT here
SMALL_LAYOUT = {"ep": 2, "nproc": 4}  # EP 2 x FSDP 2


def _name(p: Path) -> str:
    return p.relative_to(REPO / "train_configs").as_posix()


def test_every_config_file_is_collected():
    names = {_name(p) for p in CONFIGS}
    assert {"debug_model.toml", "qwen3_30b_a3b_rnd1.toml", "recipes/retention_setting4_30b.toml"} <= names


def test_compare_rejects_a_curve_outside_the_tolerance():
    """What makes the rehearsals below fail: one step off by more than rel_tol, a non-finite loss
    or a missing step."""
    ref = [6.50, 6.33, 5.91, 5.58]
    assert rehearsal.compare([x * (1 + 2.5e-2) for x in ref], ref, 3e-2) is None
    assert "differ" in rehearsal.compare(ref[:3] + [ref[3] * (1 + 3.5e-2)], ref, 3e-2)
    assert "non-finite" in rehearsal.compare(ref[:3] + [math.nan], ref, 3e-2)
    assert "expected 4" in rehearsal.compare(ref[:3], ref, 3e-2)


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    return {p: rehearsal.write_tiny_pretrained(p, root / p) for p in rehearsal.DEBUG_PRESETS}


def _train(config: Path, r: rehearsal.Rehearsal) -> list[float]:
    """The rehearsal's run on ``r.nproc`` processes: it exits 0, logs finite losses and writes the
    checkpoints and export its config asks for."""
    ep = r.overrides["parallelism.expert_parallel_degree"]
    got = rehearsal.run(config, r.nproc, r.overrides)
    assert got.returncode == 0, f"{config.name} on {r.nproc} processes (EP {ep}):\n{got.output[-4000:]}"
    assert all(math.isfinite(x) for x in got.losses)
    run_dir, settings = Path(r.overrides["job.dump_folder"]), load_config(config)
    if settings.checkpoint.enable:
        assert any((run_dir / "checkpoint").glob("step-*")), "no checkpoint written"
    if settings.checkpoint.export_hf_at_end:
        assert (run_dir / "hf_export" / "config.json").is_file(), "no Hugging Face export written"
    return got.losses


def _suite_layout(config: Path) -> dict:
    return {} if rehearsal.layout(config)[1] <= SUITE_MAX_PROCS else SMALL_LAYOUT


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != MAIN_30B], ids=_name)
def test_shipped_config_rehearsal(config, tmp_path, byte_dataset, tiny_pretrained):
    r = rehearsal.plan(config, data=byte_dataset, pretrained=tiny_pretrained, out=tmp_path, **_suite_layout(config))
    losses = _train(config, r)
    if load_config(config).rl.enable:  # sampled rollouts are not compared (rnd1/tools/rehearsal.py: RL)
        why = rehearsal.check_rl_metrics(Path(r.overrides["job.dump_folder"]))
        assert why is None, f"{config.name} on {r.nproc} processes: {why}"
        return
    ref = rehearsal.run(config, 1, r.reference_overrides)
    assert ref.returncode == 0, f"{config.name} reference (1 process, eager):\n{ref.output[-4000:]}"
    why = rehearsal.compare(losses, ref.losses, r.rel_tol)
    assert why is None, f"{config.name} on {r.nproc} processes: {why}"


@pytest.fixture(scope="module")
def reference_30b(tmp_path_factory, byte_dataset, tiny_pretrained):
    """The 1-process eager run both 8-process layouts of the 30B config are compared with (same
    global batch of 8 ranks x 2 x 2 accumulation, so one run serves both)."""
    r = rehearsal.plan(MAIN_30B, data=byte_dataset, pretrained=tiny_pretrained,
                       out=tmp_path_factory.mktemp("reference_30b"), nproc=8)
    ref = rehearsal.run(MAIN_30B, 1, r.reference_overrides)
    assert ref.returncode == 0, f"{MAIN_30B.name} reference (1 process, eager):\n{ref.output[-4000:]}"
    return r.reference_overrides, ref.losses


@pytest.mark.parametrize("ep", [8, 4], ids=["ep8", "ep4_fsdp2"])
def test_30b_a3b_rehearsal_at_the_real_expert_parallel_degree(ep, tmp_path, byte_dataset, tiny_pretrained,
                                                             reference_30b):
    """EP 8 on 8 processes (the config's own degree, the rehearsal's default) and EP 4 x FSDP 2 on 8
    processes: each equals the 1-process run within the rehearsal's tolerance."""
    assert load_config(MAIN_30B).parallelism.expert_parallel_degree == 8
    assert rehearsal.layout(MAIN_30B) == (8, 8)
    r = rehearsal.plan(MAIN_30B, data=byte_dataset, pretrained=tiny_pretrained, out=tmp_path, nproc=8, ep=ep)
    assert (r.nproc, r.overrides["parallelism.expert_parallel_degree"]) == (8, ep)
    ref_overrides, ref_losses = reference_30b
    same = ("job.dump_folder",)
    assert {k: v for k, v in r.reference_overrides.items() if k not in same} == \
        {k: v for k, v in ref_overrides.items() if k not in same}, "the shared reference is another run"
    losses = _train(MAIN_30B, r)
    why = rehearsal.compare(losses, ref_losses, r.rel_tol)
    assert why is None, f"{MAIN_30B.name} at EP {ep} on 8 processes: {why}"
