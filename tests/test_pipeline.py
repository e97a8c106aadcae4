"""How big the micro-batches and prefill chunks are: the pure cost model behind ``auto``."""

from __future__ import annotations

import pytest

from bloombee_core.client.pipeline import (
    ChainCosts,
    choose_micro_batch,
    group_sizes,
    predicted_rate,
    prefill_chunks,
)


def test_groups_cover_the_batch_with_a_smaller_last_one():
    assert group_sizes(5, 2) == [2, 2, 1]
    assert group_sizes(5, 5) == [5]
    assert group_sizes(16, 3) == [3, 3, 3, 3, 3, 1]
    with pytest.raises(ValueError, match="at least 1"):
        group_sizes(4, 0)


def test_a_single_sequence_is_never_split():
    slow = ChainCosts(latency_s=0.06, server_step_s=(0.02, 0.02), client_row_s=0.005)
    assert choose_micro_batch(slow, 1) == 1


def test_a_fast_link_with_fixed_cost_steps_stays_whole():
    # every step costs the same whatever its rows (Python overhead), the link adds nothing: splitting
    # only multiplies the steps
    costs = ChainCosts(latency_s=0.0002, server_step_s=(0.01, 0.01), row_cost=0.0)
    assert choose_micro_batch(costs, 16) == 16


def test_a_chain_whose_stages_all_have_real_work_is_pipelined():
    # the client's LM head and each server cost about the same per row: m groups keep all three busy
    costs = ChainCosts(latency_s=0.06, server_step_s=(0.004, 0.004), client_row_s=0.004, row_cost=1.0)
    size = choose_micro_batch(costs, 16)
    assert size < 16
    assert predicted_rate(costs, 16, size) >= 1.5 * predicted_rate(costs, 16, 16)


def test_a_compute_bound_smollm2_chain_is_split_into_a_few_groups():
    # SmolLM2 over two CPU servers at 20 ms: 48 ms per 1-row step each, and the row cost such a server
    # measures (0.15): a few groups of 6-8 rows keep both servers busy
    measured = ChainCosts(latency_s=0.06, server_step_s=(0.048, 0.048), client_row_s=0.0005, row_cost=0.15)
    size = choose_micro_batch(measured, 16)
    assert size in (6, 8)
    assert predicted_rate(measured, 16, size) > 1.4 * predicted_rate(measured, 16, 16)


def test_stages_sharing_one_hosts_cores_are_bound_by_them():
    # two servers and the client on one 2-core host: the split's total work (every group's step on
    # every stage, and the hops' transfers) must fit the cores, so small groups stop paying
    apart = ChainCosts(latency_s=0.06, server_step_s=(0.022, 0.022), client_row_s=0.0008, row_cost=0.15)
    shared = ChainCosts(**{**apart.__dict__, "shared_cores": 2})
    assert predicted_rate(shared, 16, 4) < predicted_rate(apart, 16, 4)
    assert predicted_rate(shared, 16, 16) == predicted_rate(apart, 16, 16)  # one group: nothing overlaps
    roomy = ChainCosts(**{**apart.__dict__, "shared_cores": 16})
    assert choose_micro_batch(apart, 16) <= choose_micro_batch(roomy, 16) < 16
    assert choose_micro_batch(shared, 16) == 16  # fewer cores than stages: they cannot overlap


def test_loopback_addresses_mean_this_host():
    from bloombee_core.client.pipeline import _loopback

    assert _loopback("/ip4/127.0.0.1/tcp/4001/p2p/Qm") and _loopback("/ip6/::1/tcp/1")
    assert not _loopback("/ip4/10.0.0.5/tcp/4001") and not _loopback("/dns4/localhost.example/tcp/1")


def test_a_latency_bound_chain_gains_nothing_from_splitting():
    # 60 ms of travel per step against microseconds of compute: every group waits for the same latency
    costs = ChainCosts(latency_s=0.06, server_step_s=(0.0001, 0.0001), row_cost=0.0)
    assert choose_micro_batch(costs, 16) == 16


def test_a_saturated_stage_bounds_the_rate():
    # one server is the bottleneck; the round of all groups cannot beat its total work
    costs = ChainCosts(
        latency_s=0.0, server_step_s=(0.001, 0.05), client_step_s=0.0, row_cost=1.0, hop_overhead_s=0.0
    )
    bottleneck = 16 * 0.05  # its work for all rows, whatever the split
    assert predicted_rate(costs, 16, 4) == pytest.approx(16 / bottleneck)


def test_prefill_is_cut_only_over_several_servers_and_long_prompts():
    assert prefill_chunks(2048, 1, "auto") == [(0, 2048)]
    assert prefill_chunks(200, 3, "auto") == [(0, 200)]
    cuts = prefill_chunks(2048, 2, "auto")
    assert len(cuts) == 4 and cuts[0] == (0, 512) and cuts[-1] == (1536, 2048)
    assert prefill_chunks(10, 2, 4) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_chunks(10, 2, 0) == [(0, 10)]
    with pytest.raises(ValueError, match="prefill_chunk"):
        prefill_chunks(10, 2, -1)
