"""The Qwen3 tokenizer on tiktoken, and a byte-level tokenizer for debug models.

Qwen3's tokenizer is byte-level BPE over GPT-2's byte-to-unicode alphabet, with the Qwen split
regex, NFC normalisation and 26 added tokens (151643 <|endoftext|> ... 151668 </think>). tiktoken
runs the same BPE when given the token ranks, so ``load_tokenizer`` reads a Hugging Face tokenizer
folder (tokenizer.json, or vocab.json + merges.txt) or a ``.tiktoken`` rank file and gives the ids
of Hugging Face ``tokenizers`` (tested on the real files), without depending on ``tokenizers``.

The diffusion mask token is not part of Qwen3's tokenizer: RND1 uses id 151669, a spare row of the
model's padded 151,936-entry embedding. The tokenizer reserves it (``mask_id``, counted in
``vocab_size``) and decodes it as ``<|mask|>``; text is never encoded to it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import unicodedata
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import tiktoken

# The Split pre-tokenizer regex of Qwen2/Qwen3's tokenizer.json (used for .tiktoken files).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens (tokenizer_config.json "added_tokens_decoder"), ids 151643, 151644, ...
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
QWEN3_FIRST_ADDED_ID = 151643
QWEN3_EOS = "<|endoftext|>"
RND1_MASK_ID = 151669
MASK_TOKEN = "<|mask|>"
BYTE_VOCAB_SIZE = 258  # 256 bytes + <|endoftext|> + <|mask|>


class TokenizerError(ValueError):
    """Bad tokenizer files or arguments; the message names the file (and line) at fault."""


def qwen3_added_tokens() -> dict[str, int]:
    return {t: QWEN3_FIRST_ADDED_ID + k for k, t in enumerate(QWEN3_ADDED_TOKENS)}


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68
    bytes (controls, space, 0x7f-0xa0, 0xad) map in byte order to U+0100, U+0101, ..."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return table


def _token_bytes(token: str, where: str) -> bytes:
    table = _unicode_to_byte()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError as e:
        raise TokenizerError(f"{where}: token {token!r} has character {e.args[0]!r}, which is not in "
                             f"the GPT-2 byte-level alphabet") from None


def _check_ids(ids, vocab_size: int, name: str) -> list[int]:
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise TokenizerError(f"{name}: cannot decode id {bad[0]}: expected 0 <= id < {vocab_size}")
    return out


class Tokenizer:
    """What the data pipeline and trainer use: encode/decode, the eos and mask ids, the number of
    ids (``vocab_size``) and an ``identity()`` recorded in data shards to catch mismatches."""

    name: str
    eos_id: int
    mask_id: int
    mask_token: str
    vocab_size: int
    special_tokens: dict[str, int]

    def encode(self, text: str, *, allowed_special="all") -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], num_threads: int = 2, *,
                     allowed_special="all") -> list[list[int]]:
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def identity(self) -> str:
        raise NotImplementedError

    def _allowed(self, allowed_special) -> set[str]:
        """"all" | "none" | a collection of special-token strings -> the set to recognise."""
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                return set(self.special_tokens)
            if allowed_special == "none":
                return set()
            raise TokenizerError(f"{self.name}: allowed_special={allowed_special!r}; expected 'all', "
                                 f"'none' or a set of special-token strings")
        allowed = set(allowed_special)
        unknown = sorted(allowed - set(self.special_tokens))
        if unknown:
            raise TokenizerError(f"{self.name}: allowed_special has {unknown[0]!r}, which is not a "
                                 f"special token of this tokenizer")
        return allowed


class QwenTokenizer(Tokenizer):
    """Byte-level BPE (tiktoken) with NFC normalisation; special-token strings in the text become
    their ids by default, as Hugging Face ``tokenizers`` does for added tokens."""

    def __init__(self, ranks: dict[bytes, int], added: dict[str, int], *, name: str,
                 pattern: str = QWEN_PATTERN, eos_token: str = QWEN3_EOS, mask_id: int = RND1_MASK_ID,
                 mask_token: str = MASK_TOKEN):
        if eos_token not in added:
            raise TokenizerError(f"{name}: eos token {eos_token!r} is not among the added tokens "
                                 f"({', '.join(sorted(added)[:5])}, ...)")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"{name}: byte 0x{missing[0]:02x} has no token; byte-level BPE needs "
                                 f"all 256 single bytes")
        taken = set(ranks.values())
        clash = [t for t, i in added.items() if i in taken]
        if clash:
            raise TokenizerError(f"{name}: added token {clash[0]!r} reuses id {added[clash[0]]} of a "
                                 f"BPE token")
        taken |= set(added.values())
        if not isinstance(mask_id, int) or mask_id < 0 or mask_id in taken:
            raise TokenizerError(f"{name}: mask id {mask_id!r} must be a non-negative int not used by "
                                 f"any token")
        if mask_token in added:
            raise TokenizerError(f"{name}: mask token {mask_token!r} is already an added token")
        self.name = name
        self.special_tokens = dict(added)
        self.eos_id = added[eos_token]
        self.mask_id, self.mask_token = mask_id, mask_token
        self.vocab_size = max(max(taken), mask_id) + 1
        try:
            self._enc = tiktoken.Encoding(name=f"rnd1:{name}", pat_str=pattern,
                                          mergeable_ranks=ranks, special_tokens=added)
        except ValueError as e:
            raise TokenizerError(f"{name}: tiktoken rejected the vocabulary or regex ({e})") from e
        self._identity = self._hash(ranks, added, pattern)

    def _hash(self, ranks, added, pattern) -> str:
        h = hashlib.sha256(pattern.encode())
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(tok).to_bytes(2, "little") + tok)
        for tok, i in sorted(added.items(), key=lambda kv: kv[1]):
            h.update(i.to_bytes(4, "little") + tok.encode() + b"\0")
        h.update(f"eos={self.eos_id};mask={self.mask_id}:{self.mask_token}".encode())
        return f"qwen-bpe-{len(ranks)}-{h.hexdigest()[:16]}"

    def encode(self, text: str, *, allowed_special="all") -> list[int]:
        return self._enc.encode(unicodedata.normalize("NFC", text),
                                allowed_special=self._allowed(allowed_special), disallowed_special=())

    def encode_batch(self, texts: list[str], num_threads: int = 2, *,
                     allowed_special="all") -> list[list[int]]:
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        return self._enc.encode_batch(texts, num_threads=num_threads,
                                      allowed_special=self._allowed(allowed_special), disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        ids = _check_ids(ids, self.vocab_size, self.name)
        parts, run = [], []
        for i in ids:
            if i == self.mask_id:
                parts += [self._enc.decode(run), self.mask_token]
                run = []
            else:
                run.append(i)
        try:
            parts.append(self._enc.decode(run))
        except KeyError as e:  # an unused id below vocab_size
            raise TokenizerError(f"{self.name}: cannot decode: {e.args[0]}") from None
        return "".join(parts)

    def identity(self) -> str:
        return self._identity


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, <|endoftext|> 256, <|mask|> 257: for debug models with no tokenizer
    files. ``vocab_size`` may be larger (unused ids) to match a small model's embedding."""

    def __init__(self, vocab_size: int = BYTE_VOCAB_SIZE, *, mask_token: str = MASK_TOKEN):
        if not isinstance(vocab_size, int) or vocab_size < BYTE_VOCAB_SIZE:
            raise TokenizerError(f"byte tokenizer: vocab_size={vocab_size!r}; expected an int >= "
                                 f"{BYTE_VOCAB_SIZE} (256 bytes + eos + mask)")
        if mask_token == QWEN3_EOS:
            raise TokenizerError(f"byte tokenizer: mask token {mask_token!r} is the eos token")
        self.name, self.vocab_size = "byte", vocab_size
        self.eos_id, self.mask_id, self.mask_token = 256, 257, mask_token
        self.special_tokens = {QWEN3_EOS: 256}

    def encode(self, text: str, *, allowed_special="all") -> list[int]:
        if QWEN3_EOS not in self._allowed(allowed_special):
            return list(text.encode("utf-8"))
        out: list[int] = []
        for k, piece in enumerate(text.split(QWEN3_EOS)):
            if k:
                out.append(self.eos_id)
            out.extend(piece.encode("utf-8"))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = _check_ids(ids, self.vocab_size, self.name)
        text, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            if i > self.mask_id:
                raise TokenizerError(f"byte tokenizer: cannot decode unused id {i}")
            text += [run.decode("utf-8", errors="replace"), QWEN3_EOS if i == self.eos_id else self.mask_token]
            run = bytearray()
        text.append(run.decode("utf-8", errors="replace"))
        return "".join(text)

    def identity(self) -> str:
        return f"byte-{self.vocab_size}"


# --------------------------------------------------------------------------- reading files
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: invalid JSON at column {e.colno} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e})") from None


def _ranks_from_tiktoken_file(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok_b64, rank_s = line.split()
                tok, rank = base64.b64decode(tok_b64, validate=True), int(rank_s)
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got "
                                     f"{line.strip()[:60].decode('utf-8', 'replace')!r}") from None
            if rank < 0 or not tok:
                raise TokenizerError(f"{path}:{lineno}: empty token or negative rank {rank}")
            if tok in ranks or rank in seen:
                first = seen.get(rank) or seen[ranks[tok]]
                raise TokenizerError(f"{path}:{lineno}: token or rank {rank} already given on line {first}")
            ranks[tok], seen[rank] = rank, lineno
    if not ranks:
        raise TokenizerError(f"{path}: no '<base64 token> <rank>' lines")
    return ranks


def _ranks_from_vocab(vocab, where: str) -> dict[bytes, int]:
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{where}: expected a JSON object mapping token -> id")
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(f"{where}: id of {tok!r} is {i!r}; expected a non-negative int")
        ranks[_token_bytes(tok, where)] = i  # the byte-level map is one-to-one: no collisions
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{where}: two tokens share an id")
    return ranks


def _merges_txt(path: Path) -> Iterator[tuple[str, list[str]]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise TokenizerError(f"{path}:{lineno}: not UTF-8 text") from None
            if line and not (lineno == 1 and line.startswith("#version")):
                yield f"{path}:{lineno}", line.split(" ")


def _merges_json(merges, where: str) -> Iterator[tuple[str, list[str]]]:
    if not isinstance(merges, list):
        raise TokenizerError(f"{where}: model.merges must be a list")
    for k, m in enumerate(merges):
        yield f"{where}: model.merges[{k}]", (m.split(" ") if isinstance(m, str) else m)


def _check_merges(merges: Iterable[tuple[str, list[str]]], ranks: dict[bytes, int]) -> None:
    """tiktoken merges by token rank, Hugging Face by merge order: the two agree when every merge
    joins two vocabulary tokens into one whose id grows with the merge's position."""
    last = -1
    for where, parts in merges:
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise TokenizerError(f"{where}: expected two tokens separated by one space, got {parts!r}")
        left, right = (_token_bytes(p, where) for p in parts)
        for piece in (left, right, left + right):
            if piece not in ranks:
                raise TokenizerError(f"{where}: merge {' '.join(parts)!r} uses or yields a token missing "
                                     f"from the vocabulary")
        rank = ranks[left + right]
        if rank <= last:
            raise TokenizerError(f"{where}: merge {' '.join(parts)!r} yields id {rank}, not above the "
                                 f"previous merge's id {last}; rank-based BPE (tiktoken) needs merge "
                                 f"order == id order")
        last = rank


def _added_tokens(folder: Path, tokenizer_json: dict | None) -> dict[str, int]:
    """Added tokens from tokenizer.json "added_tokens" and tokenizer_config.json
    "added_tokens_decoder"; the embedded Qwen3 list when neither file has any."""
    found: dict[str, tuple[int, str]] = {}

    def add(entry, tok_id, where):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
            raise TokenizerError(f"{where}: expected an object with a non-empty 'content' string")
        for flag in ("lstrip", "rstrip", "single_word"):
            if entry.get(flag):
                raise TokenizerError(f"{where}: added token {entry['content']!r} sets {flag}=true, which "
                                     f"this tokenizer does not implement")
        content = entry["content"]
        try:
            tok_id = int(tok_id)
        except (TypeError, ValueError):
            raise TokenizerError(f"{where}: id {tok_id!r} of {content!r} is not an integer") from None
        if content in found and found[content][0] != tok_id:
            raise TokenizerError(f"{where}: {content!r} has id {tok_id} but {found[content][1]} gives "
                                 f"{found[content][0]}")
        found[content] = (tok_id, where)

    if tokenizer_json is not None:
        for k, a in enumerate(tokenizer_json.get("added_tokens") or []):
            add(a, a.get("id") if isinstance(a, dict) else None, f"{folder / 'tokenizer.json'}: added_tokens[{k}]")
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        for i, a in (cfg.get("added_tokens_decoder") or {}).items():
            add(a, i, f"{cfg_path}: added_tokens_decoder[{i}]")
    added = {t: i for t, (i, _) in found.items()}
    ids = sorted(added.values())
    if len(set(ids)) != len(ids):
        raise TokenizerError(f"{folder}: two added tokens share an id")
    return added or qwen3_added_tokens()


def _from_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int], str]:
    tj = _read_json(path)
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or "vocab" not in model:
        got = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(f"{path}: not a Hugging Face BPE tokenizer.json (model.type {got!r}; "
                             f"expected 'BPE' with a vocab)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path}: byte_fallback / subword prefix or suffix are not byte-level BPE")
    normalizer = tj.get("normalizer")
    if normalizer is not None and (not isinstance(normalizer, dict) or normalizer.get("type") != "NFC"):
        got = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise TokenizerError(f"{path}: normalizer {got!r}; only NFC is supported")
    ranks = _ranks_from_vocab(model["vocab"], f"{path}: model.vocab")
    _check_merges(_merges_json(model.get("merges", []), str(path)), ranks)
    return ranks, _added_tokens(path.parent, tj), _split_pattern(tj, path)


