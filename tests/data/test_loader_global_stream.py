"""The loader's global sample stream: the same global sample index gives the same window
whatever the number of ranks, and a state saved by one world size continues on another."""

import pytest
import torch

from rnd1.data.loader import PackedLoader
from rnd1.data.shards import DataError, ShardWriter, TokenDataset, write_meta


def make_split(folder, docs):
    folder.mkdir(parents=True)
    w = ShardWriter(folder, "train", 0, 50)
    for d in docs:
        w.add(d)
    w.flush()
    write_meta(folder, tokenizer_identity="fake", vocab_size=100, eos_id=0, splits={"train": w.shards},
               sources=["test"])
    return TokenDataset(folder).split("train")


@pytest.fixture
def two_sources(tmp_path):
    # every window distinguishable by content: source a holds ids 1..59, source b ids 60..99
    return [make_split(tmp_path / "a", [[i] * 7 for i in range(1, 60)]),
            make_split(tmp_path / "b", [[i] * 5 for i in range(60, 100)])]


def _loader(splits, rank=0, world=1, batch=2):
    return PackedLoader(splits, seq_len=8, batch_size=batch, eos_id=0, weights=[0.7, 0.3], seed=5,
                        dp_rank=rank, dp_world_size=world)


def _stream(loaders, batches) -> dict[int, tuple]:
    """global sample id -> window, over ``batches`` batches of every loader (one per rank)."""
    out = {}
    for ld in loaders:
        for _ in range(batches):
            b = next(ld)
            for g, row in zip(b["sample_ids"].tolist(), b["input_ids"].tolist()):
                assert g not in out, f"sample {g} produced twice"
                out[g] = tuple(row)
    return out


def test_stream_does_not_depend_on_world_size_or_batch_size(two_sources):
    one = _stream([_loader(two_sources, batch=4)], 30)  # 120 samples: past an epoch of both sources
    for world, batch in [(2, 2), (3, 4), (4, 1)]:
        n = 120 // (world * batch)
        other = _stream([_loader(two_sources, r, world, batch) for r in range(world)], n)
        assert other == {g: one[g] for g in other} and sorted(other) == list(range(world * batch * n))
    sources = [any(t >= 60 for t in w) for w in one.values()]
    assert 0.5 < 1 - sum(sources) / len(sources) < 0.9  # the 0.7 / 0.3 mixture is used


def test_state_from_one_world_size_resumes_on_another(two_sources):
    ref = _stream([_loader(two_sources, batch=4)], 24)
    two = [_loader(two_sources, r, 2) for r in range(2)]
    first = _stream(two, 10)  # 40 samples
    states = [ld.state_dict() for ld in two]
    assert states[0] == states[1] and states[0]["global_samples"] == 40
    rest = {}
    for world in (1, 3):  # 40 is not a multiple of 3: ranks still continue at sample 40
        lds = [_loader(two_sources, r, world, batch=1) for r in range(world)]
        for ld in lds:
            ld.load_state_dict(states[0])
        rest[world] = _stream(lds, 56 // world)
    assert first == {g: ref[g] for g in range(40)}
    assert rest[1] == {g: ref[g] for g in range(40, 96)}
    assert rest[3] == {g: ref[g] for g in range(40, 40 + 3 * (56 // 3))}


def test_old_or_mismatched_state_is_refused(two_sources):
    ld = _loader(two_sources)
    with pytest.raises(DataError, match=r"lacks \['global_samples', 'source_samples'\].*start a new run"):
        ld.load_state_dict({"samples": 3, "cursors": [(0, 1), (0, 2)], "seed": 5, "rank": 0})
    with pytest.raises(DataError, match="loader state has 1 sources, this run has 2"):
        ld.load_state_dict({"global_samples": 4, "source_samples": [4], "seed": 5})
