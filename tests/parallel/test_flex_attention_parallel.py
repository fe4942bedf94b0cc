"""FlexAttention on two processes (EP 2 + FSDP 2 of the dense parameters): the masked patterns
give what dense-mask SDPA gives, forward and backward, with activation checkpointing, and forward
with the blocks compiled around the expert-parallel all-to-all."""

import json

import pytest

from .conftest import HERE, torchrun


@pytest.mark.parametrize("ac,compiled", [("selective", 0), ("full", 1)])
def test_flex_equals_sdpa_on_ep2(ac, compiled):
    lines = torchrun(2, HERE / "worker_flex.py", ac, compiled, timeout=600)
    ranks = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["rank"] for r in ranks] == [0, 1], lines[-20:]
    for r in ranks:
        for name in ("two_stream_documents", "documents"):
            assert r[name]["out"] < 1e-5, r
            if not compiled:
                assert r[name]["grads"] > 10 and r[name]["grad"] < 1e-5, r
