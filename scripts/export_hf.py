"""Export a checkpoint as a complete Hugging Face folder: safetensors shards, config.json,
generation_config.json, the tokenizer's files and rnd1_tokenizer.json.

    python scripts/export_hf.py INPUT OUTPUT [--tokenizer PATH|byte] [--format rnd1|rnd1_release]
        [--model-config HF_DIR|config.json|PRESET] [--dtype bfloat16] [--max-shard-size 5GB]
        [--attention bidirectional] [--objective a2d] [--mask-token-id N] [--overwrite]

INPUT is a HF checkpoint folder (re-export, e.g. to another dtype, shard size or format) or a DCP
training checkpoint (a step folder or the checkpoint root, whose newest complete step is used; then
``--model-config`` says which architecture it holds, and ``--tokenizer`` which tokenizer the run
used: its ``model.tokenizer_path``). ``--format rnd1_release`` writes the layout RND1's released
inference code loads (see ``rnd1.checkpoint.hf.plan_export``); the trainer writes the same folder
with ``checkpoint.export_hf_at_end``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rnd1.checkpoint.hf import (
    CONFIG_NAME,
    EXPORT_FORMATS,
    HF_TOKENIZER_FILES,
    HFCheckpointError,
    load_pretrained,
    model_config_from_dict,
    plan_export,
    read_hf_config,
    save_pretrained,
)
from rnd1.data.tokenizer import TOKENIZER_DESCRIPTOR, TokenizerError, load_tokenizer
from rnd1.model.config import ModelConfig, ModelConfigError, get_preset
from rnd1.model.qwen3 import ATTENTION_MODES, Qwen3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_config(spec: str) -> ModelConfig:
    """A HF folder, a config.json file, or a preset name."""
    p = Path(spec)
    if p.is_dir():
        return model_config_from_dict(read_hf_config(p), p / CONFIG_NAME)
    if p.is_file():
        try:
            return model_config_from_dict(json.loads(p.read_text()), p)
        except json.JSONDecodeError as e:
            raise HFCheckpointError(f"{p}: malformed JSON ({e})") from e
    return get_preset(spec)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in (TOKENIZER_DESCRIPTOR, *HF_TOKENIZER_FILES))


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
    ap.add_argument("--tokenizer", help="the run's tokenizer: 'byte', a Qwen3 tokenizer folder or a .tiktoken "
                                        "file (default: the HF input's own tokenizer files)")
    ap.add_argument("--format", choices=EXPORT_FORMATS,
                    help="default: the HF input's (model_type rnd1 -> rnd1_release), else rnd1")
    ap.add_argument("--model-config", help="HF folder, config.json or preset (needed for DCP input)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--attention", choices=ATTENTION_MODES,
                    help="attention mode recorded in config.json (default: the input's, else "
                         "bidirectional for DCP input, causal for HF input)")
    ap.add_argument("--objective", help="training objective recorded in config.json, e.g. a2d")
    ap.add_argument("--mask-token-id", type=int, help="the tokenizer's mask id (default: its own)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    if not args.input.exists():
        raise SystemExit(f"export_hf: input {args.input} does not exist")
    hf_input = (args.input / CONFIG_NAME).is_file()
    if not hf_input and not args.model_config:
        raise SystemExit(f"export_hf: {args.input} is not a HF folder (no {CONFIG_NAME}); for a DCP "
                         f"checkpoint pass --model-config HF_DIR|config.json|PRESET")
    if hf_input and args.model_config:
        raise SystemExit("export_hf: --model-config is only for DCP input; a HF input has its config.json")
    tok_source = args.tokenizer or (str(args.input) if hf_input and _has_tokenizer(args.input) else None)
    if tok_source is None:
        raise SystemExit(f"export_hf: {args.input} holds no tokenizer files: pass --tokenizer with the run's "
                         f"model.tokenizer_path ('byte', a Qwen3 tokenizer folder or a .tiktoken file)")
    tokenizer = load_tokenizer(tok_source, mask_id=args.mask_token_id)

    meta, fmt = {}, args.format
    if hf_input:
        hf_cfg = read_hf_config(args.input)
        meta = dict(hf_cfg.get("rnd1") or {})
        fmt = fmt or ("rnd1_release" if hf_cfg.get("model_type") == "rnd1" else "rnd1")
        mask = {} if "mask_token_id" in hf_cfg else {"mask_token_id": tokenizer.mask_id}  # a plain Qwen3 folder
        model = load_pretrained(args.input, **mask)
        meta.setdefault("attention", "causal")
    else:
        mcfg = resolve_model_config(args.model_config).replace(mask_token_id=tokenizer.mask_id)  # as the trainer
        model = _load_dcp(args.input, mcfg)
        meta = _dcp_meta(args.input)
        meta.setdefault("attention", "bidirectional")
    plan = plan_export(model.config, fmt or "rnd1", tokenizer, tok_source,
                       attention=args.attention or meta["attention"],
                       objective=args.objective or meta.get("objective"),
                       block_size=int(meta.get("block_size") or 0))
    out = save_pretrained(model, args.output, max_shard_size=args.max_shard_size, dtype=DTYPES[args.dtype],
                          overwrite=args.overwrite, **plan.save_kwargs())
    print(f"export_hf: wrote {out} (format {fmt or 'rnd1'}, {args.dtype}, tokenizer {tokenizer.name}, "
          f"eos {plan.generation['eos_token_id']}, pad {plan.generation['pad_token_id']}, "
          f"mask {plan.generation['mask_token_id']})")
    return out



def _dcp_meta(path) -> dict:
    """What a trainer checkpoint recorded about how it reads its model (objective, block size)."""
    from rnd1.checkpoint.dcp import checkpoint_info

    try:
        info = checkpoint_info(path)
    except (OSError, ValueError):  # a DCP folder written by another tool: nothing recorded
        return {}
    return {k: info[k] for k in ("objective", "block_size") if info.get(k)}

if __name__ == "__main__":
    try:
        main()
    except (HFCheckpointError, ModelConfigError, TokenizerError, OSError) as e:
        sys.exit(f"export_hf: {e}")
    except RuntimeError as e:  # rnd1.checkpoint.dcp.CheckpointError: not a complete DCP checkpoint
        if type(e).__name__ != "CheckpointError":
            raise
        sys.exit(f"export_hf: {e}")
