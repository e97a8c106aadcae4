"""Results: one JSON file, a markdown table inside docs/benchmarks.md, and PNG plots.

A result is a plain dict (see :func:`make_result`), so the JSON file is the single source of truth and
the table and plots can be re-rendered from it (``python -m bench --report-only``).
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.floors import LINKS, Floor

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "latest.json"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# What each scenario's measured time is: per decode step, or to the first token.
PER_STEP = {"decode", "batch16"}


def result_key(result: dict[str, Any]) -> tuple:
    return (result["scenario"], result["model"], result["servers"], result["link"], result.get("variant", ""))


def make_result(
    *,
    scenario: str,
    model: str,
    model_label: str,
    servers: int,
    split: str,
    link: str,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    runs_s: list[float],
    floor: Floor,
    baseline_s: float,
    command: str,
    variant: str = "",
    notes: str = "",
) -> dict[str, Any]:
    """One row: the measured seconds per step (or to first token) of each run, beside floor and baseline."""
    if not runs_s:
        raise ValueError(f"{scenario} on {model} at {link}: no runs were measured")
    median = statistics.median(runs_s)
    return {
        "scenario": scenario,
        "model": model,
        "model_label": model_label,
        "servers": servers,
        "split": split,
        "link": link,
        "variant": variant,
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "runs_s": runs_s,
        "median_s": median,
        "min_s": min(runs_s),
        "max_s": max(runs_s),
        "tokens_per_s": batch / median if scenario in PER_STEP else None,
        "floor": floor.as_dict(),
        "ratio_to_floor": median / floor.total_s if floor.total_s > 0 else None,
        "baseline_s": baseline_s,
        "ratio_to_baseline": median / baseline_s if baseline_s > 0 else None,
        "command": command,
        "notes": notes,
        "measured_at": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def merge_results(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Old results overwritten by new ones with the same key (a single-scenario run updates its own rows)."""
    merged = {result_key(r): r for r in old}
    merged.update({result_key(r): r for r in new})
    order = {"decode": 0, "prefill128": 1, "prefill2048": 2, "batch16": 3}
    return sorted(
        merged.values(),
        key=lambda r: (
            r["model"],
            order.get(r["scenario"], 9),
            r["servers"],
            _link_ms(r),
            r.get("variant", ""),
        ),
    )


def _link_ms(result: dict[str, Any]) -> float:
    return LINKS[result["link"]].delay_ms if result["link"] in LINKS else 0.0


def load_results(path: Path = RESULTS_JSON) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return list(data.get("results", []))


def save_results(results: list[dict[str, Any]], meta: dict[str, Any], path: Path = RESULTS_JSON) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def excess_per_hop(result: dict[str, Any]) -> float:
    """Time above the floor, spread over the step's hops: the framework's (and the proxy's) cost per hop."""
    return (result["median_s"] - result["floor"]["total_s"]) / result["floor"]["hops"]


def render_table(results: list[dict[str, Any]]) -> str:
    """The markdown table: one row per scenario × model × split × link."""
    head = (
        "| scenario | model | split | link (one-way, cap) | batch | tokens (prompt+new) | median | spread (min–max) "
        "| floor | × floor | excess per hop | × baseline | reproduce |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        scenario = r["scenario"] + (f" ({r['variant']})" if r.get("variant") else "")
        if r["tokens_per_s"] is not None:
            median = f"{r['tokens_per_s']:.1f} tok/s ({_ms(r['median_s'])}/step)"
        else:
            median = f"{_ms(r['median_s'])} to 1st token"
        rows.append(
            f"| {scenario} | {r['model_label']} | {r['split']} | {link_text(r['link'])} | {r['batch']} "
            f"| {r['prompt_tokens']}+{r['new_tokens']} | {median} | {_ms(r['min_s'])}–{_ms(r['max_s'])} "
            f"| {_ms(r['floor']['total_s'])} | {_ratio(r['ratio_to_floor'])} | {_ms(excess_per_hop(r))} "
            f"| {_ratio(r['ratio_to_baseline'])} "
            f"| `{r['command']}` |"
        )
    return head + "\n".join(rows) + ("\n" if rows else "")


def link_text(link: str) -> str:
    """A link's name as the tables show it: its one-way delay and cap."""
    spec = LINKS.get(link)
    if spec is None:
        return link
    if link == "direct":
        return "no proxy"
    return f"{spec.delay_ms:g} ms, {'no cap' if spec.mbit is None else f'{spec.mbit:g} Mbit/s'}"


def render_section(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [START, ""]
    if meta:
        lines.append(
            f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}, "
            f"{meta.get('runs', '?')} runs each, torch threads per process: {meta.get('threads', '?')}, "
            f"load average {meta.get('load_average', '?')} (the machine is shared: compare ratios, not times)."
        )
        lines.append("")
    lines.append(render_table(results) if results else "_No results yet: run `python -m bench`._\n")
    if meta.get("errors"):
        lines.append("Failed in the last run (rows above are from earlier runs, if any):\n")
        lines.extend(f"- {error}" for error in meta["errors"])
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def update_doc(results: list[dict[str, Any]], meta: dict[str, Any], doc: Path = DOC) -> None:
    """Replace the generated section of the benchmarks page (between the markers), keeping the prose."""
    section = render_section(results, meta)
    text = doc.read_text() if doc.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{doc} lacks the markers {START} / {END}; add them where the table should go")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    doc.write_text(before + section + after)


def plot(results: list[dict[str, Any]], out_dir: Path = IMG) -> list[Path]:
    """tokens/s against link latency (with the floor), and ratio to floor per scenario; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    # Trial variants and the proxy-less "direct" rows are comparisons, not points on a latency curve.
    plain = [r for r in results if not r.get("variant") and r["link"] != "direct"]
    decode = [r for r in plain if r["scenario"] == "decode"]
    if decode:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (label, servers), rows in _group(decode, ("model_label", "servers")).items():
            rows.sort(key=_link_ms)
            xs = [_link_ms(r) for r in rows]
            line = ax.plot(xs, [r["tokens_per_s"] for r in rows], "o-", label=f"{label}, {servers} servers")[
                0
            ]
            ax.plot(xs, [1 / r["floor"]["total_s"] for r in rows], "--", color=line.get_color(), alpha=0.6)
        ax.set_xlabel("one-way latency per server link (ms)")
        ax.set_ylabel("batch-1 decode tokens/s")
        ax.set_title("Decode speed vs link latency (dashed: floor)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / "decode_tokens_per_s.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    rated = [r for r in plain if r["ratio_to_floor"] is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for (scenario, label, servers), rows in _group(rated, ("scenario", "model_label", "servers")).items():
            rows.sort(key=_link_ms)
            ax.plot(
                [_link_ms(r) for r in rows],
                [r["ratio_to_floor"] for r in rows],
                ("o" if "tiny" in label else "s") + ("-" if servers == 2 else ":"),
                label=f"{scenario}, {label}, {servers}s",
            )
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel("one-way latency per server link (ms)")
        ax.set_ylabel("measured / floor")
        ax.set_title("How far from the physical floor")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        path = out_dir / "ratio_to_floor.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _group(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups
