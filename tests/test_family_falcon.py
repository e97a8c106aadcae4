"""Falcon decoder variants transformers supports: split equals transformers for each."""

from __future__ import annotations

import pytest
from bloombee_family_falcon import FalconFamily
from family_helpers import (
    TINY,
    assert_bf16_parity,
    assert_family_parity,
    assert_span_reads_only_its_tensors,
    save_tiny,
)
from transformers import FalconConfig

SMALL = {k: v for k, v in TINY.items() if k not in ("intermediate_size", "num_key_value_heads")}
CONFIGS = {
    # Falcon-40B/180B style: grouped KV heads, two parallel LayerNorms
    "new_decoder": lambda: FalconConfig(**SMALL, new_decoder_architecture=True, num_kv_heads=2),
    # Falcon-7B style: multi-query, parallel attention + MLP
    "multi_query_parallel": lambda: FalconConfig(
        **SMALL, new_decoder_architecture=False, multi_query=True, parallel_attn=True
    ),
    # sequential attention then MLP, full multi-head KV, biases
    "sequential": lambda: FalconConfig(
        **SMALL, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True
    ),
    # ALiBi instead of rotary
    "alibi": lambda: FalconConfig(**SMALL, alibi=True, new_decoder_architecture=False, multi_query=True),
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_falcon(request, tmp_path_factory):
    return save_tiny(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def test_split_equals_transformers(tiny_falcon):
    assert_family_parity(FalconFamily(), tiny_falcon, [0, 1, 3, 5])


def test_bf16_split_matches_transformers_bf16(tiny_falcon):
    assert_bf16_parity(FalconFamily(), tiny_falcon, [0, 2, 5])


def test_span_reads_only_its_tensors(tiny_falcon, monkeypatch):
    assert_span_reads_only_its_tensors(FalconFamily(), tiny_falcon, monkeypatch)
