"""Data faults (issue 16): each bad input gives one line naming the file, the line or key, the value."""

import json
from pathlib import Path

import pytest
import torch

from rnd1.config import load_config
from rnd1.data.prepare import prepare
from rnd1.data.shards import DataError, TokenDataset
from rnd1.parallel.env import DistEnv
from rnd1.training.build import StartupError

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "debug_model.toml"


def test_non_utf8_jsonl_line_names_file_line_and_byte_offset(tmp_path):
    src = tmp_path / "bad.jsonl"
    good = '{"text": "caf\u00e9 one"}\n'.encode()
    src.write_bytes(good + b'\n{"text": "two \xff\xfe"}\n')
    with pytest.raises(DataError) as ei:
        prepare([str(src)], "byte", tmp_path / "out", val_fraction=0.0, workers=1, quiet=True)
    offset = len(good) + 1 + len(b'{"text": "two ')
    assert str(ei.value) == (f"{src}:3: not UTF-8 at byte offset {offset} (byte b'\\xff': invalid start byte)")
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("key", ["tokenizer", "vocab_size", "eos_id", "splits"])
def test_meta_json_without_a_key_is_one_line(tmp_path, byte_dataset, key):
    import shutil

    d = Path(shutil.copytree(byte_dataset, tmp_path / "d"))
    meta = json.loads((d / "meta.json").read_text())
    del meta[key]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as ei:
        TokenDataset(d, expect_tokenizer="byte")
    assert str(ei.value) == f"{d / 'meta.json'}: missing key {key!r} (re-run scripts/prepare_data.py)"


def test_meta_json_shard_entry_without_tokens_is_one_line(tmp_path, byte_dataset):
    import shutil

    d = Path(shutil.copytree(byte_dataset, tmp_path / "d"))
    meta = json.loads((d / "meta.json").read_text())
    del meta["splits"]["train"][0]["tokens"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"meta.json: splits.train\[0\] is .*expected"):
        TokenDataset(d).split("train")


def _refusal(cfg) -> str:
    """The StartupError a Trainer on one CPU process raises for ``cfg``."""
    from rnd1.train import Trainer

    with pytest.raises(StartupError) as ei:
        Trainer(cfg, _env())
    return str(ei.value)


def _env():
    return DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def test_no_val_split_with_eval_interval_is_refused_at_startup(tmp_path):
    from rnd1.train import Trainer

    data = prepare(["stdlib"], "byte", tmp_path / "noval", val_fraction=0.0, workers=1, max_docs=30, quiet=True)
    assert not json.loads((data / "meta.json").read_text())["splits"].get("val")
    run = tmp_path / "run"
    args = [f"--job.dump_folder={run}", f"--data.datasets={data}", "--data.prepare=", "--training.steps=4",
            "--training.local_batch_size=2", "--training.seq_len=64", "--job.print_config=false",
            "--checkpoint.interval=2", "--eval.interval=2", "--metrics.peak_flops=1e12"]
    assert _refusal(load_config(CONFIG, args)) == (
        f"{data / 'meta.json'}: no 'val' split (has train) but eval.interval=2; rebuild "
        f"with data.val_fraction > 0 or set eval.interval=0")
    assert not (run / "checkpoint").exists()
    cfg = load_config(CONFIG, args[:-2] + ["--eval.interval=0", "--metrics.peak_flops=1e12"])
    Trainer(cfg, _env())  # the same data is fine without validation


@pytest.mark.parametrize("key,message", [
    ("--data.pack_conversations=false", "data.pack_conversations=false needs a chat dataset (one conversation per "
                                        "window)"),
    ("--data.eos_tail_max=64", "data.eos_tail_max=64 needs a chat dataset (EOS tails follow conversations)")])
def test_chat_layout_keys_on_plain_text_are_refused_at_startup(tmp_path, byte_dataset, key, message):
    """data.pack_conversations=false and data.eos_tail_max shape conversations: on a text dataset
    there are none, and the key would be accepted and ignored."""
    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"--job.dump_folder={run}", f"--data.datasets={byte_dataset}", "--data.prepare=",
                               key, "--training.steps=2", "--job.print_config=false", "--metrics.peak_flops=1e12"])
    assert _refusal(cfg) == f"{message}; {byte_dataset} hold(s) plain text: drop the key"
    assert not (run / "checkpoint").exists()


def test_eos_tails_with_one_conversation_per_window_are_refused(tmp_path):
    """On a chat dataset, tails with pack_conversations=false would change nothing (a window of one
    conversation already ends in EOS padding): one line naming both keys."""
    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "response": f"{a + 1}."}) + "\n"
                             for a in range(64)))
    data = prepare([f"chat:{chats}"], "byte", tmp_path / "chat", val_fraction=0.0, workers=1, quiet=True)
    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"--job.dump_folder={run}", f"--data.datasets={data}", "--data.prepare=",
                               "--training.document_masking=true", "--data.eos_tail_max=64",
                               "--data.pack_conversations=false", "--training.steps=2", "--eval.interval=0",
                               "--job.print_config=false", "--metrics.peak_flops=1e12"])
    assert _refusal(cfg) == ("data.eos_tail_max=64 with data.pack_conversations=false: a window of one "
                             "conversation already ends in EOS padding; set one of them")
    assert not (run / "checkpoint").exists()
