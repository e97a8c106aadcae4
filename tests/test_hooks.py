"""One test per hook: a plugin registered through that hook is found, selectable and works."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from bloombee_core import load_plugins
from bloombee_core.errors import ConfigError


def test_hook_bloombee_register_model_families() -> None:
    plugins = load_plugins()
    family = plugins.family_for(LlamaConfig(num_hidden_layers=3))
    assert family.name == "llama" and family.num_blocks(LlamaConfig(num_hidden_layers=3)) == 3


def test_hook_bloombee_register_transports() -> None:
    plugins = load_plugins()
    transport = plugins.create("transports", "hivemind", "network.transport")
    assert transport.name == "hivemind"


def test_hook_bloombee_register_compressors() -> None:
    plugins = load_plugins()
    hidden = torch.randn(2, 3, 16).to(torch.bfloat16)
    for name in ("none", "lz4", "zstd", "zstd-bytesplit"):
        compressor = plugins.create("compressors", name)
        assert torch.equal(
            compressor.decode(compressor.encode(hidden), hidden.dtype, tuple(hidden.shape)), hidden
        ), name


def test_hook_bloombee_register_offload_policies() -> None:
    plugins = load_plugins()
    policy = plugins.create("offload_policies", {"name": "percent", "weights_on_device": 50})
    assert policy.options.weights_on_device == 50
    assert "none" in plugins.classes("offload_policies")


def test_hook_bloombee_register_tuning_methods() -> None:
    plugins = load_plugins()
    assert {"lora", "prompt", "deep-prompt", "classifier"} <= set(plugins.classes("tuning_methods"))
    lora = plugins.create("tuning_methods", {"name": "lora", "r": 4, "alpha": 8}, "finetune.tuning")
    assert (lora.options.r, lora.options.alpha) == (4, 8.0)
    with pytest.raises(ConfigError, match="finetune.tuning.r"):
        plugins.create("tuning_methods", {"name": "lora", "r": 0}, "finetune.tuning")


def test_hook_bloombee_register_decoding_strategies() -> None:
    plugins = load_plugins()
    assert plugins.create("decoding_strategies", "greedy").generation_kwargs()["do_sample"] is False
    sampling = plugins.create("decoding_strategies", {"name": "sampling", "temperature": 0.7})
    assert sampling.generation_kwargs()["do_sample"] is True


def test_hook_bloombee_register_drafters() -> None:
    plugins = load_plugins()
    assert {"prompt-lookup", "draft-model", "early-exit"} <= set(plugins.classes("drafters"))
    drafter = plugins.create("drafters", {"name": "prompt-lookup", "max_ngram": 2}, "client.drafter")
    (tree,) = drafter.propose([[4, 5, 6, 7, 4, 5]], max_nodes=8, max_depth=2)
    assert (tree.tokens, tree.parents) == ([6, 7], [-1, 0])
