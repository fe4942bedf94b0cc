"""Export a checkpoint as a Hugging Face folder (safetensors shards + config.json + tokenizer files).

    python scripts/export_hf.py INPUT OUTPUT [--model-config HF_DIR|config.json|PRESET]
        [--dtype bfloat16] [--max-shard-size 5GB] [--attention bidirectional] [--objective mdlm]
        [--mask-token-id N] [--copy-files-from DIR] [--overwrite]

INPUT is a HF checkpoint folder (re-export, e.g. to another dtype or shard size) or a DCP training
checkpoint (a step folder or the checkpoint root, whose newest complete step is used; then
``--model-config`` says which architecture it holds). The diffusion metadata (attention mode,
objective) goes into config.json under ``"rnd1"`` so generation code can pick the right mode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rnd1.checkpoint.hf import (
    CONFIG_NAME,
    INDEX_NAME,
    HFCheckpointError,
    load_pretrained,
    model_config_from_hf,
    read_hf_config,
    save_pretrained,
)
from rnd1.model.config import ModelConfig, ModelConfigError, get_preset
from rnd1.model.qwen3 import ATTENTION_MODES, Qwen3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_config(spec: str, **overrides) -> ModelConfig:
    """A HF folder, a config.json file, or a preset name."""
    p = Path(spec)
    if p.is_dir():
        return model_config_from_hf(p, **overrides)
    if p.is_file():
        return ModelConfig.from_hf_config(json.loads(p.read_text()), **overrides)
    return get_preset(spec, **overrides)


def _carry_files(folder: Path) -> list[Path]:
    """Everything of a HF folder but weights and config (tokenizer, generation config, ...)."""
    skip = {CONFIG_NAME, INDEX_NAME}
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name not in skip
                  and not f.name.endswith(".safetensors") and not f.name.startswith("."))


def _load_dcp(folder: Path, cfg: ModelConfig) -> Qwen3:
    try:
        from rnd1.checkpoint.dcp import load_model_weights
    except ImportError as e:
        raise SystemExit(f"export_hf: DCP input {folder} needs rnd1.checkpoint.dcp.load_model_weights"
                         f"(model, folder), which is not available ({e})") from e
    with torch.device("meta"):
        model = Qwen3(cfg)
    model.to_empty(device="cpu")
    used = load_model_weights(model, folder)
    print(f"export_hf: loaded model weights from DCP checkpoint {used}")
    return model


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--model-config", help="HF folder, config.json or preset (needed for DCP input)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--attention", choices=ATTENTION_MODES,
                    help="attention mode recorded in config.json (default: the input's, else "
                         "bidirectional for DCP input, causal for HF input)")
    ap.add_argument("--objective", help="training objective recorded in config.json, e.g. mdlm")
    ap.add_argument("--mask-token-id", type=int)
    ap.add_argument("--copy-files-from", type=Path,
                    help="folder whose tokenizer/generation files are copied (default: HF input)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    overrides = {} if args.mask_token_id is None else {"mask_token_id": args.mask_token_id}
    rnd1_meta: dict = {}
    if not args.input.exists():
        raise SystemExit(f"export_hf: input {args.input} does not exist")
    if (args.input / CONFIG_NAME).is_file():
        rnd1_meta = dict(read_hf_config(args.input).get("rnd1") or {})
        if args.model_config:
            raise SystemExit("export_hf: --model-config is only for DCP input; a HF input has its config.json")
        model = load_pretrained(args.input, **{"mask_token_id": args.mask_token_id} if overrides else {})
        carry_from = args.copy_files_from or args.input
        rnd1_meta.setdefault("attention", "causal")
    else:
        if not args.model_config:
            raise SystemExit(f"export_hf: {args.input} is not a HF folder (no {CONFIG_NAME}); for a DCP "
                             f"checkpoint pass --model-config HF_DIR|config.json|PRESET")
        model = _load_dcp(args.input, resolve_model_config(args.model_config, **overrides))
        carry_from = args.copy_files_from
        rnd1_meta.setdefault("attention", "bidirectional")
    if args.attention:
        rnd1_meta["attention"] = args.attention
    if args.objective:
        rnd1_meta["objective"] = args.objective
    extra = _carry_files(carry_from) if carry_from else []
    out = save_pretrained(model, args.output, max_shard_size=args.max_shard_size, dtype=DTYPES[args.dtype],
                          extra_config={"rnd1": rnd1_meta}, extra_files=extra, overwrite=args.overwrite)
    print(f"export_hf: wrote {out} ({args.dtype}, {len(extra)} extra files, rnd1={rnd1_meta})")
    return out


if __name__ == "__main__":
    try:
        main()
    except (HFCheckpointError, ModelConfigError, OSError) as e:
        sys.exit(f"export_hf: {e}")
    except RuntimeError as e:  # rnd1.checkpoint.dcp.CheckpointError: not a complete DCP checkpoint
        if type(e).__name__ != "CheckpointError":
            raise
        sys.exit(f"export_hf: {e}")
