"""Token pieces for the rollout records: exact for BPE tokenizers, multi-byte characters and
completions cut inside a character, and for the bundled character tokenizer."""
from __future__ import annotations

import pytest

from poise_probe.models import load_policy
from poise_probe.records import token_pieces


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    from poise_probe.bpe_model import build_bpe_model

    _, tok = load_policy(build_bpe_model(tmp_path_factory.mktemp("bpe"), vocab_size=300))
    return tok


def test_bpe_pieces_join_to_the_text_for_every_prefix(bpe_tok):
    text = "<think>é → 3×4 = 12, naïve</think><answer>12</answer>"
    ids = bpe_tok(text, add_special_tokens=False)["input_ids"] + [bpe_tok.eos_token_id]
    pieces = token_pieces(bpe_tok, ids)
    assert "".join(pieces) == text and len(pieces) == len(ids)
    assert pieces[-1] == ""                                   # EOS shows no text
    assert any(len(p) > 1 and not p.startswith("<") for p in pieces)   # real BPE merges
    assert "<think>" in pieces and "</answer>" in pieces      # tags are single tokens
    # a character split over byte tokens: the token completing it carries it, earlier ones ""
    assert any(p == "" for p in pieces[:-1])
    for cut in range(1, len(ids) + 1):                        # incl. cuts inside a character
        part = ids[:cut]
        shown = bpe_tok.decode(part, skip_special_tokens=True)
        got = token_pieces(bpe_tok, part, shown)
        assert got is not None and "".join(got) == shown, (cut, got, shown)


def test_char_tokenizer_pieces_are_characters_and_tags():
    _, tok = load_policy("tiny-reasoner")
    ids = tok("<think>1+2</think><answer>3</answer>", add_special_tokens=False)["input_ids"]
    assert token_pieces(tok, ids + [tok.eos_token_id]) == [
        "<think>", "1", "+", "2", "</think>", "<answer>", "3", "</answer>", ""]
    assert token_pieces(tok, []) == []


def test_pieces_that_cannot_reproduce_the_text_give_none():
    _, tok = load_policy("tiny-reasoner")
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    assert token_pieces(tok, ids, "something else") is None
