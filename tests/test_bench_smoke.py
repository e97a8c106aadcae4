"""One tiny benchmark end to end: a real swarm behind real proxies yields a complete row and leaves no process."""

from __future__ import annotations

import pytest

from bench.models import load_bench_model
from bench.runner import LocalReference, Scenario, run_group


@pytest.mark.slow
def test_one_decode_row_through_a_proxied_swarm_then_nothing_left(bench_children: list) -> None:
    import bench.swarm

    rows: list[dict] = []
    model = load_bench_model("tiny")
    scenario = Scenario("decode", batch=1, prompt_tokens=4, new_tokens=4)
    run_group(model, 2, "0ms", [scenario], LocalReference(model), 1, 1, True, on_row=rows.append)

    (row,) = rows
    assert (row["scenario"], row["servers"], row["link"], row["split"]) == ("decode", 2, "0ms", "0:4 + 4:8")
    assert row["floor"]["hops"] == 3 and row["floor"]["compute_s"] > 0
    assert row["median_s"] > 0 and row["baseline_s"] > 0 and row["ratio_to_floor"] > 0
    assert {c.name for c in bench_children} == {"bootstrap", "proxies", "server0", "server1"}
    for child in bench_children:  # each child's whole process group (p2pd, DHT fork) is gone
        assert child.proc.poll() is not None
        assert bench.swarm.live_group_members(child.proc.pid) == []
