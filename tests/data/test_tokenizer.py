"""The tiktoken-based Qwen3 tokenizer gives Hugging Face ``tokenizers``' ids on the real files,
whichever way it is loaded; bad files fail with the file and line named."""

import json
import shutil
import sysconfig
import unicodedata
from pathlib import Path

import pytest

from rnd1.data.tokenizer import (QWEN3_ADDED_TOKENS, QWEN_PATTERN, ByteTokenizer, TokenizerError,
                                 _unicode_to_byte, load_tokenizer)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # <repo>/../shared/data
QWEN_DIR, QWEN_TIKTOKEN = SHARED / "qwen3_tokenizer", SHARED / "qwen.tiktoken"

needs_qwen = pytest.mark.skipif(not QWEN_DIR.is_dir() or not QWEN_TIKTOKEN.is_file(),
                                reason=f"real Qwen3 tokenizer files not present at {SHARED} (they ship "
                                       f"beside the repo, not in it)")

EXTRA = [
    "你好，世界！这是一个测试。日本語のテキストも。한국어 문장. 繁體中文與简体中文混合。",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧‍👦 and a zero width joiner; keycap 1️⃣ flags 🏳️‍🌈",
    "combining: e\u0301 a\u0308 o\u0302 \u212b (Angstrom) \u1e9b\u0323 \u1100\u1161\u11a8 (jamo) "
    "A\u030a\u0301 cafe\u0301",
    "   mixed\twhitespace\r\n\r\n\n\t\t  end   \u00a0nbsp\u2003em\u3000ideographic \x0b\x0c",
    "digits " + "1234567890" * 30 + " 0000000001 3.14159265358979 1e-8 2_000_000 ١٢٣ ٤٥٦",
    "special <|endoftext|> tokens <|im_start|>system\nhi<|im_end|> <think>reason</think> "
    "<tool_call>{}</tool_call><|fim_prefix|>a<|fim_suffix|>b<|fim_middle|> <|im_start|x",
    "it's we're they've I'm you'll he'd IT'S We'RE 's's",
    "",
    " leading space and trailing space ",
    "\n\n\n    \n\t\n",
    "Ünïcödé Ελληνικά Кириллица עברית العربية हिन्दी ไทย",
]


