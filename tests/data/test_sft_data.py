"""Chat data end to end: prepare (chat:PATH) -> flagged shards -> TokenDataset -> PackedLoader with
conversation-aligned windows and a loss mask."""

import json
import random

import numpy as np
import pytest
import torch

from rnd1.data.chat import encode_conversation
from rnd1.data.loader import PackedLoader
from rnd1.data.prepare import prepare
from rnd1.data.shards import (FLAG_DOC_START, FLAG_LOSS, FLAG_TRAILING_EOS, DataError, ShardWriter,
                              TokenDataset, write_meta)
from rnd1.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
EOS = BYTE.eos_id
SEQ = 256


def _records(n=40, seed=0):
    rng = random.Random(seed)
    recs = []
    for k in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if k % 4 == 0:
            recs.append({"prompt": f"{a} + {b}?", "response": f"{a + b}.", "system": "calc"})
        elif k % 4 == 1:
            recs.append({"messages": [{"role": "user", "content": f"{a} - {b}?"},
                                      {"role": "assistant", "content": f"{a - b}."},
                                      {"role": "user", "content": "ünï?"},
                                      {"role": "assistant", "content": "ok 😀"}]})
        else:
            recs.append({"messages": [{"role": "user", "content": f"{a} * {b}?"},
                                      {"role": "assistant", "content": f"{a * b}."}]})
    recs[7] = {"prompt": "long", "response": "x" * 400}  # longer than SEQ: truncated
    return recs


@pytest.fixture(scope="module")
def chat_ds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    recs = _records()
    path = tmp / "c.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    out = prepare([f"chat:{path}"], "byte", tmp / "ds", val_fraction=0.0, workers=1, shard_tokens=1000, quiet=True)
    return out, [encode_conversation(r, BYTE) for r in recs]


def _epoch(ds_path, **kw):
    sp = TokenDataset(ds_path).split("train")
    loader = PackedLoader([sp], seq_len=SEQ, batch_size=1, eos_id=EOS, seed=3, **kw)
    return loader, [next(loader) for _ in range(loader.sources[0].num_windows)]


def test_flag_shards_and_meta(chat_ds):
    out, enc = chat_ds
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "rnd1-tokens-v2" and meta["flags"]["bits"] == {"LOSS": 1, "DOC_START": 2, "TRAILING_EOS": 4}
    shards = meta["splits"]["train"]
    assert len(shards) > 1 and all((out / s["flags_file"]).stat().st_size == s["tokens"] for s in shards)
    flags = np.concatenate([np.fromfile(out / s["flags_file"], dtype=np.uint8) for s in shards])
    want = []
    for ids, loss in enc:  # every document: its loss bits, DOC_START first, then a trailing EOS
        f = [FLAG_LOSS if l else 0 for l in loss] + [FLAG_TRAILING_EOS]
        f[0] |= FLAG_DOC_START
        want += f
    assert flags.tolist() == want
    # a truncated flags file is refused with one line naming it
    f0 = out / shards[0]["flags_file"]
    keep = f0.read_bytes()
    try:
        f0.write_bytes(keep[:-1])
        with pytest.raises(DataError, match=r"flags.bin: holds \d+ flag bytes, meta.json says") as e:
            TokenDataset(out).split("train")
        assert "\n" not in str(e.value)
    finally:
        f0.write_bytes(keep)


@pytest.mark.parametrize("supervise_eos", [True, False])
def test_loader_windows_are_whole_conversations(chat_ds, supervise_eos):
    out, enc = chat_ds
    loader, batches = _epoch(out, supervise_eos=supervise_eos)
    assert loader.truncated == 1
    seen = []
    for b in batches:
        ids, loss, doc = b["input_ids"][0].tolist(), b["loss_mask"][0].tolist(), b["doc_ids"][0].tolist()
        assert b["loss_mask"].dtype == torch.bool and b["loss_mask"].shape == (1, SEQ)
        assert doc[0] == 0 and doc == sorted(doc)
        for d in range(doc[-1] + 1):
            pos = [i for i, x in enumerate(doc) if x == d]
            conv_ids, conv_loss = ids[pos[0]:pos[-1] + 1], loss[pos[0]:pos[-1] + 1]
            match = [k for k, (e_ids, _) in enumerate(enc) if conv_ids[:len(e_ids)] == e_ids[:SEQ]]
            assert len(match) >= 1, "a window holds something that is not a whole conversation"
            k = match[0]
            e_ids, e_loss = enc[k]
            seen.append(k)
            if len(e_ids) >= SEQ:  # the truncated one: alone in its window
                assert doc[-1] == 0 and conv_ids == e_ids[:SEQ] and conv_loss == e_loss[:SEQ]
                continue
            n = len(e_ids)
            assert conv_loss[:n] == e_loss
            tail = conv_ids[n:]  # its trailing EOS, plus the padding when it is the window's last
            assert tail and set(tail) == {EOS}
            assert d == doc[-1] or len(tail) == 1
            assert set(conv_loss[n:]) == {supervise_eos}
    assert sorted(seen) == list(range(len(enc)))  # every conversation exactly once per epoch
    assert sum(int(b["doc_ids"].max()) > 0 for b in batches) >= 3  # windows do pack several


def test_unpacked_windows_hold_one_conversation_each_padded_to_seq_len(chat_ds):
    """data.pack_conversations = false (LLaDA's SFT layout): window k is conversation k, then EOS
    to seq_len, all of it one document, the padding supervised as the response's tail."""
    out, enc = chat_ds
    loader, batches = _epoch(out, pack_conversations=False)
    assert loader.sources[0].num_windows == len(enc) and loader.truncated == 1
    seen = []
    for b in batches:
        ids, loss = b["input_ids"][0].tolist(), b["loss_mask"][0].tolist()
        assert b["doc_ids"].max() == 0  # one conversation, its padding included
        k = next(k for k, (e_ids, _) in enumerate(enc) if ids[:min(len(e_ids), SEQ)] == e_ids[:SEQ])
        seen.append(k)
        e_ids, e_loss = enc[k]
        n = min(len(e_ids), SEQ)
        assert loss[:n] == e_loss[:n]
        assert set(ids[n:]) <= {EOS} and all(loss[n:])  # the EOS tail, supervised
        assert len(e_ids) >= SEQ or ids[n] == EOS  # the tail starts right after the conversation
    assert sorted(seen) == list(range(len(enc)))


def test_eos_tails_follow_each_packed_conversation_in_its_own_document(chat_ds):
    """data.eos_tail_max: every conversation, then k more supervised EOS (log-uniform 0..max, fixed
    per conversation) in the conversation's document; conversations with their tails still packed."""
    out, enc = chat_ds
    loader, batches = _epoch(out, eos_tail_max=64)
    tails = loader.sources[0].windows.tails
    assert tails.min() == 0 and tails.max() < 64 and len(set(tails.tolist())) > 5  # 0..max-1, drawn
    packed_windows = _epoch(out)[0].sources[0].num_windows
    assert packed_windows <= loader.sources[0].num_windows <= len(enc)  # tails take room; still packed
    seen, shared = 0, 0
    for b in batches:
        ids, loss, doc = b["input_ids"][0].tolist(), b["loss_mask"][0].tolist(), b["doc_ids"][0].tolist()
        pos = 0
        while pos < SEQ and ids[pos] != EOS:
            k = next(k for k, (e_ids, _) in enumerate(enc) if ids[pos:pos + len(e_ids)] == e_ids[:SEQ - pos])
            n = min(len(enc[k][0]) + 1, SEQ - pos)  # + its EOS; one is longer than SEQ: truncated, no tail
            end = pos + n + int(tails[k])
            assert loss[pos:pos + n - 1] == enc[k][1][:n - 1]
            assert set(ids[pos + n:end]) <= {EOS} and all(loss[pos + n:end])  # its tail, supervised
            assert len(set(doc[pos:end])) == 1  # one document: the tail is the conversation's
            pos, seen = end, seen + 1
        assert set(ids[pos:]) <= {EOS}  # the window's padding
        shared += len(set(doc)) > 1
    assert seen == len(enc) and shared > 0  # some windows still hold several conversations
    again = _epoch(out, eos_tail_max=64)[0].sources[0].windows.tails
    assert (again == tails).all()


