"""``python -m bench pipeline``: the micro-batch pipeline and chunked prefill, on vs off, on one swarm.

Per swarm (model split evenly over 2 or 3 servers, each behind the WAN proxy), back to back, ``--runs``
rounds after a warm-up:

* **batch16** — 16 random 16-token prompts, greedy, 32 new tokens, with ``micro_batch`` 0 (off: one
  session for the whole batch), ``auto`` and each ``--sizes`` value. Decode tokens/s =
  16 × 31 / (time of the 32-token generate − time of a 1-token generate of the same batch): the prefill
  and session set-up cancel out.
* **prefill2048** — one 2048-token prompt, 1 new token, ``prefill_chunk`` 0 (off) and ``auto``.

Floors, from the same split run locally in this process: the throughput floor of the batch-16 decode
is the slowest stage's compute per token (client head or a span, ``16 / max stage seconds``); the
latency limit of one pipeline is ``16 / (N+1 one-way delays)`` tokens/s (no micro-batch's next token can
be sampled before its last one came back). Results: bench/results/pipeline.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.floors import LINKS, hop_count, parse_link

RESULTS_JSON = Path(__file__).resolve().parent / "results" / "pipeline.json"
BATCH, PROMPT, NEW, LONG = 16, 16, 32, 2048


def _generate_s(client: Any, ids: torch.Tensor, new: int, **kwargs: Any) -> float:
    begin = time.perf_counter()
    with torch.inference_mode():
        client.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return time.perf_counter() - begin


def decode_rate(client: Any, ids: torch.Tensor, micro_batch: int | str) -> tuple[float, dict[str, int]]:
    """Decode tokens/s of ``ids`` with ``micro_batch``, and the pipeline's stats for that run."""
    first = _generate_s(client, ids, 1, micro_batch=micro_batch)
    client.pipeline_stats.reset()
    total = _generate_s(client, ids, NEW, micro_batch=micro_batch)
    return ids.shape[0] * (NEW - 1) / max(total - first, 1e-9), client.pipeline_stats.as_dict()


def prefill_s(client: Any, ids: torch.Tensor, chunk: int | str) -> float:
    old, client.prefill_chunk = client.prefill_chunk, chunk
    try:
        return _generate_s(client, ids, 1)
    finally:
        client.prefill_chunk = old


def stage_floor(local: Any, ids: torch.Tensor) -> dict[str, float]:
    """Per decode step of the whole batch, run locally: each stage's seconds (client, spans)."""
    from bench.compute import median_split

    _, steps = local.run(ids, 8)
    split = median_split(steps)
    return {
        "client_s": split.client_s,
        "spans_s": split.spans_s,
        "slowest_s": max(split.client_s, *split.spans_s),
    }


def run_group(model_key: str, servers: int, link_name: str, runs: int, sizes: list[int], threads: int):
    from bench.compute import LocalSplit
    from bench.models import even_cuts, load_bench_model, random_prompt, split_label
    from bench.runner import swarm_client

    model = load_bench_model(model_key)
    link = parse_link(link_name)
    cuts = even_cuts(model.num_blocks, servers)
    local = LocalSplit(model, cuts)
    batch_ids = random_prompt(model.vocab_size, BATCH, PROMPT)
    long_ids = random_prompt(model.vocab_size, 1, LONG)
    settings: list[int | str] = [0, "auto", *sizes]
    rates: dict[str, list[float]] = {str(s): [] for s in settings}
    chosen: dict[str, dict[str, int]] = {}
    prefill: dict[str, list[float]] = {"0": [], "auto": []}
    floors = []
    with swarm_client(model, cuts, link, threads, 180.0) as (client, _):
        for setting in settings:  # warm-up: every setting once
            decode_rate(client, batch_ids[:, :4], setting)
        for _ in range(runs):
            floors.append(stage_floor(local, batch_ids))
            for setting in settings:
                rate, stats = decode_rate(client, batch_ids, setting)
                rates[str(setting)].append(rate)
                chosen[str(setting)] = stats
            for chunk in (0, "auto"):
                prefill[str(chunk)].append(prefill_s(client, long_ids, chunk))
    slowest = statistics.median(f["slowest_s"] for f in floors)
    floor_rate = BATCH / slowest
    latency_limit = BATCH / (hop_count(servers) * link.delay_ms / 1000) if link.delay_ms else None
    off = statistics.median(rates["0"])
    rows = []
    for setting, values in rates.items():
        median = statistics.median(values)
        rows.append(
            {
                "model": model_key,
                "servers": servers,
                "split": split_label(cuts),
                "link": link_name,
                "scenario": "batch16",
                "setting": f"micro_batch={setting}",
                "tokens_per_s": median,
                "runs": values,
                "x_off": median / off,
                "floor_tokens_per_s": floor_rate,
                "floor_over_this": floor_rate / median,
                "latency_limit_tokens_per_s": latency_limit,
                "pipeline": chosen[setting],
            }
        )
    for chunk, values in prefill.items():
        rows.append(
            {
                "model": model_key,
                "servers": servers,
                "split": split_label(cuts),
                "link": link_name,
                "scenario": "prefill2048",
                "setting": f"prefill_chunk={chunk}",
                "seconds": statistics.median(values),
                "runs": values,
                "x_off": statistics.median(prefill["0"]) / statistics.median(values),
            }
        )
    return rows, {"stage_seconds": floors}


def command(args: argparse.Namespace) -> str:
    parts = ["python -m bench pipeline"]
    parts += [f"--model {m}" for m in args.model] + [f"--servers {n}" for n in args.servers]
    parts += [f"--link {link}" for link in args.link] + [f"--runs {args.runs}"]
    return " ".join(parts)


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | servers | link | scenario | setting | result | × off | floor / result | pipeline |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["scenario"] == "batch16":
            result, floor = f"{r['tokens_per_s']:.1f} tok/s", f"{r['floor_over_this']:.2f}"
            extra = f"floor {r['floor_tokens_per_s']:.0f} tok/s; " + ", ".join(
                f"{k} {v}" for k, v in r["pipeline"].items()
            )
        else:
            result, floor, extra = f"{r['seconds'] * 1000:.0f} ms", "", ""
        lines.append(
            f"| {r['model']} | {r['servers']} | {r['link']} | {r['scenario']} | {r['setting']} | {result} "
            f"| {r['x_off']:.2f} | {floor} | {extra} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", choices=("tiny", "smollm2"))
    p.add_argument("--servers", action="append", type=int, choices=(2, 3))
    p.add_argument("--link", action="append", choices=tuple(LINKS))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="*", default=[8, 4], help="explicit micro-batch sizes to try")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.model, args.servers = args.model or ["tiny", "smollm2"], args.servers or [2, 3]
    args.link = args.link or ["0ms", "20ms"]
    torch.set_num_threads(args.threads)
    rows, extra, errors = [], {}, []
    for model_key in args.model:
        for servers in args.servers:
            for link in args.link:
                try:
                    got, more = run_group(model_key, servers, link, args.runs, args.sizes, args.threads)
                except Exception as exc:  # noqa: BLE001 - one broken swarm must not lose the others
                    errors.append(f"{model_key} {servers} {link}: {type(exc).__name__}: {exc}")
                    continue
                rows += got
                extra[f"{model_key}/{servers}/{link}"] = more
                print(render(got), flush=True)
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": command(args),
        "load_average": os.getloadavg()[0],
        "errors": errors,
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({"meta": meta, "rows": rows, "floors": extra}, indent=1))
    print(render(rows))
    for error in errors:
        print(f"failed: {error}", file=sys.stderr)
    return 1 if errors else 0
