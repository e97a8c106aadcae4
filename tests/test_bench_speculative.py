"""The speculative-decoding benchmark's code path: round bookkeeping, rows and the table (fast), and one
tiny end-to-end group on a real proxied SmolLM2 swarm that leaves no process behind (slow). No timing
is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.speculative import (
    END,
    START,
    Sample,
    Setting,
    acceptance_by_depth,
    command_for,
    make_row,
    merge,
    predicted_from_acceptance,
    render_table,
    save,
    tokens_per_round,
)

ROUNDS = [
    {"nodes": 4, "depth": 4, "accepted": 4, "planned_depth": 4, "planner_predicted": 3.0},
    {"nodes": 4, "depth": 4, "accepted": 1, "planned_depth": 4, "planner_predicted": 3.0},
    {"nodes": 0, "depth": 0, "accepted": 0, "planned_depth": 0, "planner_predicted": 1.0},
    {"nodes": 2, "depth": 2, "accepted": 0, "planned_depth": None, "planner_predicted": None},
]


def test_acceptance_is_counted_as_the_strategy_counts_it() -> None:
    # depth 1: offered 3 times, accepted twice; depth 2: offered twice (rounds 1, 2), accepted once; ...
    assert acceptance_by_depth(ROUNDS) == [2 / 3, 1 / 2, 1.0, 1.0]
    assert tokens_per_round(ROUNDS) == (5 + 2 + 1 + 1) / 4
    # round 1 and 2: 1 + 2/3 + 1/3 + 1/3 + 1/3; round 3: 1; round 4: 1 + 2/3 + 1/3
    assert predicted_from_acceptance(ROUNDS) == pytest.approx((2 * (1 + 2 / 3 + 3 / 3) + 1 + 2) / 4)
    # a deep tree rejected at depth 1: the depths no path reached have no acceptance and add nothing
    rejected = [{"nodes": 6, "depth": 6, "accepted": 0, "planned_depth": 6, "planner_predicted": 2.5}]
    assert acceptance_by_depth(rejected) == [0.0] and predicted_from_acceptance(rejected) == 1.0


def test_row_table_and_doc(tmp_path: Path) -> None:
    setting = Setting("lookup-grounded", "grounded", {"name": "prompt-lookup"}, "prompt lookup")
    plain = [Sample([1, 2, 3], 0.2, 1.0, 2.0) for _ in range(3)]
    spec = [Sample([1, 2, 3], 0.1, 1.0, 1.5, rounds=list(ROUNDS), draft_s=0.004) for _ in range(3)]
    row = make_row(
        setting=setting,
        model_label="SmolLM2-135M",
        servers=2,
        split="0:15 + 15:30",
        link="50ms",
        new_tokens=64,
        prompt_tokens=278,
        plain=plain,
        spec=spec,
        command=command_for("lookup-grounded", 2, "50ms", 3, 64),
    )
    assert row["speedup"] == pytest.approx(2.0) and row["matches_plain"]
    assert row["latency_floor_per_round_s"] == pytest.approx(0.15)
    assert row["plain_rounds"] == 1 and row["draft_s_per_round"] == pytest.approx(0.001)
    assert row["command"] == "python -m bench speculative --servers 2 --link 50ms --setting lookup-grounded"
    assert command_for("early-exit-6", 3, "20ms", 3, 64).endswith("--setting early-exit --blocks 6")
    table = render_table(merge([], [row]))
    assert (
        "| lookup-grounded | 2 (0:15 + 15:30) | 50 ms, 20 Mbit/s | 278+3 | 200 (200–200) | 100 (100–100) | 2.00×"
        in table
    )
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\nprose\n{START}\nold\n{END}\nafter\n")
    save([row], {"date": "now"}, path=tmp_path / "spec.json", doc=doc)
    text = doc.read_text()
    assert "prose" in text and "after" in text and "old" not in text and "2.00×" in text


@pytest.mark.slow
def test_one_speculative_group_through_a_proxied_swarm_then_nothing_left(bench_children: list) -> None:
    import bench.swarm
    from bench.models import load_bench_model
    from bench.speculative import run_group, settings

    every = settings(load_bench_model("smollm2").path, [2])
    chosen = [every["lookup-grounded"], every["early-exit-2"]]
    rows: list[dict] = []
    run_group(2, "0ms", chosen, runs=1, new_tokens=6, threads=1, on_row=rows.append, log=lambda _: None)

    assert [r["setting"] for r in rows] == ["lookup-grounded", "early-exit-2"]
    for row in rows:
        assert row["matches_plain"], row["setting"]  # greedy speculative output is plain greedy output
        assert row["tokens"] >= 2 and row["rounds"] >= 1 and row["tokens_per_round"] >= 1
        assert row["spec_s_per_token"]["median"] > 0 and row["plain_s_per_token"]["median"] > 0
        assert row["planner_predicted"] is not None and row["predicted_from_acceptance"] is not None
    assert {c.name for c in bench_children} == {"bootstrap", "proxies", "server0", "server1"}
    for child in bench_children:
        assert child.proc.poll() is not None
        assert bench.swarm.live_group_members(child.proc.pid) == []
