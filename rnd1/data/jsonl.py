"""Reading JSON-lines files with errors that name the file and line (data sources, task sets)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line. A line that is not a JSON object
    raises ``error`` naming ``path:line``."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not JSON ({e})") from e
            if not isinstance(rec, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec
