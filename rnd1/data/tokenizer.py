"""The Qwen3 tokenizer on tiktoken, and a byte-level tokenizer for debug models.

Qwen3's tokenizer is byte-level BPE with GPT-2's byte-to-unicode alphabet, the Qwen split regex,
NFC normalisation and 26 added tokens (151643 <|endoftext|> ... 151668 </think>). tiktoken runs
the same BPE when given the token ranks, so ``load_tokenizer`` reads either a Hugging Face
tokenizer folder (tokenizer.json, or vocab.json + merges.txt) or a ``.tiktoken`` rank file, and
gives ids identical to Hugging Face ``tokenizers`` (tested on the real files).

The diffusion mask token is not part of Qwen3's tokenizer: RND1 uses id 151669, a spare row of
the model's padded 151,936-entry embedding. The tokenizer reserves it and decodes it as
``<|mask|>``; text is never encoded to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import tiktoken

# The Split pre-tokenizer pattern of Qwen2/Qwen3's tokenizer.json.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens (tokenizer_config.json "added_tokens_decoder"), in id order from 151643.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)
QWEN3_FIRST_ADDED_ID = 151643
RND1_MASK_ID = 151669
MASK_TOKEN = "<|mask|>"


class TokenizerError(ValueError):
    pass


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of every byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_bytes(token: str, where: str) -> bytes:
    table = _unicode_to_byte()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError as e:
        raise TokenizerError(f"{where}: token {token!r} has a character outside the byte-level alphabet") from e


class Tokenizer:
    """Common interface: encode, decode, encode_batch, eos_id, mask_id, vocab_size, identity()."""

    name: str
    eos_id: int
    mask_id: int
    vocab_size: int
    special_tokens: dict[str, int]

    def encode(self, text: str, *, allowed_special="all") -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def identity(self) -> str:
        raise NotImplementedError


class QwenTokenizer(Tokenizer):
    def __init__(self, ranks: dict[bytes, int], added: dict[str, int], *, name: str,
                 eos_token: str = "<|endoftext|>", mask_id: int = RND1_MASK_ID, mask_token: str = MASK_TOKEN):
        if eos_token not in added:
            raise TokenizerError(f"{name}: eos token {eos_token!r} is not among the added tokens")
        self.name = name
        self.special_tokens = dict(added)
        self._enc = tiktoken.Encoding(name=f"rnd1-{Path(name).name}", pat_str=QWEN_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=added)
        taken = set(ranks.values()) | set(added.values())
        if mask_id in taken:
            raise TokenizerError(f"{name}: mask id {mask_id} is already a token")
        self.mask_id, self.mask_token = mask_id, mask_token
        self.eos_id = added[eos_token]
        self.vocab_size = max(max(taken), mask_id) + 1
        h = hashlib.sha256()
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + tok)
        for tok, i in sorted(added.items(), key=lambda kv: kv[1]):
            h.update(i.to_bytes(4, "little") + tok.encode())
        h.update(f"mask={mask_id}".encode())
        self._identity = f"qwen-bpe-{len(ranks)}-{h.hexdigest()[:16]}"

    def encode(self, text: str, *, allowed_special="all") -> list[int]:
        text = unicodedata.normalize("NFC", text)
        if allowed_special == "none":
            return self._enc.encode(text, allowed_special=set(), disallowed_special=())
        return self._enc.encode(text, allowed_special=allowed_special, disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special="all", disallowed_special=())

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.mask_id not in ids:
            return self._enc.decode(ids)
        parts, run = [], []
        for i in ids:
            if i == self.mask_id:
                parts.append(self._enc.decode(run))
                parts.append(self.mask_token)
                run = []
            else:
                run.append(i)
        parts.append(self._enc.decode(run))
        return "".join(parts)

    def identity(self) -> str:
        return self._identity


class ByteTokenizer(Tokenizer):
    """Bytes 0..255, then <|endoftext|> (256) and <|mask|> (257): for debug models, no files needed."""

    def __init__(self):
        self.name = "byte"
        self.eos_id, self.mask_id, self.vocab_size = 256, 257, 258
        self.special_tokens = {"<|endoftext|>": 256, MASK_TOKEN: 257}

    def encode(self, text: str, *, allowed_special="all") -> list[int]:
        data = text.encode("utf-8")
        if allowed_special == "none" or "<|endoftext|>" not in text:
            return list(data)
        out = []
        for k, piece in enumerate(text.split("<|endoftext|>")):
            if k:
                out.append(self.eos_id)
            out.extend(piece.encode("utf-8"))
        return out

    def decode(self, ids) -> str:
        out = bytearray()
        text = []
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            else:
                text.append(out.decode("utf-8", errors="replace"))
                out = bytearray()
                text.append("<|endoftext|>" if i == self.eos_id else MASK_TOKEN)
        text.append(out.decode("utf-8", errors="replace"))
        return "".join(text)

    def identity(self) -> str:
        return "byte-258"


# --------------------------------------------------------------------------- loading
def _ranks_from_tiktoken_file(path: Path) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from e
    if not ranks:
        raise TokenizerError(f"{path}: no ranks")
    return ranks


def _ranks_from_vocab(vocab: dict[str, int], where: str) -> dict[bytes, int]:
    ranks = {}
    for tok, i in vocab.items():
        if not isinstance(i, int):
            raise TokenizerError(f"{where}: id of {tok!r} is not an integer")
        ranks[_token_bytes(tok, where)] = i
    return ranks


def _check_merges(path: Path, ranks: dict[bytes, int]) -> None:
    """Every merge must produce a token of the vocabulary (a cheap consistency check)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{lineno}: expected two tokens per merge, got {line[:60]!r}")
            merged = _token_bytes(parts[0] + parts[1], f"{path}:{lineno}")
            if merged not in ranks:
                raise TokenizerError(f"{path}:{lineno}: merge {line!r} yields a token missing from vocab.json")


