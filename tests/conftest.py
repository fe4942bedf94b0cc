"""Shared fixtures: a small byte-level dataset built from real text (the stdlib source), and the
location of the optional Qwen3 tokenizer files shipped beside the repo."""

import os
import tempfile
from pathlib import Path

# The Triton kernels are tested on CPU with Triton's interpreter. It must be switched on before
# triton.jit decorates anything (CPU training takes the reference path either way).
os.environ.setdefault("TRITON_INTERPRET", "1")
# every run the tests start shares one measured-backend cache (rnd1/kernels/autotune.py), outside ~/.cache
os.environ.setdefault("RND1_AUTOTUNE_CACHE", os.path.join(tempfile.mkdtemp(prefix="rnd1-autotune-"), "autotune.json"))

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
QWEN_TOKENIZER = SHARED_DATA / "qwen3_tokenizer"
QWEN_TIKTOKEN = SHARED_DATA / "qwen.tiktoken"


def need_qwen_files():
    if not QWEN_TOKENIZER.is_dir() or not QWEN_TIKTOKEN.is_file():
        pytest.skip(f"the real Qwen3 tokenizer files are not present at {SHARED_DATA} "
                    f"(they ship beside the repo, not in it)")


@pytest.fixture(scope="session")
def byte_dataset(tmp_path_factory):
    """~300 stdlib files tokenised at byte level (train + val splits)."""
    from rnd1.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "stdlib_byte_small"
    return prepare(["stdlib"], "byte", out, val_fraction=0.05, workers=1, max_docs=300, quiet=True)
