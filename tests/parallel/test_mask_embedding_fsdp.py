"""The separate [MASK] embedding under FSDP2 on 2 processes: it is sharded, initialised from the
sharded table, trained at its own lr while the table is frozen, and gathered into both the DCP
checkpoint and the Hugging Face export (as the table's mask row)."""

import pytest
import torch

from .conftest import HERE, last_json, torchrun

pytestmark = [pytest.mark.multiprocess]


@pytest.mark.parametrize("preset", ["debug", "debug_dense"])  # untied head; tied head
def test_mask_embedding_under_fsdp(preset, tmp_path):
    from safetensors.torch import load_file

    from rnd1.checkpoint.dcp import load_model_weights
    from rnd1.checkpoint.hf import load_pretrained
    from rnd1.model.config import get_preset
    from rnd1.model.qwen3 import build_model

    out = last_json(torchrun(2, HERE / "worker_mask_embedding.py", preset, tmp_path))
    H = get_preset(preset).hidden_size
    assert out["sharded"] and out["local_rows"] == H // 2, out
    assert out["init_row_diff"] == 0.0 and out["mean_diff"] < 1e-7, out
    assert out["moved"] > 5e-3 and out["table_moved"] == 0.0, out
    assert out["step_diff"] < 1e-6, out

    ref = torch.load(tmp_path / "ref.pt")
    table = load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"]
    torch.testing.assert_close(table[257], ref["row"], rtol=0, atol=1e-6)
    assert torch.equal(table[:257], ref["table"][:257])
    assert torch.equal(load_pretrained(tmp_path / "hf").mask_embedding, table[257])
    model = build_model(get_preset(preset, mask_token_id=257), seed=5)
    load_model_weights(model, tmp_path / "dcp")
    torch.testing.assert_close(model.mask_embedding.detach(), ref["row"], rtol=0, atol=1e-6)
