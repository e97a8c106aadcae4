"""Gemma 1/2/3 adapter: scaled embeddings, soft-capping, sliding-window layers; split equals transformers."""

from __future__ import annotations

import pytest
from bloombee_family_gemma import GemmaFamily
from family_helpers import (
    assert_bf16_parity,
    assert_family_parity,
    assert_span_reads_only_its_tensors,
    save_tiny,
)
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
CONFIGS = {
    "gemma": lambda: GemmaConfig(**SMALL),
    # window 4 < prompt length, logit soft-caps on: every Gemma-2 specific path is exercised
    "gemma2": lambda: Gemma2Config(
        **SMALL, sliding_window=4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
    ),
    # sliding every other layer, local and global rope tables
    "gemma3_text": lambda: Gemma3TextConfig(**SMALL, sliding_window=4, sliding_window_pattern=2),
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_gemma(request, tmp_path_factory):
    return save_tiny(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def test_split_equals_transformers(tiny_gemma):
    assert_family_parity(GemmaFamily(), tiny_gemma, [0, 1, 3, 5])


def test_bf16_split_matches_transformers_bf16(tiny_gemma):
    assert_bf16_parity(GemmaFamily(), tiny_gemma, [0, 2, 5])


def test_span_reads_only_its_tensors(tiny_gemma, monkeypatch):
    assert_span_reads_only_its_tensors(GemmaFamily(), tiny_gemma, monkeypatch)
