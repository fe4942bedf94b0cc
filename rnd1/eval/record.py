"""What an evaluation result was measured with, recorded next to the numbers.

Diffusion-LM evaluations are notorious for not reproducing (the same GSM8K run scoring 77.5 on
one GPU and 72.8 on another; sampler settings left out of papers), so every result this project
writes (``scripts/eval_task.py``, ``scripts/bench_sampler.py``, ``scripts/eval.py``) carries a
``record``: the sampler settings, the seeds, a hash of the model's weights (``model_hash``: the
tensors themselves, so the same weights hash alike whether read from a DCP checkpoint or a
Hugging Face export), the package versions and the device. Two results with equal records are
comparable; the same command on the same machine gives the same numbers (tested).
"""

from __future__ import annotations

import hashlib
import platform
import sys
from importlib import metadata

import torch

PACKAGES = ("torch", "triton", "transformers", "lm_eval", "numpy", "tiktoken")


def model_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (name, dtype, shape, bytes; in name order),
    first 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-") if name == "lm_eval" else name)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_description(device: "str | torch.device" = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    from rnd1.kernels.cpu import cpu_info

    return f"CPU: {cpu_info().summary()}, {torch.get_num_threads()} threads"


def evaluation_record(*, model: torch.nn.Module, checkpoint: str, sampler: dict, seeds: dict,
                      command: list[str] | None = None, device: "str | torch.device" = "cpu") -> dict:
    """The record that goes next to an evaluation's numbers (see the module docstring)."""
    return {"checkpoint": str(checkpoint), "model_hash": model_hash(model), "sampler": dict(sampler),
            "seeds": dict(seeds), "packages": package_versions(), "device": device_description(device),
            "command": list(command if command is not None else sys.argv)}
