"""The tiktoken-based Qwen3 tokenizer gives Hugging Face ``tokenizers``' ids on the real files."""

import shutil
import sysconfig
import unicodedata
from pathlib import Path

import pytest

from rnd1.data.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
QWEN_DIR, QWEN_TIKTOKEN = SHARED / "qwen3_tokenizer", SHARED / "qwen.tiktoken"

needs_qwen = pytest.mark.skipif(not QWEN_DIR.is_dir() or not QWEN_TIKTOKEN.is_file(),
                                reason=f"real Qwen3 tokenizer files not present at {SHARED} (shipped beside "
                                       f"the repo, not in it)")

EXTRA = [
    "你好，世界！这是一个测试。日本語のテキストも。한국어 문장.",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧‍👦 and a zero width joiner",
    "combining: e\u0301 a\u0308 o\u0302 \u212b (Angstrom) \u1e9b\u0323",
    "   mixed\twhitespace\r\n\r\n\n\t\t  end   ",
    "digits 1234567890 0000000001 3.14159265358979 1e-8 2_000_000",
    "special <|endoftext|> tokens <|im_start|>system\nhi<|im_end|> <think>reason</think> <tool_call>",
    "it's we're they've I'm you'll he'd IT'S",
    "",
    " leading space and trailing space ",
]


def _corpus(min_bytes=1_050_000):
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(root.glob("*.py")):
        t = p.read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        total += len(t.encode())
        if total >= min_bytes:
            break
    return texts + EXTRA * 20


@needs_qwen
def test_ids_match_huggingface_tokenizers_over_1mb():
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(QWEN_DIR / "tokenizer.json"))
    texts = _corpus()
    assert sum(len(t.encode()) for t in texts) >= 1_000_000
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    for tok in (load_tokenizer(QWEN_DIR), load_tokenizer(QWEN_TIKTOKEN)):
        got = tok.encode_batch(texts)
        bad = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
        assert not bad, f"{tok.name}: {len(bad)} texts differ, first: {texts[bad[0]][:200]!r}"
        for t in EXTRA:
            assert tok.decode(tok.encode(t)) == unicodedata.normalize("NFC", t)


@needs_qwen
def test_vocab_and_merges_without_tokenizer_json(tmp_path):
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(QWEN_DIR / f, tmp_path / f)
    a, b = load_tokenizer(tmp_path), load_tokenizer(QWEN_DIR)
    assert a.identity() == b.identity()
    text = "def f(x):\n    return x ** 2  # 平方\n<|im_end|>"
    assert a.encode(text) == b.encode(text)


@needs_qwen
def test_special_ids_and_mask():
    tok = load_tokenizer(QWEN_DIR)
    assert tok.eos_id == 151643 and tok.mask_id == 151669 and tok.vocab_size == 151670
    assert tok.special_tokens["<|im_end|>"] == 151645 and tok.special_tokens["</think>"] == 151668
    assert tok.encode("<|im_start|>") == [151644]
    assert len(tok.encode("<|im_start|>", allowed_special="none")) > 1
    assert tok.decode([9707, 151669, 1879]) == "Hello<|mask|> world"
    assert load_tokenizer(QWEN_TIKTOKEN).identity() == tok.identity()


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 258
    text = "héllo <|endoftext|> wörld 😀"
    ids = tok.encode(text)
    assert ids.count(tok.eos_id) == 1 and tok.decode(ids) == text
    assert tok.decode([104, 105, tok.mask_id]) == "hi<|mask|>"


def test_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json, and no vocab.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2: expected '<base64 token> <rank>'"):
        load_tokenizer(bad)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
