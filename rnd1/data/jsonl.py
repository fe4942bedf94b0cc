"""Reading JSON-lines files with errors that name the file and line (data sources, task sets)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line. A line that is not UTF-8 or not a
    JSON object raises ``error`` naming ``path:line`` (and, for bad bytes, the file's byte offset)."""
    offset = 0  # byte offset of the current line's start in the file
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{lineno}: not UTF-8 at byte offset {offset + e.start} "
                            f"(byte {raw[e.start:e.start + 1]!r}: {e.reason})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not JSON ({e})") from e
            if not isinstance(rec, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec
