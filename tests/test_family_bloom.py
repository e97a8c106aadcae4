"""BLOOM (ALiBi, embedding LayerNorm, tied head): split equals transformers, with and without padding."""

from __future__ import annotations

import pytest
from bloombee_family_bloom import BloomFamily
from family_helpers import (
    assert_bf16_parity,
    assert_family_parity,
    assert_span_reads_only_its_tensors,
    save_tiny,
)
from transformers import BloomConfig


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory):
    config = BloomConfig(vocab_size=128, hidden_size=64, n_layer=5, n_head=4)
    return save_tiny(config, tmp_path_factory.mktemp("bloom"))


def test_split_equals_transformers(tiny_bloom):
    assert_family_parity(BloomFamily(), tiny_bloom, [0, 1, 3, 5])


def test_bf16_split_matches_transformers_bf16(tiny_bloom):
    assert_bf16_parity(BloomFamily(), tiny_bloom, [0, 2, 5])


def test_span_reads_only_its_tensors(tiny_bloom, monkeypatch):
    assert_span_reads_only_its_tensors(BloomFamily(), tiny_bloom, monkeypatch)
