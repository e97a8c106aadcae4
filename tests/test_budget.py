"""A memory budget's split (bloombee_core.server.budget.plan_memory): what stays resident, what streams,
how much KV cache sessions may reserve, and clear errors when the budget cannot work."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from bloombee_core.errors import ConfigError
from bloombee_core.server.budget import MIB, current_rss, peak_rss, plan_memory, working_bytes

CONFIG = LlamaConfig(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4)
UNIT = 24 * MIB


def plan(budget: int, total: int = 6 * UNIT, cache_bytes: int | None = None, max_tokens: int = 16384):
    return plan_memory(budget, 400 * MIB, total, UNIT, CONFIG, 4, max_tokens, cache_bytes, 256 * MIB)


def test_a_budget_with_room_keeps_everything_resident_and_gives_caches_the_rest() -> None:
    p = plan(4096 * MIB)
    assert p.weights == 6 * UNIT and p.staging == 0
    assert p.kv == 256 * MIB  # the default cache size, all of which fits
    assert p.base + p.working + p.weights + p.kv <= p.budget


def test_a_small_budget_streams_weights_and_every_part_adds_up_to_it() -> None:
    p = plan(600 * MIB)
    assert 0 <= p.weights < 6 * UNIT and p.staging == 2 * UNIT
    assert p.base + p.working + p.staging + p.weights + p.kv == p.budget
    assert p.max_tokens < 16384  # requests get smaller so that a forward's working memory fits
    assert p.working == working_bytes(CONFIG, p.max_tokens, 4)
    assert p.working <= (p.budget - p.base) // 4 or p.max_tokens == 256  # a quarter, down to the floor
    roomier = plan(1200 * MIB)
    assert p.max_tokens < roomier.max_tokens < 16384
    assert roomier.working <= (roomier.budget - roomier.base) // 4


def test_a_configured_cache_size_is_kept_and_the_weights_give_way() -> None:
    p = plan(700 * MIB, cache_bytes=100 * MIB)
    assert p.kv == 100 * MIB and p.staging == 2 * UNIT
    assert p.base + p.working + p.staging + p.weights + p.kv == p.budget


@pytest.mark.parametrize(
    ("budget", "cache_bytes", "message"),
    [
        (420 * MIB, None, "is too small"),
        (560 * MIB, 400 * MIB, "less than the KV cache"),
    ],
)
def test_budgets_that_cannot_work_are_config_errors_naming_the_key(
    budget: int, cache_bytes: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        plan(budget, cache_bytes=cache_bytes)
    assert error.value.key == "server.memory_budget"


def test_memory_readings_are_real() -> None:
    assert 0 < current_rss() <= peak_rss()
