"""A trained model for inference (sampling, scoring, evaluation), from either kind of checkpoint:
a trainer's DCP checkpoint (which records its model config and objective) or a Hugging Face
folder. The attention mode comes from the objective the model is read with."""

from __future__ import annotations

from pathlib import Path

from rnd1.diffusion.objective import OBJECTIVES, Objective, get_objective


def recorded_objective(checkpoint: str | Path, default: str = "a2d", *, block_size: int = 0) -> Objective:
    """The objective a checkpoint was trained with: a trainer checkpoint's record, or the ``rnd1``
    block of an exported folder's config.json (``default`` when neither says). A block-diffusion
    model comes back with its block size: it was trained with that block-causal attention, and
    sampling or scoring it with another would read a model it never was. ``block_size`` stands in
    for a block model whose checkpoint records none, and must agree with one that does."""
    import json

    from rnd1.checkpoint.dcp import checkpoint_info, is_dcp_checkpoint

    if is_dcp_checkpoint(checkpoint):
        info = checkpoint_info(checkpoint)
    else:
        cfg_file = Path(checkpoint) / "config.json"
        info = (json.loads(cfg_file.read_text()).get("rnd1") or {}) if cfg_file.is_file() else {}
    name, recorded = info.get("objective") or default, int(info.get("block_size") or 0)
    if not name.startswith("block_"):
        return get_objective(name)
    if recorded and block_size and recorded != block_size:
        raise ValueError(f"{checkpoint}: block size {block_size} given, but the model was trained with blocks "
                         f"of {recorded}")
    if not (recorded or block_size):
        raise ValueError(f"{checkpoint}: a {name} model that records no block size; pass its block size")
    return get_objective(name, block_size=recorded or block_size)


def objective_for(checkpoint: str | Path, name: str = "", block_size: int = 0) -> Objective:
    """How to read ``checkpoint``: objective ``name`` when given (a block-diffusion one with
    ``block_size``), else the one it records (``recorded_objective``)."""
    if not name:
        return recorded_objective(checkpoint, block_size=block_size)
    if name.startswith("block_"):
        if not block_size:
            raise ValueError(f"objective {name} needs its block size (--block-size)")
        return get_objective(name, block_size=block_size)
    return get_objective(name)


def load_for_inference(checkpoint: str | Path, model: str = "", objective: "str | Objective" = "a2d"):
    """``model``: a preset name or HF config for a DCP checkpoint that records no model config."""
    from rnd1.checkpoint.dcp import checkpoint_info, is_dcp_checkpoint, load_model_weights
    from rnd1.checkpoint.hf import load_pretrained, model_config_from_hf
    from rnd1.model.config import ModelConfig, get_preset
    from rnd1.model.qwen3 import build_model

    attention = (objective if isinstance(objective, Objective) else OBJECTIVES[objective]).attention
    if not is_dcp_checkpoint(checkpoint):
        p = Path(checkpoint)
        if not p.is_dir() or not (p / "config.json").is_file():
            what = "no such folder" if not p.exists() else "not a folder" if not p.is_dir() else \
                "neither a trainer checkpoint (no complete step-N folder) nor a Hugging Face folder (no config.json)"
            raise ValueError(f"{checkpoint}: {what}; expected a trainer's checkpoint folder (RUN/checkpoint or "
                             f"RUN/checkpoint/step-N) or a Hugging Face checkpoint folder")
        return load_pretrained(checkpoint, attention=attention)
    saved = checkpoint_info(checkpoint).get("model_config")
    if model:
        p = Path(model)
        cfg = model_config_from_hf(p) if p.exists() else get_preset(model)
    elif saved is not None:  # the trainer records the exact config (mask id included)
        cfg = ModelConfig.from_hf_config(saved)
    else:
        raise ValueError(f"{checkpoint}: no model config recorded; pass a model preset or a HF config")
    m = build_model(cfg, seed=0, attention_mode=attention)
    load_model_weights(m, checkpoint)
    return m
