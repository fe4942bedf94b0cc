"""Token shards, preparation, and the packed mixture loader (determinism, resume, sharding)."""

import json

import numpy as np
import pytest
import torch

from rnd1.data.loader import PackedLoader, document_ids
from rnd1.data.prepare import prepare
from rnd1.data.shards import DataError, ShardWriter, TokenDataset, write_meta


def make_dataset(folder, docs, eos=0, vocab=100, identity="fake", shard_tokens=50, split="train"):
    folder.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(folder, split, eos, shard_tokens)
    for d in docs:
        w.add(d)
    w.flush()
    write_meta(folder, tokenizer_identity=identity, vocab_size=vocab, eos_id=eos, splits={split: w.shards},
               sources=["test"])
    return folder


def test_shard_round_trip_across_shard_boundaries(tmp_path):
    docs = [list(range(1, 1 + n)) for n in (7, 30, 12, 45)]
    ds = TokenDataset(make_dataset(tmp_path / "d", docs, shard_tokens=20), expect_tokenizer="fake", vocab_size=100)
    sp = ds.split("train")
    stream = np.concatenate([np.array(d + [0]) for d in docs])
    assert len(sp) == len(stream) and len(sp.arrays) > 1
    for start, n in [(0, 10), (15, 30), (len(stream) - 5, 5)]:
        assert np.array_equal(sp.slice(start, n), stream[start:start + n])


def test_validation_errors(tmp_path):
    d = make_dataset(tmp_path / "d", [[1, 2, 3]] * 5)
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="built with tokenizer fake, but this run uses other"):
        TokenDataset(d, expect_tokenizer="other")
    with pytest.raises(DataError, match="token id 3 >= the model's vocab_size 3"):
        TokenDataset(d, vocab_size=3).split("train")
    with pytest.raises(DataError, match="no split 'val'"):
        TokenDataset(d).split("val")
    shard = d / json.loads((d / "meta.json").read_text())["splits"]["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="not a multiple of 4 bytes"):
        TokenDataset(d).split("train")
    shard.write_bytes(b"")
    with pytest.raises(DataError, match="empty shard"):
        TokenDataset(d).split("train")
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenDataset(d)


def test_prepare_text_jsonl_and_stdlib(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("second doc")
    (tmp_path / "c.jsonl").write_text('{"text": "x1"}\n{"text": "x2"}\n{"body": "y"}\n')
    out = prepare([str(tmp_path / "*.txt")], "byte", tmp_path / "ds1", val_fraction=0.0, workers=1, quiet=True)
    ds = TokenDataset(out)
    assert ds.meta["docs"]["train"] == 2 and ds.meta["tokens"]["train"] == len("hello world") + len("second doc") + 2
    with pytest.raises(DataError, match=r"c.jsonl:3: no field 'text'"):
        prepare([f"jsonl:{tmp_path / 'c.jsonl'}"], "byte", tmp_path / "ds2", workers=1, quiet=True)
    assert not (tmp_path / "ds2").exists()  # nothing half-written under the final name
    out = prepare(["stdlib"], "byte", tmp_path / "ds3", val_fraction=0.2, workers=2, max_docs=20, quiet=True)
    ds = TokenDataset(out, expect_tokenizer="byte-258", vocab_size=258)
    assert ds.meta["docs"]["train"] + ds.meta["docs"]["val"] == 20 and ds.meta["docs"]["val"] >= 1
    before = (out / "meta.json").stat().st_mtime_ns
    prepare(["stdlib"], "byte", out, max_docs=20, quiet=True)  # complete dataset: left untouched
    assert (out / "meta.json").stat().st_mtime_ns == before


def _loader(splits, **kw):
    args = dict(seq_len=8, batch_size=4, eos_id=0, seed=7)
    args.update(kw)
    return PackedLoader(splits, **args)


@pytest.fixture
def two_sources(tmp_path):
    a = TokenDataset(make_dataset(tmp_path / "a", [[1] * 30] * 40)).split("train")
    b = TokenDataset(make_dataset(tmp_path / "b", [[2] * 30] * 40)).split("train")
    return a, b


def test_loader_is_deterministic_and_resumes_exactly(two_sources):
    a, b = two_sources
    run = _loader([a, b], weights=[0.5, 0.5])
    ref = [next(run)["input_ids"] for _ in range(30)]
    again = _loader([a, b], weights=[0.5, 0.5])
    assert all(torch.equal(x, next(again)["input_ids"]) for x in ref)
    part = _loader([a, b], weights=[0.5, 0.5])
    for _ in range(11):
        next(part)
    state = part.state_dict()
    resumed = _loader([a, b], weights=[0.5, 0.5])
    resumed.load_state_dict(state)
    assert all(torch.equal(ref[i], next(resumed)["input_ids"]) for i in range(11, 30))  # across epochs too


def test_mixture_proportions(two_sources):
    a, b = two_sources
    loader = _loader([a, b], weights=[0.8, 0.2], batch_size=50)
    rows = torch.cat([next(loader)["input_ids"] for _ in range(40)])
    frac_a = (rows == 1).any(1).float().mean().item()
    assert abs(frac_a - 0.8) < 0.03, frac_a


def test_ranks_see_disjoint_windows(tmp_path):
    docs = [[i] * 7 for i in range(1, 60)]  # every window is distinguishable by its content
    sp = TokenDataset(make_dataset(tmp_path / "d", docs, vocab=100)).split("train")
    seen = []
    for r in range(3):
        ld = _loader([sp], dp_rank=r, dp_world_size=3, batch_size=1)
        n = ld.sources[0].num_windows // 3
        seen.append({tuple(next(ld)["input_ids"][0].tolist()) for _ in range(n)})
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_document_ids():
    ids = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9]])
    assert document_ids(ids, 0).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
