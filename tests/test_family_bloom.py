"""BLOOM (ALiBi, embedding LayerNorm, tied head): split equals transformers, with and without padding."""

from __future__ import annotations

import shutil

import pytest
from bloombee_family_bloom import BloomFamily
from family_helpers import (
    SplitModel,
    assert_bf16_parity,
    assert_cached_decode_parity,
    assert_family_parity,
    assert_span_reads_only_its_tensors,
    load_reference,
    prompts,
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


def test_checkpoint_without_base_prefix_loads(tiny_bloom, tmp_path):
    # bigscience BLOOM checkpoints store the bare base model: "h.0....", "word_embeddings.weight"
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_bloom / "model.safetensors")
    save_file(
        {name.removeprefix("transformer."): t for name, t in state.items()}, tmp_path / "model.safetensors"
    )
    shutil.copy(tiny_bloom / "config.json", tmp_path / "config.json")
    assert not any(name.startswith("transformer.") for name in load_file(tmp_path / "model.safetensors"))
    split = SplitModel(BloomFamily(), tmp_path, [0, 2, 5])
    reference = load_reference(tiny_bloom)
    ids, mask = prompts(128, batch=1, length=5)
    assert_cached_decode_parity(reference, split, ids, mask, steps=3)
