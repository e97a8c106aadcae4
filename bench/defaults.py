"""``python -m bench defaults``: batch-1 decode as a user meets it, beside the benchmark's tuned setup.

The decode rows of ``python -m bench`` run every process with one torch thread and both proxies in one
helper process, and time the decode steps alone. A user's swarm differs: ``bloombee serve`` without
``--threads`` (torch's own thread count, no OpenMP variables), each server behind its own proxy, a
client with default threads timing a whole ``generate`` call. This runs both on the same machine at the
same time — two swarms of tiny LLaMA (8 × 256, 0:4 + 4:8) behind 0 ms proxies — alternating their
generations so that a burst of load from elsewhere hits both alike, and reports ms per token of
``generate(64 new tokens)`` timed whole and per decode step, the floor (the same blocks' compute run
locally + the 0 ms link) and the framework overhead per hop ((measured − floor) / (servers + 1)).

    python -m bench defaults [--runs 7] [--tokens 64]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.floors import decode_floor, parse_link
from bench.models import even_cuts, load_bench_model, random_prompt

RESULTS = Path(__file__).parent / "results" / "defaults.json"
DEFAULT_THREADS = torch.get_num_threads()  # what this process got before anything set it


@dataclass(frozen=True)
class Setup:
    name: str
    threads: int | None  # None: nothing set anywhere (servers' and client's defaults)
    proxy_per_server: bool
    label: str


SETUPS = (
    Setup("default", None, True, "user defaults: no --threads, a proxy process per server"),
    Setup("tuned", 1, False, "bench tuning: 1 torch thread per process, both proxies in one process"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench defaults", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="generations per setup, alternating")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    args = parser.parse_args(argv)
    rows = run(args.runs, args.tokens)
    for row in rows:
        print(one_line(row))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


def run(runs: int, tokens: int) -> list[dict[str, Any]]:
    from bench.compute import LocalSplit, timed_generate
    from bench.runner import swarm_client

    model = load_bench_model("tiny")
    cuts = even_cuts(model.num_blocks, 2)
    link = parse_link("0ms")
    ids = random_prompt(model.vocab_size, 1, 16)
    local = LocalSplit(model, cuts)
    load_before = os.getloadavg()[0]
    samples: dict[str, dict[str, list[float]]] = {s.name: {"whole": [], "step": []} for s in SETUPS}
    compute: list[float] = []
    with contextlib.ExitStack() as stack:
        clients = {
            s.name: stack.enter_context(
                swarm_client(model, cuts, link, s.threads, 120.0, proxy_per_server=s.proxy_per_server)
            )[0]
            for s in SETUPS
        }
        for setup in SETUPS:  # warm-up
            _threads(setup)
            timed_generate(clients[setup.name], ids, 4)
        for _ in range(runs):
            for setup in SETUPS:
                _threads(setup)
                client = clients[setup.name]
                begin = time.perf_counter()
                with torch.inference_mode():
                    client.generate(
                        ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
                    )
                samples[setup.name]["whole"].append((time.perf_counter() - begin) / tokens)
                timing = timed_generate(client, ids, tokens + 1)
                samples[setup.name]["step"].append(timing.decode_total_s / len(timing.step_s))
            torch.set_num_threads(1)
            _, steps = local.run(ids, 9)
            compute.append(sum(s.total_s for s in steps) / len(steps))
    floor = decode_floor(len(cuts) - 1, link, statistics.median(compute), model.hidden_size, model.itemsize)
    hops = len(cuts)  # servers + 1
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = f"load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    rows = []
    for setup in SETUPS:
        whole, step = samples[setup.name]["whole"], samples[setup.name]["step"]
        rows.append(
            {
                "setup": setup.name,
                "label": setup.label,
                "client_threads": DEFAULT_THREADS if setup.threads is None else setup.threads,
                "whole_ms_per_token": _spread(whole),
                "step_ms": _spread(step),
                "floor_ms": floor.total_s * 1e3,
                "per_hop_overhead_ms": (statistics.median(whole) - floor.total_s) * 1e3 / hops,
                "tokens": tokens,
                "runs": runs,
                "measured_at": stamp,
                "notes": load,
                "command": f"python -m bench defaults --runs {runs} --tokens {tokens}",
            }
        )
    return rows


def _threads(setup: Setup) -> None:
    torch.set_num_threads(DEFAULT_THREADS if setup.threads is None else setup.threads)


def _spread(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}


def one_line(row: dict[str, Any]) -> str:
    w, s = row["whole_ms_per_token"], row["step_ms"]
    return (
        f"{row['setup']:8s} generate({row['tokens']}) whole {w['median']:.1f} ms/token "
        f"({w['min']:.1f}–{w['max']:.1f}), per step {s['median']:.1f} ms, floor {row['floor_ms']:.1f} ms, "
        f"overhead {row['per_hop_overhead_ms']:.2f} ms per hop  [{row['label']}; {row['notes']}]"
    )


if __name__ == "__main__":
    raise SystemExit(main())
