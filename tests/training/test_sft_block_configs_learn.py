"""The two new debug configs learn: diffusion SFT on the shipped chat data and block diffusion
(with its block-size warm-up) each train with a clearly falling loss, started the way a user
starts them (run_train.sh -> torchrun -> rnd1.train), shortened only in steps."""

import json
from pathlib import Path

import pytest

from rnd1.tools import rehearsal

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in sorted((r for r in recs if "loss" in r), key=lambda r: r["step"])]


def _run(config: str, overrides: dict) -> list[float]:
    got = rehearsal.run(REPO / "train_configs" / config, 1, {"job.print_config": False, "metrics.log_freq": 1,
                                                              "checkpoint.interval": 0, **overrides})
    assert got.returncode == 0, got.output[-4000:]
    return _losses(Path(overrides["job.dump_folder"]))


def test_debug_sft_loss_falls(tmp_path):
    losses = _run("debug_sft.toml", {"job.dump_folder": str(tmp_path / "run"), "training.steps": 60,
                                     "eval.interval": 0, "data.datasets": f'["{tmp_path / "chat"}"]',
                                     "data.prepare": "chat:data/arith_chat.jsonl"})
    assert len(losses) == 60
    first, last = losses[0], sum(losses[-10:]) / 10
    assert first > 5.0  # an untrained model on bytes: about log 258 per response token
    assert last < 0.35 * first, (first, last)  # the response format is learned


def test_debug_block_loss_falls_through_the_warm_up(tmp_path, byte_dataset):
    losses = _run("debug_block.toml", {"job.dump_folder": str(tmp_path / "run"), "training.steps": 60,
                                       "eval.interval": 0, "data.datasets": f'["{byte_dataset}"]',
                                       "data.prepare": ""})
    assert len(losses) == 60  # blocks of 1 -> 4 -> 16 on the way (the schedule is in tokens)
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last < 0.65 * first, (first, last)