def _split_pattern(tj: dict, path: Path) -> str:
    """The regex of the Split pre-tokenizer, which tiktoken applies in its place. A ByteLevel step
    that splits with its own (GPT-2) regex, or no Split at all, is a different tokenizer."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(isinstance(st, dict) and st.get("type") == "ByteLevel" and st.get("use_regex") for st in steps):
        raise TokenizerError(f"{path}: pre_tokenizer ByteLevel has use_regex=true (GPT-2 style); "
                             f"expected a Qwen-style Split regex with use_regex=false")
    splits = [st for st in steps if isinstance(st, dict) and st.get("type") == "Split"]
    pattern = (splits[0].get("pattern") or {}).get("Regex") if len(splits) == 1 else None
    if not isinstance(pattern, str) or splits[0].get("invert") or splits[0].get("behavior") != "Isolated":
        raise TokenizerError(f"{path}: expected one isolated, non-inverted Split pre-tokenizer with a "
                             f"Regex; got {json.dumps(pre)[:200]}")
    return pattern


def load_tokenizer(path: str | Path | None, *, mask_id: int | None = None, mask_token: str = MASK_TOKEN,
                   eos_token: str = QWEN3_EOS, byte_vocab_size: int = BYTE_VOCAB_SIZE) -> Tokenizer:
    """``"byte"`` or None -> ByteTokenizer(byte_vocab_size); a folder with tokenizer.json (or
    vocab.json + merges.txt) or a ``.tiktoken`` rank file -> QwenTokenizer. ``mask_id`` defaults to
    RND1's 151669 (257 for bytes; the byte tokenizer's layout is fixed). A checkpoint folder that
    rnd1 exported holds ``rnd1_tokenizer.json``, which says how to rebuild the run's tokenizer."""
    if path is None or str(path) == "byte":
        if mask_id not in (None, 257):
            raise TokenizerError(f"byte tokenizer: mask_id is fixed at 257, got {mask_id}")
        return ByteTokenizer(byte_vocab_size, mask_token=mask_token)
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer path {p} does not exist; expected 'byte', a Qwen3 tokenizer "
                             f"folder or a .tiktoken file")
    if p.is_dir() and (p / TOKENIZER_DESCRIPTOR).is_file():
        return _from_descriptor(p / TOKENIZER_DESCRIPTOR, mask_id)
    return _load_bpe(p, RND1_MASK_ID if mask_id is None else mask_id, mask_token, eos_token)


