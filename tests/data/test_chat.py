"""Chat rendering and the SFT loss mask: a hand-worked example, a property test over random
conversations, record validation, and agreement with transformers' apply_chat_template on the real
Qwen3 files (skipped when they are absent)."""

import random
import unicodedata

import pytest

from rnd1.data.chat import (encode_chat_prompt, encode_conversation, messages_from_record, render_chat,
                            render_segments)
from rnd1.data.shards import DataError
from rnd1.data.tokenizer import load_tokenizer

from tests.conftest import QWEN_TOKENIZER

BYTE = load_tokenizer("byte")


def test_hand_worked_one_turn_byte_ids_and_mask():
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]
    prompt = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render_chat(msgs) == prompt + "4.<|im_end|>\n"
    ids, loss = encode_conversation(msgs, BYTE)
    assert ids == list(prompt.encode()) + [ord("4"), ord(".")] + list(b"<|im_end|>") + [ord("\n")]
    # prompt (the empty think block included) unsupervised; "4.", <|im_end|> and its "\n" supervised
    assert len(prompt) == 73
    assert loss == [False] * 73 + [True] * 13
    # the generation prompt a fine-tuned model gets is exactly the unsupervised prefix
    assert encode_chat_prompt(msgs[:1], BYTE) == ids[:73]


def test_record_forms_and_errors():
    pr = messages_from_record({"prompt": "p", "response": "r", "system": "s"}, "f.jsonl:1")
    assert pr == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
                  {"role": "assistant", "content": "r"}]
    bad = [
        ({}, "expected \"messages\" or \"prompt\" and \"response\""),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "expected a string"),
        ({"messages": [{"role": "user", "content": "q"}]}, "ends with a user message"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]}, "system only as the first"),
        ({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"},
                       {"role": "assistant", "content": "a"}]}, "reasoning_content"),
        ({"prompt": "p"}, "\"response\" is None"),
        ({"prompt": "p", "response": "r", "system": 1}, "\"system\""),
    ]
    for rec, match in bad:
        with pytest.raises(DataError, match=match) as e:
            messages_from_record(rec, "data/x.jsonl:7")
        assert str(e.value).startswith("data/x.jsonl:7: ") and "\n" not in str(e.value)


ALPHABET = list("abcxyz019 .,?!<>|/\n\t") + ["é", "ß", "中", "文", "😀", "\u0301", "think", "im_end"]


def _text(rng, lead_ok=True):
    s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
    return s if lead_ok else "q" + s.lstrip("\n\t ")


def _random_conversation(rng, *, lead_ok=True):
    msgs = [{"role": "system", "content": _text(rng, lead_ok)}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": _text(rng, lead_ok)})
        for _ in range(rng.choice([1, 1, 1, 2])):  # sometimes two assistant turns in a row
            m = {"role": "assistant", "content": _text(rng, lead_ok).lstrip("\n")}
            if rng.random() < 0.3:
                m["reasoning_content"] = _text(rng, lead_ok).strip("\n")
            msgs.append(m)
    return msgs


def _expected_responses(msgs):
    """What each assistant turn's supervised tokens must spell, from the template's rules:
    content + <|im_end|>, after a non-empty reasoning block when the template emits it."""
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        r = m.get("reasoning_content", "")
        think = i > last_user and r and (i == len(msgs) - 1 or r)
        out.append((f"<think>\n{r}\n</think>\n\n" if think else "") + m["content"] + "<|im_end|>\n")
    return out


def _runs(ids, loss):
    runs, cur = [], []
    for i, l in zip(ids, loss):
        if l:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _check_property(tok, convs, nfc=False):
    for msgs in convs:
        ids, loss = encode_conversation(msgs, tok)
        assert ids == tok.encode(render_chat(msgs), allowed_special="all")
        runs = [tok.decode(r) for r in _runs(ids, loss)]
        # one run per assistant turn spelling exactly its response: so every other token (system,
        # user, headers, empty think blocks, newlines) is unsupervised
        want = _expected_responses(msgs)
        assert runs == ([unicodedata.normalize("NFC", w) for w in want] if nfc else want), msgs
        assert sum(loss) == sum(len(tok.encode(r, allowed_special="all")) for r in runs)
        for r in runs:
            assert "<|im_start|>" not in r


def test_property_random_conversations_byte():
    rng = random.Random(1234)
    _check_property(BYTE, [_random_conversation(rng) for _ in range(200)])


# --------------------------------------------------------------------------- the real tokenizer
def _hf():
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip(f"the real Qwen3 tokenizer is not present at {QWEN_TOKENIZER} (it ships beside the repo)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return transformers.AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


CASES = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again?"},
     {"role": "assistant", "content": "yes"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "\nthink hard\n"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nold\n</think>\n\nfirst"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "mid</think>\n\n\nlast"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"},
     {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "<tool_response>x</tool_response>"}, {"role": "assistant", "content": "ok"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "e\u0301 中文 😀"},
     {"role": "assistant", "content": "\n\ncafe\u0301 ok"}],
    [{"role": "user", "content": "just a prompt"}],
]


def test_renderer_matches_transformers_apply_chat_template():
    hf = _hf()
    tok = load_tokenizer(QWEN_TOKENIZER)
    for msgs in CASES:
        for gen in (False, True):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, enable_thinking=False)
            assert render_chat(msgs, add_generation_prompt=gen) == want, msgs
        if msgs[-1]["role"] == "assistant":
            want_ids = hf.apply_chat_template(msgs, tokenize=True, enable_thinking=False)
            want_ids = want_ids if isinstance(want_ids, list) else want_ids["input_ids"]
            assert encode_conversation(msgs, tok)[0] == list(want_ids), msgs
        else:
            want_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, enable_thinking=False)
            want_ids = want_ids if isinstance(want_ids, list) else want_ids["input_ids"]
            assert encode_chat_prompt(msgs, tok) == list(want_ids)


def test_property_random_conversations_qwen():
    """With BPE a token can straddle a span boundary; contents that start with a visible
    character (as real ones do) keep every boundary at a token boundary."""
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip(f"the real Qwen3 tokenizer is not present at {QWEN_TOKENIZER} (it ships beside the repo)")
    tok = load_tokenizer(QWEN_TOKENIZER)
    rng = random.Random(99)
    _check_property(tok, [_random_conversation(rng, lead_ok=False) for _ in range(60)], nfc=True)
    # the renderer's pieces mark the empty think block as prompt
    segs = render_segments(CASES[0])
    assert [(s.text, s.loss) for s in segs if "think" in s.text] == [("<think>\n\n</think>\n\n", False)]
