"""Qwen3 dense (with and without sliding layers) and Qwen3-MoE: split equals transformers."""

from __future__ import annotations

import pytest
from bloombee_family_qwen3 import Qwen3Family
from family_helpers import (
    TINY,
    assert_bf16_parity,
    assert_family_parity,
    assert_span_reads_only_its_tensors,
    save_tiny,
)
from transformers import Qwen3Config, Qwen3MoeConfig

SMALL = dict(TINY, head_dim=16)
CONFIGS = {
    "qwen3": lambda: Qwen3Config(**SMALL, tie_word_embeddings=False),
    # layers from 2 on use a 4-token window: a mix of full and sliding layers inside one span
    "qwen3_sliding": lambda: Qwen3Config(
        **SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=2
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    ),
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_qwen3(request, tmp_path_factory):
    return save_tiny(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def test_split_equals_transformers(tiny_qwen3):
    assert_family_parity(Qwen3Family(), tiny_qwen3, [0, 1, 3, 5])


def test_bf16_split_matches_transformers_bf16(tiny_qwen3):
    assert_bf16_parity(Qwen3Family(), tiny_qwen3, [0, 2, 5])


def test_span_reads_only_its_tensors(tiny_qwen3, monkeypatch):
    assert_span_reads_only_its_tensors(Qwen3Family(), tiny_qwen3, monkeypatch)
