"""Mixtral (mixture of experts in the block): hub-layout expert weights load, split equals transformers."""

from __future__ import annotations

import pytest
from bloombee_family_mixtral import MixtralFamily
from family_helpers import (
    TINY,
    assert_bf16_parity,
    assert_family_parity,
    assert_span_reads_only_its_tensors,
    save_tiny,
)
from transformers import MixtralConfig

from bloombee_core.model import TensorSource

SMALL = dict(TINY, num_local_experts=4, num_experts_per_tok=2)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**SMALL),
    "mixtral_sliding": lambda: MixtralConfig(**SMALL, sliding_window=4),
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_mixtral(request, tmp_path_factory):
    return save_tiny(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def test_checkpoint_uses_the_hub_expert_layout(tiny_mixtral):
    # transformers saves per-expert w1/w2/w3 like hub checkpoints; the adapter must fuse them itself
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in TensorSource(tiny_mixtral)


def test_split_equals_transformers(tiny_mixtral):
    assert_family_parity(MixtralFamily(), tiny_mixtral, [0, 1, 3, 5])


def test_bf16_split_matches_transformers_bf16(tiny_mixtral):
    assert_bf16_parity(MixtralFamily(), tiny_mixtral, [0, 2, 5])


def test_span_reads_only_its_tensors(tiny_mixtral, monkeypatch):
    assert_span_reads_only_its_tensors(MixtralFamily(), tiny_mixtral, monkeypatch)
