"""A trained model for inference (sampling, scoring, evaluation), from either kind of checkpoint:
a trainer's DCP checkpoint (which records its model config and objective) or a Hugging Face
folder. The attention mode comes from the objective the model is read with."""

from __future__ import annotations

from pathlib import Path

from rnd1.diffusion.objective import Objective, get_objective


def recorded_objective(checkpoint: str | Path, default: str = "a2d") -> str:
    """The objective a trainer checkpoint was trained with (``default`` for other checkpoints)."""
    from rnd1.checkpoint.dcp import checkpoint_info, is_dcp_checkpoint

    return checkpoint_info(checkpoint).get("objective", default) if is_dcp_checkpoint(checkpoint) else default


def load_for_inference(checkpoint: str | Path, model: str = "", objective: "str | Objective" = "a2d"):
    """``model``: a preset name or HF config for a DCP checkpoint that records no model config."""
    from rnd1.checkpoint.dcp import checkpoint_info, is_dcp_checkpoint, load_model_weights
    from rnd1.checkpoint.hf import load_pretrained, model_config_from_hf
    from rnd1.model.config import ModelConfig, get_preset
    from rnd1.model.qwen3 import build_model

    attention = get_objective(objective).attention
    if not is_dcp_checkpoint(checkpoint):
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