def test_supervise_eos_changes_exactly_the_eos_positions(chat_ds):
    out, _ = chat_ds
    _, on = _epoch(out, supervise_eos=True)
    _, off = _epoch(out, supervise_eos=False)
    for a, b in zip(on, off):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["doc_ids"], b["doc_ids"])
        diff = a["loss_mask"] ^ b["loss_mask"]
        assert torch.equal(diff, a["input_ids"] == EOS)  # the byte content never holds EOS
        assert not b["loss_mask"][a["input_ids"] == EOS].any()


def test_chat_loader_resumes_and_is_deterministic(chat_ds):
    out, _ = chat_ds
    sp = TokenDataset(out).split("train")
    a = PackedLoader([sp], seq_len=SEQ, batch_size=2, eos_id=EOS, seed=5, dp_world_size=2, dp_rank=1)
    for _ in range(3):
        next(a)
    b = PackedLoader([sp], seq_len=SEQ, batch_size=4, eos_id=EOS, seed=5)
    b.load_state_dict(a.state_dict())
    nb, na = next(b), next(a)
    # one global stream: b (one rank) takes samples 12..15, a (rank 1 of 2) takes 13 and 15
    assert nb["sample_ids"].tolist() == [12, 13, 14, 15] and na["sample_ids"].tolist() == [13, 15]
    for key in ("input_ids", "loss_mask", "doc_ids"):
        assert torch.equal(nb[key][1::2], na[key])


def test_mixed_and_plain_datasets(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n")
    out = prepare([f"chat:{tmp_path / 'c.jsonl'}", f"jsonl:{tmp_path / 't.jsonl'}"], "byte", tmp_path / "mix",
                  val_fraction=0.0, workers=1, quiet=True)
    meta = json.loads((out / "meta.json").read_text())
    flags = np.fromfile(out / meta["splits"]["train"][0]["flags_file"], dtype=np.uint8)
    n_chat = len(encode_conversation({"prompt": "p", "response": "r"}, BYTE)[0]) + 1
    plain = flags[n_chat:]  # plain text: LOSS everywhere, its EOS included
    assert len(plain) == len("plain text") + 1 and (plain & FLAG_LOSS).all()
    assert plain[0] & FLAG_DOC_START and plain[-1] == FLAG_LOSS | FLAG_TRAILING_EOS
    # a dataset without flags: unchanged windows, loss_mask all True
    w = ShardWriter(tmp_path, "train", 0, 1000)
    for d in ([1, 2, 3], [4, 5, 6, 7, 8]):
        w.add(d)
    w.flush()
    write_meta(tmp_path, tokenizer_identity="fake", vocab_size=10, eos_id=0, splits={"train": w.shards}, sources=[])
    ds = TokenDataset(tmp_path)
    assert ds.meta["format"] == "rnd1-tokens-v1" and not ds.has_flags
    b = next(PackedLoader([ds.split("train")], seq_len=5, batch_size=2, eos_id=0, seed=0))
    assert b["loss_mask"].all() and b["loss_mask"].shape == (2, 5)
    assert sorted(b["input_ids"].tolist()) == [[1, 2, 3, 0, 4], [5, 6, 7, 8, 0]]


def test_bad_record_names_path_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(DataError) as e:
        prepare([f"chat:{p}"], "byte", tmp_path / "ds", workers=1, quiet=True)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: ") and "expected it to end with an assistant message" in msg and "\n" not in msg
    assert not (tmp_path / "ds").exists()
