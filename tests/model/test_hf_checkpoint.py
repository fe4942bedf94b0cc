"""HF checkpoint import/export against transformers itself (fp32, tiny random models)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rnd1.checkpoint.hf import (
    HFCheckpointError,
    load_pretrained,
    load_state_dict_from_hf,
    parse_size,
    save_pretrained,
)
from rnd1.model.config import get_preset
from rnd1.model.qwen3 import Qwen3, build_model

REPO = Path(__file__).resolve().parents[2]

CASES = {
    # name: (moe, HF config overrides, max_shard_size for transformers' writer)
    "dense_tied": (False, dict(tie_word_embeddings=True), "5GB"),
    "dense_untied_sharded": (False, dict(tie_word_embeddings=False), "40KB"),
    "moe_mixed_layers_no_norm_topk": (True, dict(norm_topk_prob=False, mlp_only_layers=[1],
                                                 tie_word_embeddings=False), "5GB"),
    "moe_sparse_step2_norm_topk_tied_sharded": (True, dict(norm_topk_prob=True, decoder_sparse_step=2,
                                                           tie_word_embeddings=True), "40KB"),
}


def _ids(seed=0, B=2, L=13, vocab=300):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_grads_match_transformers(case, hf, tmp_path):
    moe, overrides, shard = CASES[case]
    ref = hf.make(moe, **overrides)
    hf.save(ref, tmp_path / "ckpt", max_shard_size=shard)
    if shard != "5GB":
        assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
        assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    model = load_pretrained(tmp_path / "ckpt", mask_token_id=hf.MASK_ID)
    if moe:
        assert model.config.is_moe and len(model.config.moe_layer_ids) < model.config.num_hidden_layers
    assert (model.lm_head.weight is model.embed_tokens.weight) == overrides["tie_word_embeddings"]

    x = _ids()
    x[:, ::5] = hf.MASK_ID  # read from the separate [MASK] embedding, which import filled from the table
    targets = _ids(seed=1)
    ref_logits = ref(x).logits
    logits = model(x)
    assert (logits - ref_logits).abs().max().item() <= 1e-4

    F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    ref_grads = hf.to_ours({n: p.grad for n, p in ref.named_parameters()}, ref.config.to_dict().get(
        "moe_intermediate_size", 0))
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    mask_grad = ours.pop("mask_embedding")
    assert mask_grad.abs().max() > 0
    ours["embed_tokens.weight"][hf.MASK_ID] += mask_grad  # transformers' table row = both of ours
    assert set(ref_grads) == set(ours)
    for name, g in ours.items():
        r = ref_grads[name]
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4), f"{name}: max|diff| {(g - r).abs().max()}"


def test_bidirectional_matches_transformers_with_all_visible_mask(hf, tmp_path):
    """transformers 5 takes a 4-D float attention mask as-is (additive; 0 = visible) for sdpa and
    eager: an all-zero mask is bidirectional attention, a block-diagonal one is document masking."""
    for impl in ("sdpa", "eager"):
        ref = hf.make(True, attn_implementation=impl, mlp_only_layers=[0])
        hf.save(ref, tmp_path / impl)
        model = load_pretrained(tmp_path / impl, attention="bidirectional", mask_token_id=hf.MASK_ID)
        x = _ids(L=12)
        B, L = x.shape
        full = torch.zeros(B, 1, L, L)
        assert (model(x) - ref(x, attention_mask=full).logits).abs().max().item() <= 1e-4
        assert (model(x) - ref(x).logits).abs().max().item() > 1e-2  # differs from causal

        doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
        allowed = doc_ids[:, :, None] == doc_ids[:, None, :]
        block = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        ours = model(x, doc_ids=doc_ids)
        assert (ours - ref(x, attention_mask=block).logits).abs().max().item() <= 1e-4


def test_stacked_transformers5_layout_loads(hf, tmp_path):
    """A file holding the stacked in-memory layout (gate_up_proj [E, 2Im, H]) loads too."""
    ref = hf.make(True, mlp_only_layers=[2])
    folder = tmp_path / "stacked"
    folder.mkdir()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(ref.config.to_dict()))
    model = load_pretrained(folder, mask_token_id=hf.MASK_ID)
    x = _ids()
    assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", ["debug", "debug_dense"])
def test_save_load_round_trip_bit_exact_and_transformers_loads_it(preset, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(get_preset(preset, rope_theta=5000.0), seed=3)
    out = save_pretrained(model, tmp_path / "export", max_shard_size="200KB",
                          extra_config={"rnd1": {"attention": "bidirectional", "objective": "mdlm"}})
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert not list(tmp_path.glob(".export*")), "temporary folder left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["rnd1"] == {"attention": "bidirectional", "objective": "mdlm"}
    assert config["mask_token_id"] == model.config.mask_token_id
    index = json.loads((out / "model.safetensors.index.json").read_text())
    if model.config.num_experts:
        assert "model.layers.0.mlp.experts.7.down_proj.weight" in index["weight_map"]
        assert "model.layers.0.mlp.gate.weight" in index["weight_map"]
    assert ("lm_head.weight" in index["weight_map"]) != model.config.tie_word_embeddings

    again = load_pretrained(out)
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    ref = AutoModelForCausalLM.from_pretrained(out).float().eval()
    x = _ids(vocab=model.config.vocab_size)
    with torch.no_grad():
        assert (ref(x).logits - model(x)).abs().max().item() <= 1e-4

    with pytest.raises(HFCheckpointError, match="already exists"):
        save_pretrained(model, out)
    save_pretrained(again, out, overwrite=True, max_shard_size=10**9)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


def test_bf16_export_round_trips_exactly(tmp_path):
    model = build_model(get_preset("debug"), seed=0)
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    m16 = load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert m16.embed_tokens.weight.dtype == torch.bfloat16
    for (k, a), b in zip(model.state_dict().items(), m16.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), k


def test_export_of_a_compiled_checkpointed_model_has_plain_names(tmp_path):
    """The trainer exports its live model, whose blocks may be wrapped by torch.compile and
    activation checkpointing (``layers.0._orig_mod._checkpoint_wrapped_module...``): the files
    must be those of the unwrapped model."""
    from safetensors.torch import load_file

    from rnd1.parallel.activation_checkpoint import apply_activation_checkpointing
    from rnd1.parallel.compile import apply_compile

    plain = build_model(get_preset("debug"), seed=0)
    wrapped = build_model(get_preset("debug"), seed=0)
    apply_activation_checkpointing(wrapped, "full")
    apply_compile(wrapped)
    assert any("_orig_mod" in n for n, _ in wrapped.named_parameters())
    save_pretrained(plain, tmp_path / "plain")
    save_pretrained(wrapped, tmp_path / "wrapped")
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "wrapped" / "model.safetensors")
    assert sorted(a) == sorted(b) and "model.layers.1.mlp.experts.0.gate_proj.weight" in b
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_copy_fn_receives_every_full_tensor_once(hf, tmp_path):
    """The hook the parallel layer uses: a meta model, (our_name, full tensor) per parameter."""
    ref = hf.make(True, mlp_only_layers=[1], tie_word_embeddings=False)
    hf.save(ref, tmp_path / "ckpt", max_shard_size="40KB")
    target = load_pretrained(tmp_path / "ckpt", mask_token_id=hf.MASK_ID)
    with torch.device("meta"):
        meta = Qwen3(target.config)
    seen = {}

    def copy_fn(name, full):
        assert name not in seen, f"{name} delivered twice"
        seen[name] = full.clone()

    load_state_dict_from_hf(tmp_path / "ckpt", meta, copy_fn=copy_fn)
    expected = dict(target.named_parameters())
    assert seen.keys() == expected.keys()
    for name, t in seen.items():
        assert torch.equal(t, expected[name]), name

    with pytest.raises(HFCheckpointError, match="meta device"):
        load_state_dict_from_hf(tmp_path / "ckpt", meta)


def test_config_mismatch_is_refused(hf, tmp_path):
    hf.save(hf.make(False), tmp_path / "ckpt")
    cfg = load_pretrained(tmp_path / "ckpt", mask_token_id=hf.MASK_ID).config
    model = build_model(cfg.replace(rope_theta=123.0))
    with pytest.raises(HFCheckpointError, match=r"rope_theta=10000.0 \(model: 123.0\)"):
        load_state_dict_from_hf(tmp_path / "ckpt", model)


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def saved_moe(hf, tmp_path):
    folder = tmp_path / "ckpt"
    hf.save(hf.make(True, mlp_only_layers=[1]), folder)
    return folder


def _rewrite(folder: Path, edit):
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_error_missing_folder_and_config(tmp_path):
    with pytest.raises(HFCheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_pretrained(tmp_path)


def test_error_malformed_json_and_unknown_model_type(saved_moe):
    cfg_file = saved_moe / "config.json"
    good = cfg_file.read_text()
    cfg_file.write_text(good[:-20])
    with pytest.raises(HFCheckpointError, match=r"config.json: malformed JSON"):
        load_pretrained(saved_moe, mask_token_id=299)
    cfg_file.write_text(json.dumps({**json.loads(good), "model_type": "llama"}))
    with pytest.raises(HFCheckpointError, match=r"config.json.*unsupported model_type 'llama'"):
        load_pretrained(saved_moe, mask_token_id=299)
    cfg_file.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "hidden_size"}))
    with pytest.raises(HFCheckpointError, match="missing key 'hidden_size'"):
        load_pretrained(saved_moe, mask_token_id=299)


def test_error_truncated_safetensors_names_the_file(saved_moe):
    f = saved_moe / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_pretrained(saved_moe, mask_token_id=299)
    f.write_bytes(b"\x00garbage")
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors: cannot read"):
        load_pretrained(saved_moe, mask_token_id=299)


def test_error_wrong_shape_names_tensor_and_shapes(saved_moe):
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    _rewrite(saved_moe, lambda sd: sd.__setitem__(name, torch.zeros(31, 64)))
    with pytest.raises(HFCheckpointError, match=rf"1 tensors with the wrong shape: {name} \[31, 64\] "
                                                r"\(expected \[32, 64\]\)"):
        load_pretrained(saved_moe, mask_token_id=299)


def test_error_missing_and_unexpected_tensors_are_listed_with_counts(saved_moe):
    def edit(sd):
        del sd["model.layers.2.mlp.experts.5.gate_proj.weight"]
        del sd["model.norm.weight"]
        sd["model.layers.0.mlp.experts.6.gate_proj.weight"] = torch.zeros(32, 64)  # only 6 experts
        sd["model.extra.bias"] = torch.zeros(3)

    _rewrite(saved_moe, edit)
    with pytest.raises(HFCheckpointError) as err:
        load_pretrained(saved_moe, mask_token_id=299)
    msg = str(err.value)
    assert "2 missing parameters" in msg and "norm.weight" in msg
    assert "layers.2.mlp.experts.gate_proj (experts [5])" in msg
    assert "2 unexpected tensors" in msg and "model.extra.bias" in msg
    assert "model.layers.0.mlp.experts.6.gate_proj.weight" in msg


def test_error_shard_listed_in_index_is_absent(hf, tmp_path):
    folder = hf.save(hf.make(False), tmp_path / "ckpt", max_shard_size="40KB")
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(HFCheckpointError, match=f"shard files that do not exist.*{victim.name}"):
        load_pretrained(folder, mask_token_id=299)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(77) == 77
    with pytest.raises(HFCheckpointError, match="max_shard_size '5 parsecs'"):
        parse_size("5 parsecs")


# --------------------------------------------------------------------------- export script
def _export_main():
    spec = importlib.util.spec_from_file_location("export_hf", REPO / "scripts" / "export_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_export_script_hf_to_hf_and_dcp_to_hf(tmp_path):
    main = _export_main()
    model = build_model(get_preset("debug", mask_token_id=257), seed=5)
    from rnd1.checkpoint.dcp import CheckpointManager

    CheckpointManager(tmp_path / "dcp").save(7, model, None, {})
    with pytest.raises(SystemExit, match="--model-config"):
        main([str(tmp_path / "dcp"), str(tmp_path / "fromdcp")])
    with pytest.raises(SystemExit, match="holds no tokenizer files: pass --tokenizer"):
        main([str(tmp_path / "dcp"), str(tmp_path / "fromdcp"), "--model-config", "debug"])
    assert not (tmp_path / "fromdcp").exists()
    # the preset's mask id (511) gives way to the tokenizer's (257), as in the trainer
    main([str(tmp_path / "dcp"), str(tmp_path / "fromdcp"), "--model-config", "debug", "--tokenizer", "byte",
          "--format", "rnd1_release", "--objective", "a2d"])
    out = tmp_path / "fromdcp"
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "rnd1" and conf["rnd1"] == {"attention": "bidirectional", "objective": "a2d",
                                                            "mask_token_id": 257}
    assert (conf["eos_token_id"], conf["pad_token_id"]) == (256, 256)
    assert (out / "generation_config.json").is_file() and (out / "rnd1_tokenizer.json").is_file()
    back = load_pretrained(out)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k

    # re-export: format, attention, objective and tokenizer come from the input folder
    main([str(out), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    again = tmp_path / "bf16"
    conf16 = json.loads((again / "config.json").read_text())
    assert {k: v for k, v in conf16.items() if k != "dtype"} == {k: v for k, v in conf.items() if k != "dtype"}
    assert conf16["dtype"] == "bfloat16"
    assert (again / "generation_config.json").read_text() == (out / "generation_config.json").read_text()
    m16 = load_pretrained(again, dtype=torch.bfloat16)
    assert torch.equal(m16.layers[0].mlp.experts.down_proj, model.layers[0].mlp.experts.down_proj.bfloat16())
    main([str(out), str(tmp_path / "plain"), "--format", "rnd1"])
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "qwen3_moe"


# --------------------------------------------------------------------------- sharded (DTensor) params
def _fsdp_worker(rank: int, world: int, folder: str, out: str, init_file: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rnd1.checkpoint.hf import model_config_from_hf

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            model = Qwen3(model_config_from_hf(folder))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        load_state_dict_from_hf(folder, model)  # default copy: each rank keeps its own slice
        local = model.layers[0].mlp.experts.gate_proj.to_local()
        assert local.shape[0] == model.config.num_experts // world, local.shape
        save_pretrained(model, out, max_shard_size="300KB")  # gathers; rank 0 writes
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_fsdp_sharded_model_loads_and_saves(tmp_path):
    import torch.multiprocessing as mp

    model = build_model(get_preset("debug"), seed=11)
    save_pretrained(model, tmp_path / "src")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "pg")),
             nprocs=2, join=True)
    back = load_pretrained(tmp_path / "out")
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------- complete exports (both layouts)
def _tiny_hf_tokenizer(folder: Path) -> Path:
    """A Qwen2-style tokenizer folder in miniature: 256 byte tokens + 'ab', <|endoftext|> 257,
    <|im_end|> 258; like Qwen3's, it names eos <|im_end|> and pad <|endoftext|>."""
    from rnd1.data.tokenizer import _unicode_to_byte

    byte_to_char = {b: ch for ch, b in _unicode_to_byte().items()}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({byte_to_char[b]: b for b in range(256)} | {"ab": 256}))
    (folder / "merges.txt").write_text("#version: 0.2\na b\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {"257": {"content": "<|endoftext|>", "special": True},
                                 "258": {"content": "<|im_end|>", "special": True}}}))
    (folder / "merges.txt").chmod(0o444)  # a read-only source must not make a read-only export
    return folder