def _added_from_dir(folder: Path, tokenizer_json: dict | None) -> dict[str, int]:
    added: dict[str, int] = {}
    if tokenizer_json is not None:
        for a in tokenizer_json.get("added_tokens", []):
            added[a["content"]] = a["id"]
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{cfg_path}: invalid JSON ({e})") from e
        for i, a in (cfg.get("added_tokens_decoder") or {}).items():
            added[a["content"]] = int(i)
    if not added:
        added = {t: QWEN3_FIRST_ADDED_ID + k for k, t in enumerate(QWEN3_ADDED_TOKENS)}
    return added


def load_tokenizer(path: str | Path | None, *, mask_id: int = RND1_MASK_ID) -> Tokenizer:
    """``"byte"``/None -> ByteTokenizer; a folder -> Qwen3 tokenizer files; a .tiktoken file."""
    if path is None or str(path) == "byte":
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer path {p} does not exist")
    if p.is_file():
        if p.suffix != ".tiktoken":
            raise TokenizerError(f"{p}: expected a tokenizer folder or a .tiktoken rank file")
        ranks = _ranks_from_tiktoken_file(p)
        added = {t: QWEN3_FIRST_ADDED_ID + k for k, t in enumerate(QWEN3_ADDED_TOKENS)}
        return QwenTokenizer(ranks, added, name=str(p), mask_id=mask_id)
    tj_path = p / "tokenizer.json"
    if tj_path.is_file():
        try:
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
            model = tj["model"]
        except (json.JSONDecodeError, KeyError) as e:
            raise TokenizerError(f"{tj_path}: not a Hugging Face tokenizer.json ({e})") from e
        if model.get("type") != "BPE":
            raise TokenizerError(f"{tj_path}: model type {model.get('type')!r}; expected BPE")
        ranks = _ranks_from_vocab(model["vocab"], str(tj_path))
        added = _added_from_dir(p, tj)
    elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        try:
            vocab = json.loads((p / "vocab.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{p / 'vocab.json'}: invalid JSON ({e})") from e
        ranks = _ranks_from_vocab(vocab, str(p / "vocab.json"))
        _check_merges(p / "merges.txt", ranks)
        added = _added_from_dir(p, None)
    else:
        raise TokenizerError(f"{p}: no tokenizer.json, and no vocab.json + merges.txt")
    return QwenTokenizer(ranks, {k: v for k, v in added.items() if v not in ranks.values()},
                         name=str(p), mask_id=mask_id)
