"""Token datasets on disk: raw little-endian uint32 shards plus a ``meta.json``.

    <dataset>/
        meta.json            format, tokenizer identity, vocab_size, eos_id, per split its shards
        train_00000.bin      tokens of whole documents, each followed by EOS
        train_00000.flags.bin  (chat datasets only) one uint8 of FLAG_* bits per token
        val_00000.bin

A dataset built from chat sources (``rnd1.data.chat``) carries per-token flags beside each shard
(format ``rnd1-tokens-v2``, the shard entry names its ``flags_file``): LOSS = the objective may
mask and score this token, DOC_START = first token of a document, TRAILING_EOS = the EOS appended
after a document. The loader decides at run time whether a chat document's trailing EOS is
supervised (LLaDA supervises it: the model learns to end a response), so that EOS does not carry
LOSS; a plain-text document in the same dataset has LOSS everywhere, its EOS included (as in
pretraining). Datasets without flags stay ``rnd1-tokens-v1`` and read as before.

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
FORMAT_FLAGS = "rnd1-tokens-v2"  # v1 plus a flags file per shard
FORMATS = (FORMAT, FORMAT_FLAGS)
DTYPE = np.dtype("<u4")
FLAGS_DTYPE = np.dtype("u1")

FLAG_LOSS = 1  # the objective may mask and supervise this token
FLAG_DOC_START = 2  # first token of a document / conversation
FLAG_TRAILING_EOS = 4  # the EOS ShardWriter appends after a document
FLAG_BITS = {"LOSS": FLAG_LOSS, "DOC_START": FLAG_DOC_START, "TRAILING_EOS": FLAG_TRAILING_EOS}


# the keys of meta.json a reader needs, and their JSON types
REQUIRED_META = {"tokenizer": str, "vocab_size": int, "eos_id": int, "splits": dict}


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty, corrupt or built for another tokenizer."""


@dataclass
class ShardInfo:
    file: str
    tokens: int
    docs: int
    flags_file: str | None = None

    def entry(self) -> dict:
        d = {"file": self.file, "tokens": self.tokens, "docs": self.docs}
        if self.flags_file is not None:
            d["flags_file"] = self.flags_file
        return d


