"""Report rendering: rows carry the median, spread, floor and both ratios; the doc keeps its prose."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.floors import LINKS, decode_floor, prefill_floor
from bench.report import (
    END,
    START,
    load_results,
    make_result,
    merge_results,
    render_table,
    save_results,
    update_doc,
)


def decode_row(link: str = "20ms", runs: tuple[float, ...] = (0.080, 0.075, 0.090)) -> dict:
    floor = decode_floor(2, LINKS[link], compute_s=0.010, hidden_size=256, itemsize=4)
    return make_result(
        scenario="decode",
        model="tiny",
        model_label="tiny LLaMA",
        servers=2,
        split="0:4 + 4:8",
        link=link,
        batch=1,
        prompt_tokens=16,
        new_tokens=32,
        runs_s=list(runs),
        floor=floor,
        baseline_s=0.010,
        command=f"python -m bench --scenario decode --model tiny --servers 2 --link {link}",
    )


def test_a_result_holds_median_spread_and_ratios() -> None:
    row = decode_row()
    assert row["median_s"] == 0.080
    assert (row["min_s"], row["max_s"]) == (0.075, 0.090)
    assert row["tokens_per_s"] == pytest.approx(12.5)
    assert row["ratio_to_floor"] == pytest.approx(0.080 / row["floor"]["total_s"])
    assert row["ratio_to_baseline"] == pytest.approx(8.0)


def test_prefill_rows_report_latency_not_throughput() -> None:
    floor = prefill_floor(3, LINKS["0ms"], 0.5, 128, 256, 4)
    row = make_result(
        scenario="prefill128",
        model="tiny",
        model_label="tiny",
        servers=3,
        split="a",
        link="0ms",
        batch=1,
        prompt_tokens=128,
        new_tokens=1,
        runs_s=[0.6, 0.7, 0.65],
        floor=floor,
        baseline_s=0.5,
        command="c",
    )
    assert row["tokens_per_s"] is None
    table = render_table([row])
    assert "650 ms to 1st token" in table and "1.30×" in table


def test_table_row_has_every_column_a_reader_needs() -> None:
    table = render_table([decode_row()])
    header, _, row = table.splitlines()
    assert header.count("|") == row.count("|")
    for text in (
        "tiny LLaMA",
        "0:4 + 4:8",
        "20 ms, 100 Mbit/s",
        "16+32",
        "12.5 tok/s",
        "75.0 ms–90.0 ms",
        "8.00×",
    ):
        assert text in row
    assert "| 3.3 ms |" in row  # (80 ms - 70.2 ms floor) / 3 hops
    assert "`python -m bench --scenario decode --model tiny --servers 2 --link 20ms`" in row


def test_no_runs_is_an_error_naming_the_scenario() -> None:
    with pytest.raises(ValueError, match="decode on tiny at 0ms: no runs"):
        make_result(
            scenario="decode",
            model="tiny",
            model_label="t",
            servers=2,
            split="s",
            link="0ms",
            batch=1,
            prompt_tokens=1,
            new_tokens=1,
            runs_s=[],
            floor=decode_floor(2, LINKS["0ms"], 0.0, 8, 4),
            baseline_s=1.0,
            command="c",
        )


def test_a_single_scenario_run_replaces_only_its_own_row(tmp_path: Path) -> None:
    old = [decode_row("0ms"), decode_row("20ms")]
    new = [decode_row("20ms", runs=(0.2, 0.2, 0.2))]
    merged = merge_results(old, new)
    assert [r["link"] for r in merged] == ["0ms", "20ms"]
    assert merged[1]["median_s"] == 0.2
    path = tmp_path / "latest.json"
    save_results(merged, {"runs": 3}, path)
    assert load_results(path) == merged


def test_doc_update_keeps_the_prose_around_the_table(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{START}\nold table\n{END}\n\n## Findings\nprofile\n")
    update_doc([decode_row()], {"date": "today", "runs": 3}, doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n")
    assert text.endswith("## Findings\nprofile\n")
    assert "old table" not in text and "12.5 tok/s" in text
    doc.write_text("# no markers\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        update_doc([], {}, doc)


def test_plots_are_written_for_decode_rows(tmp_path: Path) -> None:
    from bench.report import plot

    written = plot([decode_row("0ms"), decode_row("20ms"), decode_row("50ms")], tmp_path)
    assert sorted(p.name for p in written) == ["decode_tokens_per_s.png", "ratio_to_floor.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