def _export(model, out, fmt, tokenizer, source, **kw):
    from rnd1.checkpoint.hf import plan_export

    plan = plan_export(model.config, fmt, tokenizer, source, attention="bidirectional", objective="a2d")
    return save_pretrained(model, out, **plan.save_kwargs(), **kw)


def _transformers_model(out: Path):
    """transformers has no RND1 class: the rnd1_release config is a Qwen3-MoE one under another
    model_type, so its weights load into Qwen3MoeForCausalLM with the model_type mapped."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    conf = json.loads((out / "config.json").read_text())
    if conf["model_type"] != "rnd1":
        return AutoModelForCausalLM.from_pretrained(out).float().eval()
    config = Qwen3MoeConfig(**{k: v for k, v in conf.items() if k not in ("model_type", "architectures")})
    return Qwen3MoeForCausalLM.from_pretrained(out, config=config).float().eval()


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.mark.parametrize("fmt", ["rnd1", "rnd1_release"])
@pytest.mark.parametrize("tok_kind", ["byte", "hf_folder"])
def test_export_loads_in_rnd1_and_transformers_with_the_tokenizers_ids(fmt, tok_kind, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from rnd1.data.tokenizer import load_tokenizer

    source = "byte" if tok_kind == "byte" else _tiny_hf_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(source, mask_id=None if tok_kind == "byte" else 259)
    # byte: eos = pad = 256, mask 257; the HF folder names eos <|im_end|> 258, pad <|endoftext|> 257
    want = {"eos_token_id": 256, "pad_token_id": 256} if tok_kind == "byte" else {"eos_token_id": 258,
                                                                                  "pad_token_id": 257}
    want["mask_token_id"] = tok.mask_id
    model = build_model(get_preset("debug", mask_token_id=tok.mask_id), seed=4)
    out = _export(model, tmp_path / "export", fmt, tok, source, max_shard_size="300KB")

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "rnd1_tokenizer.json", "model.safetensors.index.json"} <= names
    if tok_kind == "hf_folder":
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(names, _file_mode())

    conf = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert {k: conf[k] for k in want} == {k: gen[k] for k in want} == want
    assert conf["model_type"] == ("rnd1" if fmt == "rnd1_release" else "qwen3_moe")
    assert GenerationConfig.from_pretrained(out).eos_token_id == want["eos_token_id"]
    back = load_tokenizer(out)
    assert (back.identity(), back.eos_id, back.mask_id) == (tok.identity(), tok.eos_id, tok.mask_id)
    if tok_kind == "hf_folder":
        hf_tok = AutoTokenizer.from_pretrained(out)
        assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (want["eos_token_id"], want["pad_token_id"])
        assert hf_tok("abc<|im_end|>").input_ids == tok.encode("abc<|im_end|>") == [256, 99, 258]

    ours = load_pretrained(out, attention="bidirectional")
    assert ours.config == model.config
    for (k, a), b in zip(model.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    model.set_attention_mode("bidirectional")
    ref = _transformers_model(out)
    x = _ids(vocab=256)
    with torch.no_grad():
        visible = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1])  # bidirectional, as in the existing oracle
        assert (ref(x, attention_mask=visible).logits - model(x)).abs().max().item() <= 1e-4
    assert ref.config.pad_token_id == want["pad_token_id"] < ref.config.vocab_size


@pytest.mark.parametrize("source", ["folder", "tiktoken"])
def test_release_export_with_the_real_qwen3_tokenizer(source, tmp_path):
    """The flagship's case: Qwen3 files give RND1-Base's ids (eos <|im_end|> 151645, pad
    <|endoftext|> 151643, mask 151669); a bare .tiktoken file names no eos, so its end-of-text
    151643 is both. Either way the folder reloads the exact tokenizer."""
    from rnd1.data.tokenizer import load_tokenizer
    from rnd1.model.config import ModelConfig

    shared = REPO.parent / "shared" / "data"  # beside the repo, not in it (tests/conftest.py)
    path = shared / "qwen3_tokenizer" if source == "folder" else shared / "qwen.tiktoken"
    if not path.exists():
        pytest.skip(f"the real Qwen3 tokenizer files are not present at {shared}")
    tok = load_tokenizer(path)
    cfg = ModelConfig(vocab_size=151936, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, intermediate_size=32, moe_intermediate_size=8,
                      num_experts=2, num_experts_per_tok=1, mask_token_id=tok.mask_id)
    out = _export(build_model(cfg, seed=0), tmp_path / "export", "rnd1_release", tok, path, dtype=torch.bfloat16)
    gen = json.loads((out / "generation_config.json").read_text())
    eos, pad = (151645, 151643) if source == "folder" else (151643, 151643)
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["mask_token_id"]) == (eos, pad, 151669)
    assert load_tokenizer(out).identity() == tok.identity()
    if source == "folder":
        from transformers import AutoTokenizer

        names = {p.name for p in out.iterdir()}
        assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
        hf_tok = AutoTokenizer.from_pretrained(out)
        assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (eos, pad)
    else:
        assert (out / "qwen.tiktoken").is_file()


def test_export_refusals_name_the_problem_and_write_nothing(tmp_path):
    from rnd1.checkpoint.hf import plan_export
    from rnd1.data.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")
    moe = get_preset("debug", mask_token_id=257)

    def refused(cfg, match, fmt="rnd1_release", attention="bidirectional", source="byte"):
        with pytest.raises(HFCheckpointError, match=match):
            plan_export(cfg, fmt, tok, source, attention=attention, objective="a2d")

    refused(get_preset("debug_dense", mask_token_id=257), "MoE in every layer")
    refused(moe.replace(mlp_only_layers=[1]), "MoE in every layer")
    refused(moe.replace(tie_word_embeddings=True), "untied LM head")
    refused(moe, "bidirectional attention .*got causal", attention="causal")
    refused(moe.replace(mask_token_id=300), "model mask_token_id 300 differs from the tokenizer's mask id 257",
            fmt="rnd1")
    refused(moe, "export format 'hf' unknown", fmt="hf")
    folder = _tiny_hf_tokenizer(tmp_path / "tok")
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**conf, "eos_token": "</s>"}))
    with pytest.raises(HFCheckpointError, match=r"tokenizer_config.json: eos_token '</s>' is not a special token"):
        _export(build_model(moe.replace(mask_token_id=259)), tmp_path / "out", "rnd1",
                load_tokenizer(folder, mask_id=259), folder)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_load_tokenizer_refuses_an_export_whose_files_changed(tmp_path):
    from rnd1.data.tokenizer import TokenizerError, load_tokenizer

    folder = _tiny_hf_tokenizer(tmp_path / "tok")
    out = _export(build_model(get_preset("debug", mask_token_id=259)), tmp_path / "export", "rnd1",
                  load_tokenizer(folder, mask_id=259), folder)
    with pytest.raises(TokenizerError, match="mask_id 300 asked for, but this checkpoint was trained with mask id 259"):
        load_tokenizer(out, mask_id=300)
    conf = out / "tokenizer_config.json"
    conf.write_text(conf.read_text().replace("<|im_end|>", "<|im_stop|>"))  # another special token
    with pytest.raises(TokenizerError, match=r"rnd1_tokenizer.json: the tokenizer files give identity .* but the"):
        load_tokenizer(out)
