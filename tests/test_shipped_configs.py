"""Every TOML file under train_configs/ (recipes included) starts and trains: shrunk only in size
(rnd1/tools/rehearsal.py), through run_train.sh -> torchrun -> rnd1.train, with its parallelism
(scaled to at most 4 CPU processes), compile, activation checkpointing, mixed precision,
objective, recipe and schedule. Its loss curve must equal a 1-process eager run of the same
shrunken config up to float noise. A new config file is picked up by the glob, so no config
ships unstarted."""

import math
from pathlib import Path

import pytest

from rnd1.config import load_config
from rnd1.tools import rehearsal

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "train_configs").rglob("*.toml"))


def test_every_config_file_is_collected():
    names = {p.relative_to(REPO / "train_configs").as_posix() for p in CONFIGS}
    assert {"debug_model.toml", "qwen3_30b_a3b_rnd1.toml", "recipes/retention_setting4_30b.toml"} <= names


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    return {p: rehearsal.write_tiny_pretrained(p, root / p) for p in rehearsal.DEBUG_PRESETS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(REPO / "train_configs").as_posix())
def test_shipped_config_rehearsal(config, tmp_path, byte_dataset, tiny_pretrained):
    r = rehearsal.plan(config, data=byte_dataset, pretrained=tiny_pretrained, out=tmp_path)
    got = rehearsal.run(config, r.nproc, r.overrides)
    assert got.returncode == 0, f"{config.name} on {r.nproc} processes:\n{got.output[-4000:]}"
    assert all(math.isfinite(x) for x in got.losses)
    run_dir, settings = Path(r.overrides["job.dump_folder"]), load_config(config)
    if settings.checkpoint.enable:
        assert any((run_dir / "checkpoint").glob("step-*")), "no checkpoint written"
    if settings.checkpoint.export_hf_at_end:
        assert (run_dir / "hf_export" / "config.json").is_file(), "no Hugging Face export written"
    ref = rehearsal.run(config, 1, r.reference_overrides)
    assert ref.returncode == 0, f"{config.name} reference (1 process, eager):\n{ref.output[-4000:]}"
    why = rehearsal.compare(got.losses, ref.losses, r.rel_tol)
    assert why is None, f"{config.name}: {why}"

