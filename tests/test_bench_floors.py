"""Floors: the formulas of shared/BENCHMARKS.md, checked against hand-computed numbers and its anchor."""

from __future__ import annotations

import pytest

from bench.floors import (
    LINKS,
    Link,
    decode_floor,
    hidden_bytes,
    hop_count,
    parse_link,
    pipeline_bubble,
    prefill_floor,
    speculative_tokens_per_round,
    step_floor,
)


def test_push_costs_n_plus_one_hops_and_client_mediation_two_n() -> None:
    assert [hop_count(n) for n in (1, 2, 3)] == [2, 3, 4]
    assert [hop_count(n, push=False) for n in (1, 2, 3)] == [2, 4, 6]


def test_anchor_tiny_llama_two_servers_at_20ms_is_about_71ms() -> None:
    # BENCHMARKS.md: tiny LLaMA (hidden 256, fp32), 2 servers, 20 ms / 100 Mbit/s, ~11 ms of compute -> ~71 ms.
    floor = decode_floor(2, LINKS["20ms"], compute_s=0.011, hidden_size=256, itemsize=4)
    assert floor.hops == 3
    assert floor.latency_s == pytest.approx(0.060)
    # three hops of 1 KiB at 12.5 MB/s
    assert floor.transfer_s == pytest.approx(3 * 1024 / 12.5e6)
    assert floor.total_s == pytest.approx(0.060 + 0.011 + 3 * 1024 / 12.5e6)
    assert 0.070 < floor.total_s < 0.072


def test_zero_delay_uncapped_link_leaves_only_compute() -> None:
    floor = decode_floor(3, LINKS["0ms"], compute_s=0.012, hidden_size=576, itemsize=4)
    assert (floor.latency_s, floor.transfer_s, floor.total_s) == (0.0, 0.0, 0.012)


def test_client_mediated_decode_pays_two_n_latencies() -> None:
    floor = decode_floor(3, LINKS["50ms"], compute_s=0.0, hidden_size=256, itemsize=2, push=False)
    assert floor.latency_s == pytest.approx(6 * 0.050)
    assert floor.transfer_s == pytest.approx(6 * 512 / 2.5e6)


def test_prefill_bytes_grow_with_prompt_and_batch() -> None:
    link = Link("slow", 0.0, 8.0)  # 1 MB/s: bytes in seconds are easy to read
    floor = prefill_floor(2, link, compute_s=0.5, prompt_tokens=2048, hidden_size=576, itemsize=4, batch=1)
    assert floor.transfer_s == pytest.approx(3 * 2048 * 576 * 4 / 1e6)
    batch16 = decode_floor(2, link, compute_s=0.0, hidden_size=576, itemsize=4, batch=16)
    assert batch16.transfer_s == pytest.approx(3 * 16 * 576 * 4 / 1e6)


def test_floor_parts_are_reported() -> None:
    parts = step_floor(2, LINKS["20ms"], 0.01, 1000).as_dict()
    assert set(parts) == {"hops", "latency_s", "compute_s", "transfer_s", "total_s"}


def test_bad_inputs_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="at least one server, got 0"):
        hop_count(0)
    with pytest.raises(ValueError, match="negative, got -1"):
        step_floor(2, LINKS["0ms"], -1, 10)
    with pytest.raises(ValueError, match="tokens must be at least 1, got 0"):
        hidden_bytes(1, 0, 256, 4)
    with pytest.raises(ValueError, match="unknown link setting '10ms'"):
        parse_link("10ms")


def test_pipeline_bubble_and_speculative_yield() -> None:
    assert pipeline_bubble(1, 4) == 0
    assert pipeline_bubble(3, 2) == pytest.approx(2 / 4)
    assert speculative_tokens_per_round(0.0, 4) == 1
    assert speculative_tokens_per_round(1.0, 4) == 5
    assert speculative_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