def _load_bpe(p: Path, mask_id: int, mask_token: str, eos_token: str) -> QwenTokenizer:
    if p.is_file():
        if p.suffix != ".tiktoken":
            raise TokenizerError(f"{p}: expected a tokenizer folder or a .tiktoken rank file")
        ranks, added, pattern = _ranks_from_tiktoken_file(p), qwen3_added_tokens(), QWEN_PATTERN
    elif (p / "tokenizer.json").is_file():
        ranks, added, pattern = _from_tokenizer_json(p / "tokenizer.json")
    elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        ranks = _ranks_from_vocab(_read_json(p / "vocab.json"), str(p / "vocab.json"))
        _check_merges(_merges_txt(p / "merges.txt"), ranks)
        added, pattern = _added_tokens(p, None), QWEN_PATTERN
    else:
        raise TokenizerError(f"{p}: no tokenizer.json, and no vocab.json + merges.txt")
    # Hugging Face folders may list a base token as "added" too; it then already is a BPE token.
    inverse = {i: b for b, i in ranks.items()}
    added = {t: i for t, i in added.items() if inverse.get(i) != t.encode()}
    return QwenTokenizer(ranks, added, name=str(p), pattern=pattern, eos_token=eos_token,
                         mask_id=mask_id, mask_token=mask_token)


