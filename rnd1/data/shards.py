"""Token datasets on disk: raw little-endian uint32 shards plus a ``meta.json``.

    <dataset>/
        meta.json            format, tokenizer identity, vocab_size, eos_id, per split its shards
        train_00000.bin      tokens of whole documents, each followed by EOS
        val_00000.bin

Shards are memory-mapped, so a dataset larger than memory costs nothing to open. ``meta.json``
is written last (atomically): a folder without it is an unfinished preparation and is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "rnd1-tokens-v1"
DTYPE = np.dtype("<u4")


# the keys of meta.json a reader needs, and their JSON types
REQUIRED_META = {"tokenizer": str, "vocab_size": int, "eos_id": int, "splits": dict}


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty, corrupt or built for another tokenizer."""


@dataclass
class ShardInfo:
    file: str
    tokens: int
    docs: int


class ShardWriter:
    """Appends documents to numbered shard files of about ``shard_tokens`` tokens each."""

    def __init__(self, folder: Path, split: str, eos_id: int, shard_tokens: int = 1 << 26):
        self.folder, self.split, self.eos_id, self.shard_tokens = folder, split, eos_id, shard_tokens
        self.shards: list[ShardInfo] = []
        self._buf: list[np.ndarray] = []
        self._tokens = self._docs = 0

    def add(self, ids) -> None:
        arr = np.asarray(ids, dtype=DTYPE)
        self._buf.append(arr)
        self._buf.append(np.array([self.eos_id], dtype=DTYPE))
        self._tokens += len(arr) + 1
        self._docs += 1
        if self._tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._tokens:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        tmp = self.folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            for a in self._buf:
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        self.shards.append(ShardInfo(name, self._tokens, self._docs))
        self._buf, self._tokens, self._docs = [], 0, 0


def write_meta(folder: Path, *, tokenizer_identity: str, vocab_size: int, eos_id: int,
               splits: dict[str, list[ShardInfo]], sources: list[str]) -> None:
    meta = {
        "format": FORMAT, "tokenizer": tokenizer_identity, "vocab_size": vocab_size, "eos_id": eos_id,
        "dtype": "uint32", "sources": sources,
        "splits": {s: [vars(x) for x in shards] for s, shards in splits.items()},
        "tokens": {s: sum(x.tokens for x in shards) for s, shards in splits.items()},
        "docs": {s: sum(x.docs for x in shards) for s, shards in splits.items()},
    }
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")


class TokenSplit:
    """One split of a dataset as a virtual concatenation of memory-mapped shards."""

    def __init__(self, folder: Path, split: str, shards: list[dict]):
        self.name = f"{folder}:{split}"
        self.arrays = []
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not isinstance(s.get("tokens"), int):
                raise DataError(f"{folder / 'meta.json'}: splits.{split}[{i}] is {s!r}, expected "
                                f"{{\"file\": ..., \"tokens\": ...}}")
            path = folder / s["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in meta.json is missing")
            size = path.stat().st_size
            if size == 0:
                raise DataError(f"{path}: empty shard")
            if size % DTYPE.itemsize:
                raise DataError(f"{path}: size {size} is not a multiple of 4 bytes (truncated?)")
            if size // DTYPE.itemsize != s["tokens"]:
                raise DataError(f"{path}: holds {size // DTYPE.itemsize} tokens, meta.json says {s['tokens']}")
            self.arrays.append(np.memmap(path, dtype=DTYPE, mode="r"))
        if not self.arrays:
            raise DataError(f"{folder}: split {split!r} has no shards")
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries."""
        out, pos, end = [], start, start + length
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            a, base = self.arrays[k], int(self.starts[k])
            take = min(end, base + len(a)) - pos
            out.append(a[pos - base:pos - base + take])
            pos += take
            k += 1
        return np.concatenate(out) if len(out) > 1 else np.array(out[0])

    def max_token(self) -> int:
        return int(max(a.max() for a in self.arrays))


class TokenDataset:
    def __init__(self, folder: str | Path, *, expect_tokenizer: str | None = None, vocab_size: int | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not self.folder.is_dir():
            raise DataError(f"dataset folder {self.folder} does not exist (build it with scripts/prepare_data.py)")
        if not meta_path.is_file():
            raise DataError(f"{meta_path} is missing: {self.folder} is not a finished dataset "
                            f"(re-run scripts/prepare_data.py)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: invalid JSON ({e})") from e
        if not isinstance(self.meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object, got {type(self.meta).__name__}")
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        for key, kind in REQUIRED_META.items():
            if key not in self.meta:
                raise DataError(f"{meta_path}: missing key {key!r} (re-run scripts/prepare_data.py)")
            if not isinstance(self.meta[key], kind) or isinstance(self.meta[key], bool):
                raise DataError(f"{meta_path}: key {key!r} is {self.meta[key]!r}, expected a {kind.__name__}")
        if expect_tokenizer is not None and self.meta["tokenizer"] != expect_tokenizer:
            raise DataError(f"{meta_path}: built with tokenizer {self.meta['tokenizer']}, but this run uses "
                            f"{expect_tokenizer}; rebuild the data or change model.tokenizer_path")
        self.vocab_size, self.eos_id = self.meta["vocab_size"], self.meta["eos_id"]
        self._splits: dict[str, TokenSplit] = {}
        self._check_vocab = vocab_size

    def split(self, name: str) -> TokenSplit:
        if name not in self.meta["splits"]:
            raise DataError(f"{self.folder}: no split {name!r} (has {', '.join(self.meta['splits'])})")
        if name not in self._splits:
            sp = TokenSplit(self.folder, name, self.meta["splits"][name])
            if self._check_vocab is not None:
                top = sp.max_token()
                if top >= self._check_vocab:
                    raise DataError(f"{sp.name}: token id {top} >= the model's vocab_size {self._check_vocab}")
            self._splits[name] = sp
        return self._splits[name]
