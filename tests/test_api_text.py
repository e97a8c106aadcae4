"""Streaming text of the HTTP API: pieces that add up to the whole text, stop strings that never leak."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bloombee_core.api.engine import _nucleus
from bloombee_core.api.text import StopFinder, TokenText


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from bloombee_core.model_files import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


def pieces(tokenizer, ids: list[int]) -> list[str]:
    text = TokenText(tokenizer)
    out = []
    for token in ids:
        text.add(token)
        out.append(text.final())
    out.append(text.final(flush=True))
    return out


def test_pieces_add_up_to_the_decoded_text_even_split_inside_a_character(tokenizer):
    words = "Größe: 東京 🐝 naïve — fin"
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert len(ids) > 10
    out = pieces(tokenizer, ids)
    assert "".join(out) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in out)  # half a character is held back, never shown


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=49151), max_size=40))
def test_pieces_add_up_for_any_tokens(tokenizer, ids):
    assert "".join(pieces(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="ab,. x", max_size=6), max_size=12),
    st.lists(st.text(alphabet="ab,. x", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_a_stream_stops_before_its_first_stop_string_and_never_shows_one(chunks, stops):
    finder = StopFinder(stops)
    shown, stopped = [], False
    for chunk in chunks:
        text, stopped = finder.feed(chunk)
        shown.append(text)
        if stopped:
            break
    if not stopped:
        text, _ = finder.feed("", flush=True)
        shown.append(text)
    whole, out = "".join(chunks), "".join(shown)
    hits = [i for i in (whole.find(s) for s in stops) if i >= 0]
    assert out == (whole[: min(hits)] if hits else whole)
    assert stopped == bool(hits)
    for piece_end in range(len(out) + 1):  # no prefix of what was shown ever held a stop string
        assert not any(s in out[:piece_end] for s in stops)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    import torch

    def kept(probs: list[float], top_p: float) -> list[bool]:
        return (_nucleus(torch.tensor([probs]), top_p) > 0)[0].tolist()

    assert kept([0.5, 0.3, 0.15, 0.05], 0.5) == [True, False, False, False]
    assert kept([0.5, 0.3, 0.15, 0.05], 0.7) == [True, True, False, False]
    assert kept([0.5, 0.3, 0.15, 0.05], 1e-9) == [True, False, False, False]
    assert kept([0.05, 0.3, 0.5, 0.15], 0.8) == [False, True, True, False]
