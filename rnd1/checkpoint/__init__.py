"""Checkpoints: Hugging Face safetensors import/export (``hf``) and crash-safe DCP training
checkpoints (``dcp``, imported on demand)."""

from rnd1.checkpoint.hf import (
    HFCheckpointError,
    copy_full_into,
    load_pretrained,
    load_state_dict_from_hf,
    model_config_from_hf,
    parse_size,
    read_hf_config,
    save_pretrained,
)

__all__ = ["HFCheckpointError", "copy_full_into", "load_pretrained", "load_state_dict_from_hf",
           "model_config_from_hf", "parse_size", "read_hf_config", "save_pretrained"]
