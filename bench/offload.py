"""``python -m bench offload``: prefill and decode through an offloaded span against everything resident,
with each configuration's peak memory beside its speed.

SmolLM2-135M's 30 blocks in bf16, one span in one process, as a CPU server computes them (the
offload policy places the span while it loads, layer by layer). Each configuration runs in a fresh
process, so its peak resident set (``VmHWM``) is its own:

* ``resident`` — every weight and cache layer in memory (the baseline);
* ``weights 50%`` / ``weights 25%`` / ``weights 0%`` — that share of weight bytes resident, the rest
  memory-mapped from disk, paged in per block (the next one read ahead) and dropped after;
* ``kv 50% on disk`` — weights resident, half of the KV-cache layers on disk;
* ``weights 50% + kv 50%`` — both.

Per configuration: a ``--prompt``-token prefill (seconds; median of ``--runs``) and ``--steps``
single-token decode steps after it (ms per step, median), and peak/base RSS. The disk files live in the
page cache after the first pass, as on a server that has run a while: the cost measured is paging in
and out of the process (page faults, ``madvise``), not a cold disk read.
Results: bench/results/offload.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_JSON = Path(__file__).resolve().parent / "results" / "offload.json"
CONFIGS: dict[str, dict[str, int]] = {
    "resident": {},
    "weights 50%": {"weights_on_device": 50, "weights_on_disk": 50},
    "weights 25%": {"weights_on_device": 25, "weights_on_disk": 75},
    "weights 0%": {"weights_on_device": 0, "weights_on_disk": 100},
    "kv 50% on disk": {"kv_on_disk": 50},
    "weights 50% + kv 50%": {"weights_on_device": 50, "weights_on_disk": 50, "kv_on_disk": 50},
}


def worker(options: dict[str, int], prompt: int, steps: int, runs: int, threads: int) -> dict[str, Any]:
    """One configuration in this process: place, warm up, time prefill and decode, read peak memory."""
    import torch
    from bloombee_offload import PercentOffload

    from bloombee_core.model import load_config
    from bloombee_core.model.checkpoint import meta_skeleton, span_weight_bytes
    from bloombee_core.model_files import resolve_model
    from bloombee_core.registry import load_plugins
    from bloombee_core.server.budget import current_rss, peak_rss

    torch.set_num_threads(threads)
    path = resolve_model("smollm2")
    config = load_config(path)
    family = load_plugins().family_for(config)
    meta_skeleton(config)
    base = current_rss()
    dtype, end = torch.bfloat16, family.num_blocks(config)
    policy = PercentOffload(PercentOffload.Options(**options))
    placer = policy.placer(torch.device("cpu"), sum(span_weight_bytes(family, path, 0, end, dtype)))
    span = family.load_span(path, config, 0, end, dtype, "cpu", place=placer.add_unit)
    plan = placer.finish(span, policy.kv_shares())
    span.requires_grad_(False)
    hidden = torch.randn(1, prompt, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    prefill_s, step_ms = [], []
    with torch.inference_mode():
        for run in range(runs + 1):  # the first round warms up (files into the page cache, allocator)
            cache = span.new_cache(1, prompt + steps + 1)
            begin = time.perf_counter()
            span(hidden, position_ids=torch.arange(prompt)[None], cache=cache)
            prefill = time.perf_counter() - begin
            token = hidden[:, -1:]
            times = []
            for i in range(steps):
                begin = time.perf_counter()
                token = span(token, position_ids=torch.full((1, 1), prompt + i), cache=cache)
                times.append(time.perf_counter() - begin)
            cache.close()
            if run:
                prefill_s.append(prefill)
                step_ms.append(1000 * statistics.median(times))
    return {
        "options": options,
        "placement": plan.tiers(),
        "prefill_s": statistics.median(prefill_s),
        "prefill_spread": [min(prefill_s), max(prefill_s)],
        "decode_ms": statistics.median(step_ms),
        "decode_spread": [min(step_ms), max(step_ms)],
        "peak_rss": peak_rss(),
        "base_rss": base,
    }


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``name``'s configuration measured in a fresh interpreter (its peak memory is its own)."""
    spec = json.dumps(
        {"options": CONFIGS[name], "prompt": args.prompt, "steps": args.steps, "runs": args.runs}
    )
    command = [sys.executable, "-m", "bench.offload", "--worker", spec, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict[str, Any]]) -> str:
    base = rows["resident"]
    mib = 1 << 20
    lines = [
        "| configuration | weights resident / on disk (MiB) | KV layers resident / disk | prefill s | × resident "
        "| decode ms/token | × resident | peak RSS MiB | peak − base MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        weights, kv = row["placement"]["weights"], row["placement"]["kv_layers"]
        lines.append(
            f"| {name} | {weights['device'] / mib:.0f} / {weights['disk'] / mib:.0f} "
            f"| {kv.get('device', 0) + kv.get('cpu', 0)} / {kv.get('disk', 0)} "
            f"| {row['prefill_s']:.2f} | {row['prefill_s'] / base['prefill_s']:.2f} "
            f"| {row['decode_ms']:.1f} | {row['decode_ms'] / base['decode_ms']:.2f} "
            f"| {row['peak_rss'] / mib:.0f} | {(row['peak_rss'] - row['base_rss']) / mib:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench offload", description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", choices=tuple(CONFIGS), help="repeatable; default: all")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    p.add_argument("--steps", type=int, default=32, help="decode steps after the prefill")
    p.add_argument("--runs", type=int, default=3, help="timed rounds per configuration (after a warm-up)")
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))), help="torch threads")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["options"], spec["prompt"], spec["steps"], spec["runs"], args.threads)))
        return 0
    names = ["resident", *[n for n in (args.config or CONFIGS) if n != "resident"]]
    rows = {}
    for name in names:
        rows[name] = run_config(name, args)
        print(
            f"{name}: prefill {rows[name]['prefill_s']:.2f} s, decode {rows[name]['decode_ms']:.1f} ms/token, "
            f"peak {rows[name]['peak_rss'] >> 20} MiB",
            flush=True,
        )
    print(table(rows))
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(
        json.dumps(
            {
                "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": " ".join(["python -m bench offload", *(sys.argv[1:] if argv is None else argv)]),
                "model": "smollm2 (30 blocks, bf16), one CPU span",
                "prompt": args.prompt,
                "steps": args.steps,
                "runs": args.runs,
                "threads": args.threads,
                "rows": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
