"""Reading run folders: the metrics.jsonl the trainer writes, as columns keyed by token count."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunLog:
    name: str
    train: list[dict] = field(default_factory=list)  # records with "loss"
    val: list[dict] = field(default_factory=list)  # records with "val_loss" (an RL run: "val_accuracy")

    def series(self, key: str, which: str = "train", x: str = "tokens") -> tuple[list[float], list[float]]:
        """(x, key) of every record that has both: against tokens, or ``x="step"``."""
        rows = self.train if which == "train" else self.val
        pts = [(r[x], r[key]) for r in rows if key in r and x in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def is_rl(self) -> bool:
        """Written by an RL run (rnd1/rl/trainer.py): its steps log rewards."""
        return any("reward_mean" in r for r in self.train)

    def final(self, key: str, which: str = "train") -> float | None:
        xs, ys = self.series(key, which)
        return ys[-1] if ys else None


def read_run(folder: str | Path, name: str | None = None) -> RunLog:
    folder = Path(folder)
    path = folder / "metrics.jsonl" if folder.is_dir() else folder
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is this a run folder written by rnd1.train?)")
    log = RunLog(name or (folder.name if folder.is_dir() else folder.parent.name))
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
            if "val_loss" in rec or "val_accuracy" in rec:
                log.val.append(rec)
            elif "loss" in rec:
                log.train.append(rec)
    # a resumed run appends: keep the last record for each step
    log.train = list({r["step"]: r for r in log.train}.values())
    log.val = list({r["step"]: r for r in log.val}.values())
    return log
