"""Run by torchrun (or plainly) from tests/parallel/test_layout_invariance.py: a real Trainer
built from config overrides, observed from outside.

``worker_trainer.py aux_grads OUT --config ... [--k=v ...]``: one training step's MoE aux-loss
gradient (the step with the aux coefficient 1 minus the same step with 0, optimiser frozen),
saved by rank 0 as {param name: full gradient} to OUT.

``worker_trainer.py data_order OUT_DIR --config ... [--k=v ...]``: trains normally, recording
for every micro-batch the step, global sample ids and a hash of each token window; each rank
writes OUT_DIR/rank<R>.json.
"""

import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch

from rnd1.config import parse_args, validate
from rnd1.parallel.env import destroy, init_distributed
from rnd1.train import Trainer

warnings.simplefilter("ignore")


def _clean(name: str) -> str:
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def _full_grads(model) -> dict:
    """Collective under FSDP/EP (every rank calls it, same order): gradients as full tensors."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[_clean(name)] = g.detach().clone().float()
    return out


def aux_grads(trainer: Trainer, out: Path) -> None:
    opt = trainer.optimizer
    opt.step = lambda *a, **k: None  # parameters stay put: both steps see the same model
    seen, zero_grad = {}, opt.zero_grad

    def snapshot(*a, **k):
        seen.clear()
        seen.update(_full_grads(trainer.model))
        zero_grad(*a, **k)

    opt.zero_grad = snapshot
    start = trainer.train_loader.state_dict()
    trainer.cfg.objective.moe_aux_loss_coef = 1.0
    trainer.train_step()
    with_aux = dict(seen)
    trainer.train_loader.load_state_dict(start)  # the same global batch again
    trainer.cfg.objective.moe_aux_loss_coef = 0.0
    trainer.train_step()
    if trainer.env.is_rank0:
        torch.save({n: with_aux[n] - seen[n] for n in with_aux}, out)


class _Recorder:
    """The trainer's loader, logging what every micro-batch holds."""

    def __init__(self, loader, trainer, log: list):
        self._loader, self._trainer, self._log = loader, trainer, log

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self._loader)
        rows = [hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in b["input_ids"]]
        self._log.append({"step": self._trainer.step + 1, "samples": dict(zip(b["sample_ids"].tolist(), rows))})
        return b

    def __getattr__(self, name):  # state_dict / load_state_dict for checkpoints
        return getattr(self._loader, name)


def data_order(trainer: Trainer, out_dir: Path) -> None:
    log = []
    trainer.train_loader = _Recorder(trainer.train_loader, trainer, log)
    trainer.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{trainer.env.rank}.json").write_text(json.dumps(log))


def main():
    mode, out, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    cfg = parse_args(argv)
    env = init_distributed(cfg.training.device)
    validate(cfg, env.world_size)
    try:
        trainer = Trainer(cfg, env)
        {"aux_grads": aux_grads, "data_order": data_order}[mode](trainer, out)
    finally:
        destroy()


if __name__ == "__main__":
    main()