def _corpus(min_bytes=1_050_000):
    """Standard-library sources, sorted by path so every run uses the same files, plus EXTRA."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(root.glob("*.py")):
        t = p.read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        total += len(t.encode())
        if total >= min_bytes:
            break
    return texts + EXTRA * 20


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN_DIR)


@needs_qwen
@pytest.mark.parametrize("source", ["dir", "tiktoken", "vocab+merges"])
def test_ids_match_huggingface_tokenizers_over_1mb(source, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    if source == "vocab+merges":
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(QWEN_DIR / f, tmp_path / f)
    tok = load_tokenizer({"dir": QWEN_DIR, "tiktoken": QWEN_TIKTOKEN, "vocab+merges": tmp_path}[source])
    texts = _corpus()
    assert sum(len(t.encode()) for t in texts) >= 1_000_000
    assert any(unicodedata.normalize("NFC", t) != t for t in EXTRA)  # NFC really is exercised

    hf = HFTokenizer.from_file(str(QWEN_DIR / "tokenizer.json"))
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    got = tok.encode_batch(texts)
    bad = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert len(got) == len(expected) and not bad, \
        f"{tok.name}: {len(bad)} texts differ, first: {texts[bad[0]][:200]!r}"
    assert [tok.encode(t) for t in EXTRA] == expected[-len(EXTRA):]
    assert any(151644 in ids for ids in got) and max(max(ids) for ids in got if ids) < 151669
    for t, ids in zip(texts, got):
        assert tok.decode(ids) == unicodedata.normalize("NFC", t)


@needs_qwen
def test_embedded_constants_match_the_real_files():
    cfg = json.loads((QWEN_DIR / "tokenizer_config.json").read_text())
    from_cfg = {int(i): a["content"] for i, a in cfg["added_tokens_decoder"].items()}
    assert from_cfg == {151643 + k: t for k, t in enumerate(QWEN3_ADDED_TOKENS)}
    tj = json.loads((QWEN_DIR / "tokenizer.json").read_text())
    assert {a["id"]: a["content"] for a in tj["added_tokens"]} == from_cfg
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN_PATTERN
    assert tj["normalizer"] == {"type": "NFC"}


@needs_qwen
def test_identity_is_shared_by_all_load_paths_and_tracks_the_mask(qwen, tmp_path):
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(QWEN_DIR / f, tmp_path / f)
    ids = {load_tokenizer(p).identity() for p in (QWEN_DIR, QWEN_TIKTOKEN, tmp_path)}
    assert ids == {qwen.identity()} and qwen.identity().startswith("qwen-bpe-151643-")
    assert load_tokenizer(QWEN_TIKTOKEN, mask_id=151700).identity() != qwen.identity()


@needs_qwen
def test_special_ids_mask_and_allowed_special(qwen):
    tok = qwen
    assert tok.eos_id == 151643 and tok.mask_id == 151669 and tok.vocab_size == 151670
    assert len(tok.special_tokens) == 26
    assert tok.special_tokens["<|im_end|>"] == 151645 and tok.special_tokens["</think>"] == 151668
    assert tok.encode("<|im_start|>") == [151644]
    assert tok.encode("<|im_start|><|endoftext|>", allowed_special={"<|endoftext|>"})[-1] == 151643
    assert 151644 not in tok.encode("<|im_start|><|endoftext|>", allowed_special={"<|endoftext|>"})
    plain = tok.encode("<|im_start|>", allowed_special="none")
    assert len(plain) > 1 and tok.decode(plain) == "<|im_start|>"
    assert tok.decode([9707, 151669, 1879]) == "Hello<|mask|> world"
    assert 151669 not in tok.encode("a <|mask|> b")  # text never becomes the mask id
    assert tok.encode("caf\u0065\u0301") == tok.encode("caf\u00e9")  # NFC before BPE
    with pytest.raises(TokenizerError, match="'<\\|nope\\|>', which is not a special token"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError, match="allowed_special='some'; expected 'all', 'none'"):
        tok.encode("x", allowed_special="some")
    with pytest.raises(TokenizerError, match="cannot decode id 151670: expected 0 <= id < 151670"):
        tok.decode([1, 151670])
    with pytest.raises(TokenizerError, match="cannot decode id -1"):
        tok.decode([-1])


@needs_qwen
def test_mask_and_eos_are_configurable():
    tok = load_tokenizer(QWEN_TIKTOKEN, mask_id=151935, mask_token="[MASK]", eos_token="<|im_end|>")
    assert (tok.mask_id, tok.vocab_size, tok.eos_id) == (151935, 151936, 151645)
    assert tok.decode([9707, 151935]) == "Hello[MASK]"
    with pytest.raises(TokenizerError, match="cannot decode: .*151700"):
        tok.decode([151700])  # below vocab_size but not a token
    with pytest.raises(TokenizerError, match="mask id 151644 must be a non-negative int not used"):
        load_tokenizer(QWEN_TIKTOKEN, mask_id=151644)
    with pytest.raises(TokenizerError, match="mask token '<think>' is already an added token"):
        load_tokenizer(QWEN_TIKTOKEN, mask_token="<think>")
    with pytest.raises(TokenizerError, match="eos token '<eos>' is not among the added tokens"):
        load_tokenizer(QWEN_TIKTOKEN, eos_token="<eos>")


def test_byte_tokenizer_round_trip_and_layout():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and load_tokenizer(None).identity() == "byte-258"
    assert (tok.eos_id, tok.mask_id, tok.vocab_size) == (256, 257, 258)
    text = "héllo <|endoftext|> wörld 😀\n\t中文"
    ids = tok.encode(text)
    assert ids.count(256) == 1 and max(ids) == 256 and tok.decode(ids) == text
    assert tok.encode(text, allowed_special="none") == list(text.encode())
    assert tok.encode_batch([text, "a"]) == [ids, [97]]
    assert tok.decode([104, 105, 257, 256]) == "hi<|mask|><|endoftext|>"
    big = load_tokenizer("byte", byte_vocab_size=512, mask_token="<M>")
    assert big.vocab_size == 512 and big.identity() == "byte-512" and big.decode([257]) == "<M>"
    with pytest.raises(TokenizerError, match="cannot decode unused id 300"):
        big.decode([300])
    with pytest.raises(TokenizerError, match="cannot decode id 258: expected 0 <= id < 258"):
        tok.decode([258])
    with pytest.raises(TokenizerError, match="vocab_size=100; expected an int >= 258"):
        load_tokenizer("byte", byte_vocab_size=100)
    with pytest.raises(TokenizerError, match="mask_id is fixed at 257"):
        load_tokenizer("byte", mask_id=5)


# --------------------------------------------------------------------------- tiny synthetic files
def _tiny_folder(folder: Path, merges=("a b", "ab c"), extra_vocab=None, added=None) -> Path:
    """256 byte tokens + 'ab' (256) + 'abc' (257) + <|endoftext|> (258), as HF files."""
    byte_to_char = {b: ch for ch, b in _unicode_to_byte().items()}
    vocab = {byte_to_char[b]: b for b in range(256)} | {"ab": 256, "abc": 257} | (extra_vocab or {})
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    decoder = added or {"258": {"content": "<|endoftext|>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    return folder


def test_tiny_vocab_and_merges_folder(tmp_path):
    tok = load_tokenizer(_tiny_folder(tmp_path / "t"), mask_id=259)
    assert tok.encode("abcab c<|endoftext|>") == [257, 256, 32, 99, 258]
    assert (tok.eos_id, tok.mask_id, tok.vocab_size) == (258, 259, 260)
    assert tok.decode([257, 259, 0xC3, 0xA9]) == "abc<|mask|>é"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence decodes like HF (replacement char)


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(TokenizerError, match="nope does not exist; expected 'byte'"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json, and no vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path)
    other = tmp_path / "vocab.bin"
    other.write_bytes(b"x")
    with pytest.raises(TokenizerError, match="vocab.bin: expected a tokenizer folder or a .tiktoken"):
        load_tokenizer(other)

    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2: expected '<base64 token> <rank>', got 'not-a-line'"):
        load_tokenizer(bad)
    bad.write_text("IQ== 0\nIg== 0\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2: token or rank 0 already given on line 1"):
        load_tokenizer(bad)
    bad.write_text("IQ== 0\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken: byte 0x00 has no token"):
        load_tokenizer(bad)

    d = _tiny_folder(tmp_path / "m1", merges=("a b", "ab c d"))
    with pytest.raises(TokenizerError, match=r"m1/merges.txt:3: expected two tokens separated by one space"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "m2", merges=("a b", "ab x"))
    with pytest.raises(TokenizerError, match=r"m2/merges.txt:3: merge 'ab x' uses or yields a token missing"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "m3", merges=("ab c", "a b"))
    with pytest.raises(TokenizerError, match=r"m3/merges.txt:3: merge 'a b' yields id 256, not above the "
                                             r"previous merge's id 257"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "m5")
    (d / "merges.txt").write_bytes(b"#version: 0.2\na b\n\xff c\n")
    with pytest.raises(TokenizerError, match=r"m5/merges.txt:3: not UTF-8 text"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "m4", extra_vocab={"xy": 100})
    with pytest.raises(TokenizerError, match=r"m4/vocab.json: two tokens share an id"):
        load_tokenizer(d)
    assert load_tokenizer(_tiny_folder(tmp_path / "ok", merges=("a b",))).encode("ab") == [256]

    d = _tiny_folder(tmp_path / "v1", extra_vocab={"a\u4e00": 300})
    with pytest.raises(TokenizerError, match="v1/vocab.json: token 'a一' has character '一', which is not in"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "v2")
    (d / "vocab.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(TokenizerError, match=r"v2/vocab.json:2: invalid JSON at column"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "c1", added={"258": {"content": "<|endoftext|>"}, "259": {"content": "<x>",
                                                                                           "lstrip": True}})
    with pytest.raises(TokenizerError, match=r"added_tokens_decoder\[259\]: added token '<x>' sets lstrip=true"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "c2", added={"300": {"content": "<|im_end|>"}})
    with pytest.raises(TokenizerError, match="c2: eos token '<\\|endoftext\\|>' is not among the added tokens"):
        load_tokenizer(d)
    d = _tiny_folder(tmp_path / "c3", added={"257": {"content": "<|endoftext|>"}})
    with pytest.raises(TokenizerError, match="added token '<\\|endoftext\\|>' reuses id 257 of a BPE token"):
        load_tokenizer(d)

    d = tmp_path / "j1"
    d.mkdir()
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"j1/tokenizer.json:1: invalid JSON at column 2"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a Hugging Face BPE .*'WordPiece'"):
        load_tokenizer(d)


def test_tiny_tokenizer_json_matches_huggingface(tmp_path):
    """The tokenizer.json path (list-form merges, Split regex read from the file) on a tiny
    vocabulary, checked against Hugging Face ``tokenizers`` loading the same file."""
    from tokenizers import Tokenizer as HFTokenizer

    d = _tiny_folder(tmp_path / "t")
    vocab = json.loads((d / "vocab.json").read_text()) | {"Ġa": 258}
    (d / "tokenizer_config.json").unlink()  # HF numbers added tokens from len(vocab): keep them in step
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "post_processor": None,
        "added_tokens": [{"id": 259, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r" ?\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"},
             "behavior": "Isolated", "invert": False}, byte_level]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [["a", "b"], ["ab", "c"], ["Ġ", "a"]]},
    }
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    tok, hf = load_tokenizer(d), HFTokenizer.from_file(str(d / "tokenizer.json"))
    texts = ["abcab c a<|endoftext|>abca 12 ab", "  aab\n\ncab ", "cafe\u0301 abc", "ab<|endoftext|>"]
    assert tok.encode_batch(texts) == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode("abc a") == [257, 258] and tok.eos_id == 259
    tj["model"]["merges"] = [["a", "b"], ["Ġ", "a"], ["ab", "c"]]  # 'abc' (257) after 'Ġa' (258)
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: model.merges\[2\]: merge 'ab c' yields id 257"):
        load_tokenizer(d)
    tj["normalizer"] = {"type": "NFKC"}
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: normalizer 'NFKC'; only NFC is supported"):
        load_tokenizer(d)


def test_tokenizer_json_without_a_qwen_split_regex_is_refused(tmp_path):
    vocab = json.loads(_tiny_folder(tmp_path / "t").joinpath("vocab.json").read_text())
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]},
          "added_tokens": [{"id": 258, "content": "<|endoftext|>"}],
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    (tmp_path / "t" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerError, match="ByteLevel has use_regex=true"):
        load_tokenizer(tmp_path / "t")
    tj["pre_tokenizer"] = None
    (tmp_path / "t" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerError, match="expected one isolated, non-inverted Split pre-tokenizer"):
        load_tokenizer(tmp_path / "t")