def _write_atomic(path: Path, arrays: list[np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for a in arrays:
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Appends documents to numbered shard files of about ``shard_tokens`` tokens each; with
    ``flags=True`` also a ``.flags.bin`` companion per shard (see the module docstring)."""

    def __init__(self, folder: Path, split: str, eos_id: int, shard_tokens: int = 1 << 26, *,
                 flags: bool = False):
        self.folder, self.split, self.eos_id, self.shard_tokens = folder, split, eos_id, shard_tokens
        self.with_flags = flags
        self.shards: list[ShardInfo] = []
        self._buf: list[np.ndarray] = []
        self._fbuf: list[np.ndarray] = []
        self._tokens = self._docs = 0

    def add(self, ids, loss=None) -> None:
        """One document. ``loss`` (chat documents, flagged writers only): per token, whether it is
        supervised; None means every token is, the trailing EOS included (plain text)."""
        arr = np.asarray(ids, dtype=DTYPE)
        if loss is not None and not self.with_flags:
            raise DataError(f"{self.split}: a loss mask was given to a shard writer without flags")
        if self.with_flags:
            if loss is None:
                f = np.full(len(arr) + 1, FLAG_LOSS, dtype=FLAGS_DTYPE)
            else:
                loss = np.asarray(loss, dtype=bool)
                if loss.shape != arr.shape:
                    raise DataError(f"{self.split}: loss mask of {loss.shape[0]} entries for a document of "
                                    f"{len(arr)} tokens")
                f = np.zeros(len(arr) + 1, dtype=FLAGS_DTYPE)
                f[:-1] = loss * FLAG_LOSS
            f[0] |= FLAG_DOC_START
            f[-1] |= FLAG_TRAILING_EOS
            self._fbuf.append(f)
        self._buf.append(arr)
        self._buf.append(np.array([self.eos_id], dtype=DTYPE))
        self._tokens += len(arr) + 1
        self._docs += 1
        if self._tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._tokens:
            return
        stem = f"{self.split}_{len(self.shards):05d}"
        flags_name = None
        if self.with_flags:
            flags_name = stem + ".flags.bin"
            _write_atomic(self.folder / flags_name, self._fbuf)
        _write_atomic(self.folder / (stem + ".bin"), self._buf)
        self.shards.append(ShardInfo(stem + ".bin", self._tokens, self._docs, flags_name))
        self._buf, self._fbuf, self._tokens, self._docs = [], [], 0, 0


def write_meta(folder: Path, *, tokenizer_identity: str, vocab_size: int, eos_id: int,
               splits: dict[str, list[ShardInfo]], sources: list[str]) -> None:
    flagged = any(x.flags_file is not None for shards in splits.values() for x in shards)
    meta = {
        "format": FORMAT_FLAGS if flagged else FORMAT, "tokenizer": tokenizer_identity,
        "vocab_size": vocab_size, "eos_id": eos_id, "dtype": "uint32", "sources": sources,
        **({"flags": {"dtype": "uint8", "bits": FLAG_BITS}} if flagged else {}),
        "splits": {s: [x.entry() for x in shards] for s, shards in splits.items()},
        "tokens": {s: sum(x.tokens for x in shards) for s, shards in splits.items()},
        "docs": {s: sum(x.docs for x in shards) for s, shards in splits.items()},
    }
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")


class TokenSplit:
    """One split of a dataset as a virtual concatenation of memory-mapped shards."""

    def __init__(self, folder: Path, split: str, shards: list[dict], *, flags: bool = False):
        self.name = f"{folder}:{split}"
        self.arrays = []
        self.flags: list[np.ndarray] | None = [] if flags else None
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
            if self.flags is not None:
                self.flags.append(self._open_flags(folder, split, i, s))
        if not self.arrays:
            raise DataError(f"{folder}: split {split!r} has no shards")
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    @staticmethod
    def _open_flags(folder: Path, split: str, i: int, s: dict) -> np.ndarray:
        if not isinstance(s.get("flags_file"), str):
            raise DataError(f"{folder / 'meta.json'}: splits.{split}[{i}] has no \"flags_file\", expected "
                            f"one per shard in a {FORMAT_FLAGS} dataset")
        path = folder / s["flags_file"]
        if not path.is_file():
            raise DataError(f"{path}: flags file listed in meta.json is missing")
        size = path.stat().st_size
        if size != s["tokens"]:
            raise DataError(f"{path}: holds {size} flag bytes, meta.json says {s['tokens']} tokens "
                            f"(one byte per token; truncated?)")
        return np.memmap(path, dtype=FLAGS_DTYPE, mode="r")

    @property
    def has_flags(self) -> bool:
        return self.flags is not None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), across shard boundaries."""
        return self._slice(self.arrays, start, length)

    def slice_flags(self, start: int, length: int) -> np.ndarray:
        """FLAG_* bytes of tokens [start, start + length) (flagged datasets only)."""
        if self.flags is None:
            raise DataError(f"{self.name}: this dataset has no per-token flags (not built from chat data)")
        return self._slice(self.flags, start, length)

    def doc_starts(self) -> np.ndarray:
        """Positions of the DOC_START tokens, in order (flagged datasets only)."""
        if self.flags is None:
            raise DataError(f"{self.name}: this dataset has no per-token flags (not built from chat data)")
        return np.concatenate([np.flatnonzero(f & FLAG_DOC_START) + int(b)
                               for f, b in zip(self.flags, self.starts[:-1])])

    def _slice(self, arrays: list[np.ndarray], start: int, length: int) -> np.ndarray:
        out, pos, end = [], start, start + length
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            a, base = arrays[k], int(self.starts[k])
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
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: invalid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{meta_path}: not UTF-8 text (byte {e.start}: {e.reason}); a damaged file? "
                            f"re-run scripts/prepare_data.py") from e
        if not isinstance(self.meta, dict):
            raise DataError(f"{meta_path}: expected a JSON object, got {type(self.meta).__name__}")
        if self.meta.get("format") not in FORMATS:
            raise DataError(f"{meta_path}: format {self.meta.get('format')!r}, expected one of "
                            f"{', '.join(map(repr, FORMATS))}")
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

    @property
    def has_flags(self) -> bool:
        """Whether tokens carry FLAG_* bytes (a dataset built from chat sources)."""
        return self.meta["format"] == FORMAT_FLAGS

    def split(self, name: str) -> TokenSplit:
        if name not in self.meta["splits"]:
            raise DataError(f"{self.folder}: no split {name!r} (has {', '.join(self.meta['splits'])})")
        if name not in self._splits:
            sp = TokenSplit(self.folder, name, self.meta["splits"][name], flags=self.has_flags)
            if self._check_vocab is not None:
                top = sp.max_token()
                if top >= self._check_vocab:
                    raise DataError(f"{sp.name}: token id {top} >= the model's vocab_size {self._check_vocab}")
            self._splits[name] = sp
        return self._splits[name]
