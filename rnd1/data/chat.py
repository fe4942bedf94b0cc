"""Chat conversations as Qwen3 renders them, with a per-token "loss here" mask for diffusion SFT.

The renderer reproduces the ``chat_template`` of Qwen3's ``tokenizer_config.json`` (without tools)
in plain Python, so preparing data needs neither jinja nor transformers, and the text a model is
fine-tuned on is byte for byte the text ``apply_chat_template`` gives at inference (tested against
transformers on the real files). What the template does, and this module does too:

- a leading system message becomes ``<|im_start|>system\\n{content}<|im_end|>\\n``;
- user turns ``<|im_start|>user\\n{content}<|im_end|>\\n``, assistant turns
  ``<|im_start|>assistant\\n{content}<|im_end|>\\n``;
- an assistant's reasoning is ``reasoning_content`` or, when absent, whatever its content has
  before ``</think>`` (the content keeps what follows, less leading newlines);
- an assistant turn after the last user query gets ``<think>\\n{reasoning}\\n</think>\\n\\n``
  before its content when it is the last message or has reasoning; earlier turns lose their
  reasoning (the template drops it from the history);
- the generation prompt is ``<|im_start|>assistant\\n`` plus, with ``enable_thinking=False``,
  the empty block ``<think>\\n\\n</think>\\n\\n``.

Loss mask policy (what the diffusion objective may mask and score):

- supervised: every assistant turn's content AND its closing ``<|im_end|>\\n`` (so the model learns
  to stop), and a non-empty reasoning block ``<think>\\n...\\n</think>\\n\\n`` (it is response).
  The newline after ``<|im_end|>`` is the turn's last token: left clean, it would tell a diffusion
  model exactly where the response ends (it sits after the response, not before it), and at
  inference nothing after the prompt is known;
- not supervised: system and user turns, the ``<|im_start|>assistant\\n`` header, and an EMPTY
  think block the template inserts: at inference it is part of the generation prompt
  (``enable_thinking=False``), so in training it is prompt too.

Tokenisation encodes the whole rendered string once, so the ids are exactly the tokenizer's ids
for that text (no seams where separately encoded pieces would tokenise differently). The mask is
derived afterwards from byte offsets: a token is supervised when its first byte lies in a
supervised span. A BPE token that straddles a span boundary therefore follows its first byte.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from rnd1.data.shards import DataError
from rnd1.data.tokenizer import ByteTokenizer, QwenTokenizer, Tokenizer

ROLES = ("system", "user", "assistant")
EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text: ``loss`` says whether it is supervised, ``message`` is the index of
    the message it renders (-1 for the generation prompt)."""

    text: str
    loss: bool
    message: int


