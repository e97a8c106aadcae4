"""``python -m bench links``: ``auto`` compression (the default) against ``none`` on capped links.

Per link setting (default ``20ms``: 20 ms one way, 100 Mbit/s; ``50ms``: 50 ms, 20 Mbit/s — the
reference links of shared/BENCHMARKS.md), SmolLM2 in bf16 split over two servers behind the WAN proxy,
two swarms: servers and client with ``--compressor none``, and with the default
(``auto``), both up at once and measured alternately. After a warm-up (which also lets every link
measure its speed), ``--runs`` rounds of, each on ``none`` then ``auto``:

* **prefill2048** — one 2048-token prompt, 1 new token: wall time of the generate call (with the
  default chunked prefill, which overlaps transfers with compute); **prefill2048-unchunked** the same
  with ``prefill_chunk=0`` (one message per hop: transfers add to compute);
* **decode1** / **decode16** — batch 1 / 16 of 16-token prompts, 32 new tokens: ms per decode step,
  ``(t(32 tokens) - t(1 token)) / 31`` (prefill and session set-up cancel out).

Beside each: the client's tensor bytes on the wire against raw (both directions, all its links) and the
transfer floor of the scenario (bytes over the link cap, per hop, raw and at the measured ratio).
Results: bench/results/links.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bench.floors import LINKS, hop_count, parse_link
from bench.pipeline import _generate_s

RESULTS_JSON = Path(__file__).resolve().parent / "results" / "links.json"
PROMPT, NEW, LONG = 16, 32, 2048
SCENARIOS = ("prefill2048", "prefill2048-unchunked", "decode1", "decode16")
COMPRESSORS = ("none", "auto")


def _traffic(client: Any) -> dict[str, int]:
    return dict(client.swarm.links.total.as_dict())


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def measure(client: Any, scenario: str, prompts: dict[str, torch.Tensor]) -> tuple[float, dict[str, int]]:
    """Seconds (prefill) or seconds per decode step (decode), and the client's bytes during it."""
    before = _traffic(client)
    if scenario.startswith("prefill2048"):
        old = client.prefill_chunk
        client.prefill_chunk = 0 if scenario.endswith("unchunked") else old
        try:
            value = _generate_s(client, prompts["long"], 1)
        finally:
            client.prefill_chunk = old
    else:
        ids = prompts["one"] if scenario == "decode1" else prompts["batch"]
        first = _generate_s(client, ids, 1)
        value = (_generate_s(client, ids, NEW) - first) / (NEW - 1)
    return value, _delta(_traffic(client), before)


def run_link(model: Any, cuts: list[int], link_name: str, runs: int, threads: int) -> dict[str, Any]:
    """Both swarms of one link up at once; every run measures each scenario on ``none`` then ``auto``,
    so drift of the shared machine falls on both alike; which goes first alternates
    between runs (a run may pay for what the one before it left behind)."""
    from contextlib import ExitStack

    from bench.models import random_prompt
    from bench.runner import swarm_client
    from bloombee_core.compression import RAW

    prompts = {
        "long": random_prompt(model.vocab_size, 1, LONG),
        "one": random_prompt(model.vocab_size, 1, PROMPT),
        "batch": random_prompt(model.vocab_size, 16, PROMPT, seed=2),
    }
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        clients = {}
        for compressor in COMPRESSORS:
            clients[compressor], _ = stack.enter_context(
                swarm_client(
                    model,
                    cuts,
                    parse_link(link_name),
                    threads,
                    240.0,
                    dtype=torch.bfloat16,
                    server_args=["--compressor", compressor],
                    client_options={"compressor": RAW} if compressor == "none" else {},
                )
            )
            results[compressor] = {"values": {s: [] for s in SCENARIOS}, "traffic": {}}
        for scenario in SCENARIOS:  # warm-up: every scenario once (links measure their speed)
            for client in clients.values():
                measure(client, scenario, prompts)
        for run in range(runs):
            for scenario in SCENARIOS:
                order = list(clients.items())[:: 1 if run % 2 == 0 else -1]  # who goes first alternates
                for compressor, client in order:
                    value, results[compressor]["traffic"][scenario] = measure(client, scenario, prompts)
                    results[compressor]["values"][scenario].append(value)
        for compressor, client in clients.items():
            links = client.swarm.links.busiest(8)
            results[compressor]["rates"] = {link.peer[-8:]: link.send_rate for link in links}
    return results


def transfer_floor_s(scenario: str, link_name: str, servers: int, hidden: int, ratio: float) -> float:
    """Bytes on the critical path over the link cap: one hidden state per hop (client -> s1 -> ... -> client)."""
    link = LINKS[link_name]
    if link.bytes_per_s is None:
        return 0.0
    rows, tokens = (
        (1, LONG) if scenario.startswith("prefill") else ((1, 1) if scenario == "decode1" else (16, 1))
    )
    return hop_count(servers) * rows * tokens * hidden * 2 * ratio / link.bytes_per_s


def rows_for(
    model_key: str, link_name: str, results: dict[str, Any], servers: int, hidden: int
) -> list[dict]:
    rows = []
    for scenario in SCENARIOS:
        none = statistics.median(results["none"]["values"][scenario])
        for compressor in COMPRESSORS:
            got = results[compressor]
            median = statistics.median(got["values"][scenario])
            traffic = got["traffic"][scenario]
            raw = traffic["sent_raw"] + traffic["received_raw"]
            wire = traffic["sent_wire"] + traffic["received_wire"]
            ratio = wire / raw if raw else 1.0
            rows.append(
                {
                    "model": model_key,
                    "link": link_name,
                    "scenario": scenario,
                    "compressor": compressor,
                    "seconds": median,
                    "runs": got["values"][scenario],
                    "time_vs_none": median / none,
                    "client_wire_over_raw": ratio,
                    "client_bytes": traffic,
                    "transfer_floor_s": transfer_floor_s(scenario, link_name, servers, hidden, ratio),
                    "send_rates": got["rates"],
                }
            )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| link | scenario | compressor | time | × none | client wire/raw | transfer floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit = "s" if r["scenario"].startswith("prefill") else "ms/step"
        scale = 1 if unit == "s" else 1000
        lines.append(
            f"| {r['link']} | {r['scenario']} | {r['compressor']} | {r['seconds'] * scale:.3g} {unit} "
            f"| {r['time_vs_none']:.2f} | {r['client_wire_over_raw']:.3f} "
            f"| {r['transfer_floor_s'] * scale:.3g} {unit} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench links", description=__doc__.splitlines()[0])
    p.add_argument("--link", action="append", choices=("20ms", "50ms"), help="repeatable; default: both")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.link = args.link or ["20ms", "50ms"]
    from bench.models import even_cuts, load_bench_model

    torch.set_num_threads(args.threads)
    model = load_bench_model("smollm2")
    servers = 2
    cuts = even_cuts(model.num_blocks, servers)
    hidden = model.hidden_size
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for link_name in args.link:
        try:
            results = run_link(model, cuts, link_name, args.runs, args.threads)
        except Exception as exc:  # noqa: BLE001 - one broken swarm must not lose the other link
            errors.append(f"{link_name}: {type(exc).__name__}: {exc}")
            continue
        got = rows_for("smollm2", link_name, results, servers, hidden)
        print(render(got), flush=True)
        rows += got
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench links "
        + " ".join(f"--link {k}" for k in args.link)
        + f" --runs {args.runs}",
        "load_average": os.getloadavg()[0],
        "errors": errors,
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(render(rows))
    for error in errors:
        print(f"failed: {error}", file=sys.stderr)
    return 1 if errors else 0
