"""The demo's word completions (rnd1.eval.word_completion): held-out prompts that end inside a
word, of one length, chosen without looking at any model."""

import pytest

from rnd1.eval.word_completion import WordItem, completed_word, held_out_words, score

DOC = "\n".join([
    "import os",
    "class Reader:",
    "    def read_header(self, stream):",
    "        # a comment line is never cut",
    "        header = stream.read_exactly(16)",
    "        self.position = self.position + len(header)",
    "        return header",
]) + "\n"


def test_prompts_end_inside_a_word_and_have_one_length():
    items = held_out_words([DOC, DOC.replace("stream", "source")], 4, keep=3, context=40)
    assert len(items) == 4 and {len(it.prompt) for it in items} == {40}
    for it in items:
        word_start = it.prompt[-3:]
        assert (word_start + it.reference).isidentifier() and len(word_start + it.reference) >= 6
        assert "#" not in it.prompt.split("\n")[-1]  # the cut line is code, not a comment
    # the first qualifying line is `def read_header(self, stream):` (its middle word not `self`)
    assert items[0].prompt.endswith("def read_header(self, str") and items[0].reference == "eam"


def test_same_documents_same_items():
    assert held_out_words([DOC] * 3, 5, context=32) == held_out_words([DOC] * 3, 5, context=32)


def test_too_few_words_is_refused():
    with pytest.raises(ValueError, match="qualifying words, fewer than"):
        held_out_words([DOC], 50, context=32)


def test_completion_stops_at_the_word_and_scores_exact_matches():
    assert completed_word("eam(self)\n") == "eam" and completed_word(" x") == ""
    items = [WordItem("a", "eam"), WordItem("b", "tion")]
    s = score(["eam", "tio"], items)
    assert (s.right, s.total, s.accuracy) == (1, 2, 0.5) and s.stderr == pytest.approx(0.5 ** 1.5)