# --------------------------------------------------------------------------- records
def _check_messages(messages, where: str, *, for_training: bool) -> list[dict]:
    """Messages as the renderer needs them; ``for_training`` also asks for an assistant turn to
    learn from, at the end (a trailing user turn would be prompt with no response)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" is {messages!r:.60}, expected a non-empty list of "
                        f"{{\"role\", \"content\"}} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{k}] is {type(m).__name__}, expected an object with "
                            f"\"role\" and \"content\"")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{k}] has role {role!r}, expected one of {', '.join(ROLES)}")
        if role == "system" and k:
            raise DataError(f"{where}: messages[{k}] is a system message, expected system only as the "
                            f"first message")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{k}] ({role}) has content {content!r:.40}, expected a string")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
            raise DataError(f"{where}: messages[{k}] ({role}) has reasoning_content {reasoning!r:.40}, "
                            f"expected a string on an assistant message")
        out.append({"role": role, "content": content, **({"reasoning_content": reasoning} if reasoning is not None else {})})
    if for_training and out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {out[-1]['role']} message, expected it to "
                        f"end with an assistant message (the response to learn)")
    return out


def messages_from_record(rec, where: str) -> list[dict]:
    """A JSONL record -> checked messages. Either ``{"messages": [...]}`` (OpenAI / Hugging Face chat
    format) or ``{"prompt": str, "response": str, "system": str (optional)}``. Anything else raises
    DataError naming ``where`` (``path:line``)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        return _check_messages(rec["messages"], where, for_training=True)
    if "prompt" in rec or "response" in rec:
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{where}: \"{key}\" is {rec.get(key)!r:.40}, expected a string "
                                f"(a record needs \"prompt\" and \"response\")")
        system = rec.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: \"system\" is {system!r:.40}, expected a string")
        msgs = [{"role": "system", "content": system}] if system is not None else []
        msgs += [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
        return msgs
    raise DataError(f"{where}: has keys {', '.join(map(repr, rec)) or 'none'}, expected \"messages\" or "
                    f"\"prompt\" and \"response\"")


# --------------------------------------------------------------------------- rendering
def _is_tool_response(content: str) -> bool:
    return content.startswith("<tool_response>") and content.endswith("</tool_response>")


def _split_reasoning(m: dict) -> tuple[str, str]:
    """(content, reasoning) as the template computes them."""
    content = m["content"]
    if m.get("reasoning_content") is not None:
        return content, m["reasoning_content"]
    if "</think>" in content:
        before, after = content.split("</think>")[0], content.split("</think>")[-1]
        return after.lstrip("\n"), before.rstrip("\n").split("<think>")[-1].lstrip("\n")
    return content, ""


def render_segments(messages, *, add_generation_prompt: bool = False,
                    enable_thinking: bool = False) -> list[Segment]:
    """The rendered conversation as supervised / unsupervised pieces (``render_chat`` joins them)."""
    messages = _check_messages(messages, "messages", for_training=False)
    segs: list[Segment] = []
    # the template's last_query_index: the last user message that is not a tool response
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user" and not _is_tool_response(messages[i]["content"]):
            last_query = i
            break
    for i, m in enumerate(messages):
        role = m["role"]
        if role != "assistant":
            segs.append(Segment(f"<|im_start|>{role}\n{m['content']}<|im_end|>\n", False, i))
            continue
        content, reasoning = _split_reasoning(m)
        segs.append(Segment("<|im_start|>assistant\n", False, i))
        if i > last_query and (i == len(messages) - 1 or reasoning):
            think = reasoning.strip("\n")
            segs.append(Segment(f"<think>\n{think}\n</think>\n\n", bool(think), i))
            content = content.lstrip("\n")
        segs.append(Segment(content + "<|im_end|>\n", True, i))
    if add_generation_prompt:
        segs.append(Segment("<|im_start|>assistant\n" + ("" if enable_thinking else EMPTY_THINK), False, -1))
    return segs


def render_chat(messages, *, add_generation_prompt: bool = False, enable_thinking: bool = False) -> str:
    """Qwen3's chat template applied to ``messages`` (no tools)."""
    return "".join(s.text for s in render_segments(messages, add_generation_prompt=add_generation_prompt,
                                                   enable_thinking=enable_thinking))


# --------------------------------------------------------------------------- tokenising
def token_bytes(tokenizer: Tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes each token stands for (a BPE token may hold part of a UTF-8 character)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [bytes([i]) if i < 256 else (b"<|endoftext|>" if i == tokenizer.eos_id else b"")
                for i in ids]
    if isinstance(tokenizer, QwenTokenizer):
        return [tokenizer._enc.decode_single_token_bytes(i) for i in ids]
    raise DataError(f"tokenizer {type(tokenizer).__name__} does not expose per-token bytes")


def _encode_segments(segs: list[Segment], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    # The Qwen tokenizer NFC-normalises its input; normalising each piece keeps the spans' byte
    # offsets in step with the text it actually encodes (the pieces meet at ASCII markup, which
    # nothing composes across).
    nfc = isinstance(tokenizer, QwenTokenizer)
    pieces = [(unicodedata.normalize("NFC", s.text) if nfc else s.text).encode("utf-8") for s in segs]
    text = b"".join(pieces).decode("utf-8")
    ids = tokenizer.encode(text, allowed_special="all")
    # supervised byte ranges [lo, hi)
    spans, pos = [], 0
    for s, b in zip(segs, pieces):
        if s.loss and b:
            spans.append((pos, pos + len(b)))
        pos += len(b)
    toks = token_bytes(tokenizer, ids)
    if b"".join(toks) != b"".join(pieces):
        raise DataError(f"{tokenizer.name}: the tokens do not spell the rendered conversation back "
                        f"(text {text[:60]!r}...)")
    loss, off, k = [], 0, 0
    for t in toks:
        while k < len(spans) and spans[k][1] <= off:
            k += 1
        loss.append(k < len(spans) and spans[k][0] <= off < spans[k][1])
        off += len(t)
    return ids, loss


def encode_conversation(record_or_messages, tokenizer: Tokenizer, *,
                        where: str = "conversation") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is supervised (see the
    module docstring). Accepts a JSONL record (either form) or a list of messages."""
    if isinstance(record_or_messages, dict):
        messages = messages_from_record(record_or_messages, where)
    else:
        messages = _check_messages(record_or_messages, where, for_training=True)
    return _encode_segments(render_segments(messages), tokenizer)


def encode_chat_prompt(messages, tokenizer: Tokenizer) -> list[int]:
    """Ids of the generation prompt for ``messages`` (thinking off), as a fine-tuned model is
    prompted at inference."""
    text = render_chat(messages, add_generation_prompt=True, enable_thinking=False)
    return tokenizer.encode(text, allowed_special="all")
