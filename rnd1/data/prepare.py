"""Tokenise text sources into a token dataset (see ``rnd1.data.shards``).

Sources (one document per text file, or per JSONL line):
- ``stdlib``: every .py file of the running Python's standard library (about 31 MB: a real
  corpus present on every machine, used by the debug configs);
- a text file, or a glob of them (``data/*.txt``);
- ``jsonl:PATH[:FIELD]`` or a ``.jsonl`` path (field ``text`` unless given);
- ``chat:PATH`` (or a glob): JSONL conversations, ``{"messages": [...]}`` or ``{"prompt", "response"}``,
  rendered with Qwen3's chat template (``rnd1.data.chat``). When any source is chat, every shard
  gets per-token flags (which tokens are supervised, where conversations start), so a fine-tune
  scores only the responses; plain-text documents mixed in are supervised everywhere.

Documents are assigned to the validation split by a seeded draw (``val_fraction``), tokenised by
worker processes, and written to shards; ``meta.json`` is written last, so an interrupted run
leaves no dataset that looks finished.
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from rnd1.data.chat import encode_conversation, messages_from_record
from rnd1.data.jsonl import read_jsonl
from rnd1.data.shards import DataError, ShardWriter, write_meta
from rnd1.data.tokenizer import load_tokenizer


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _paths(source: str) -> list[str]:
    paths = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if not paths:
        raise DataError(f"data source {source!r}: no files match")
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"data source {source!r}: {p} is not a file")
    return paths


def iter_documents(source: str, jsonl_field: str = "text"):
    """Yield (origin, document) for one source spec: the text, or for ``chat:`` sources the
    checked list of messages (a bad record raises DataError naming ``path:line``)."""
    if source.startswith("chat:"):
        for path in _paths(source[len("chat:"):]):
            for lineno, rec in read_jsonl(path, DataError):
                yield f"{path}:{lineno}", messages_from_record(rec, f"{path}:{lineno}")
        return
    if source == "stdlib":
        for p in stdlib_files():
            yield str(p), p.read_text(encoding="utf-8", errors="replace")
        return
    field = jsonl_field
    if source.startswith("jsonl:"):
        rest = source[len("jsonl:"):]
        path, _, f = rest.partition(":") if not Path(rest).exists() else (rest, "", "")
        source, field = path, f or jsonl_field
    for path in _paths(source):
        p = Path(path)
        if p.suffix == ".jsonl" or field != jsonl_field or source.endswith(".jsonl"):
            for lineno, rec in read_jsonl(p, DataError):
                if field not in rec:
                    raise DataError(f"{p}:{lineno}: no field {field!r} (fields: {', '.join(rec)})")
                yield f"{p}:{lineno}", str(rec[field])
        else:
            yield str(p), p.read_text(encoding="utf-8", errors="replace")


_WORKER_TOK = None


def _init_worker(tokenizer_path: str):
    global _WORKER_TOK
    _WORKER_TOK = load_tokenizer(tokenizer_path)


def _encode(doc) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, loss mask or None): plain text never turns into special tokens; a conversation is
    rendered with them and gets its loss mask."""
    if isinstance(doc, str):
        return np.asarray(_WORKER_TOK.encode(doc, allowed_special="none"), dtype=np.uint32), None
    ids, loss = encode_conversation(doc, _WORKER_TOK)
    return np.asarray(ids, dtype=np.uint32), np.asarray(loss, dtype=bool)


class _Progress:
    """tqdm when installed, otherwise a line every few seconds (tqdm is not a dependency)."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="doc", file=sys.stdout)
        except ImportError:
            self._bar = None
        self.total, self.desc, self.n, self.tokens, self._last = total, desc, 0, 0, 0.0

    def update(self, tokens: int):
        self.n += 1
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(1)
        elif time.time() - self._last > 2 or self.n == self.total:
            self._last = time.time()
            print(f"{self.desc}: {self.n}/{self.total} docs, {self.tokens:,} tokens", flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def prepare(sources: list[str], tokenizer_path: str, out_dir: str | Path, *, val_fraction: float = 0.01,
            seed: int = 0, workers: int = 2, shard_tokens: int = 1 << 26, max_docs: int = 0,
            jsonl_field: str = "text", overwrite: bool = False, quiet: bool = False) -> Path:
    """Build a dataset folder; returns it. An existing complete dataset is left untouched unless
    ``overwrite``; an incomplete one (no meta.json) is rebuilt."""
    out = Path(out_dir)
    if (out / "meta.json").is_file() and not overwrite:
        if not quiet:
            print(f"dataset {out} exists; leaving it untouched (pass --overwrite to rebuild)")
        return out
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer_path)
    docs = []
    for source in sources:
        for origin, doc in iter_documents(source, jsonl_field):
            if not isinstance(doc, str) or doc.strip():
                docs.append(doc)
            if max_docs and len(docs) >= max_docs:
                break
        if max_docs and len(docs) >= max_docs:
            break
    if not docs:
        raise DataError(f"data sources {sources}: no non-empty documents")
    rng = np.random.default_rng(seed)
    is_val = rng.random(len(docs)) < val_fraction
    if val_fraction > 0 and not is_val.any():
        is_val[rng.integers(len(docs))] = True
    if is_val.all():
        is_val[0] = False

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flags = any(s.startswith("chat:") for s in sources)
    writers = {s: ShardWriter(tmp, s, tok.eos_id, shard_tokens, flags=flags) for s in ("train", "val")}
    progress = _Progress(len(docs), f"tokenising into {out}") if not quiet else None
    if workers > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            results = pool.imap(_encode, docs, chunksize=16)
            for val, (ids, loss) in zip(is_val, results):
                writers["val" if val else "train"].add(ids, loss)
                if progress:
                    progress.update(len(ids))
    else:
        _init_worker(str(tokenizer_path))
        for val, doc in zip(is_val, docs):
            ids, loss = _encode(doc)
            writers["val" if val else "train"].add(ids, loss)
            if progress:
                progress.update(len(ids))
    if progress:
        progress.close()
    for w in writers.values():
        w.flush()
    splits = {s: w.shards for s, w in writers.items() if w.shards}
    write_meta(tmp, tokenizer_identity=tok.identity(), vocab_size=tok.vocab_size, eos_id=tok.eos_id,
               splits=splits, sources=list(sources))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if not quiet:
        n = {s: sum(x.tokens for x in v) for s, v in splits.items()}
        print(f"wrote {out}: " + ", ".join(f"{s} {t:,} tokens" for s, t in n.items()), flush=True)
    return out