# --------------------------------------------------------------------------- exported checkpoints
TOKENIZER_DESCRIPTOR = "rnd1_tokenizer.json"


def describe_tokenizer(tok: Tokenizer, file: str | None = None) -> dict:
    """What an exported checkpoint folder records so that ``load_tokenizer(folder)`` rebuilds
    ``tok``: the byte tokenizer has no files at all, a ``.tiktoken`` rank file (``file``, copied
    beside) knows nothing of the mask id, and the identity catches files edited after the export."""
    eos = next(t for t, i in tok.special_tokens.items() if i == tok.eos_id)
    return {"kind": "byte" if isinstance(tok, ByteTokenizer) else "bpe", "file": file,
            "vocab_size": tok.vocab_size, "eos_token": eos, "eos_token_id": tok.eos_id,
            "mask_token": tok.mask_token, "mask_token_id": tok.mask_id, "identity": tok.identity()}


def _from_descriptor(path: Path, mask_id: int | None) -> Tokenizer:
    d = _read_json(path)
    keys = ("kind", "file", "vocab_size", "eos_token", "mask_token", "mask_token_id", "identity")
    if not isinstance(d, dict) or d.get("kind") not in ("byte", "bpe") or any(k not in d for k in keys):
        raise TokenizerError(f"{path}: expected an object with kind 'byte' or 'bpe' and keys {', '.join(keys)}")
    if mask_id is not None and mask_id != d["mask_token_id"]:
        raise TokenizerError(f"{path}: mask_id {mask_id} asked for, but this checkpoint was trained with "
                             f"mask id {d['mask_token_id']}")
    if d["kind"] == "byte":
        tok: Tokenizer = ByteTokenizer(d["vocab_size"], mask_token=d["mask_token"])
    else:
        src = path.parent / d["file"] if d["file"] else path.parent
        if not src.exists():
            raise TokenizerError(f"{path}: names tokenizer file {d['file']!r}, which is not in {path.parent}")
        tok = _load_bpe(src, d["mask_token_id"], d["mask_token"], d["eos_token"])
    if tok.identity() != d["identity"]:
        raise TokenizerError(f"{path}: the tokenizer files give identity {tok.identity()} but the export "
                             f"recorded {d['identity']} (files changed after the export?)")
    return tok
