"""``python -m bench api``: time to first token and time per token through the HTTP API against the
Python API, on the same swarm at the same time.

One swarm (SmolLM2 split over two servers behind the WAN proxy of each ``--link``), one Python client
(``AutoDistributedModelForCausalLM`` in this process) and one ``bloombee api`` process in front of the
same swarm, driven by the ``openai`` package with streaming. Both generate greedily from the same
token ids, alternating run by run so that load from elsewhere falls on both alike:

* **first token**: from the call to the first new token (Python: the streamer's first ``put``; API: the
  first streamed chunk carrying text);
* **per token**: from the first new token to the last, over the tokens in between.

The API's cost is the median over runs of the difference between the two paths' back-to-back
generations (targets: at most 30 ms more to the first token, 5 ms more per token).
Results: bench/results/api.json and a table on stdout.

    python -m bench api [--link 0ms --link 20ms] [--runs 5] [--tokens 48]
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

from bench.floors import LINKS, parse_link
from bench.models import even_cuts, load_bench_model

RESULTS = Path(__file__).parent / "results" / "api.json"
TARGET_FIRST_MS, TARGET_TOKEN_MS = 30.0, 5.0
# greedy SmolLM2 writes on past 64 tokens from this (no end of sequence to cut a run short)
TEXT = "Here is a long story about a dragon who lived in the mountains. Once upon a time,"


class _Clock:
    """A streamer that notes when the first new token and the last one arrive."""

    def __init__(self) -> None:
        self.prompt_seen, self.first, self.last, self.tokens = False, None, None, 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        self.first = self.first or now
        self.last, self.tokens = now, self.tokens + value.numel()

    def end(self) -> None:
        pass


def python_run(client: Any, ids: torch.Tensor, tokens: int) -> dict[str, float]:
    clock = _Clock()
    begin = time.perf_counter()
    with torch.no_grad():
        client.generate(ids, max_new_tokens=tokens, do_sample=False, streamer=clock)
    return _timing(begin, clock.first, clock.last, clock.tokens)


def api_run(api: Any, name: str, ids: list[int], tokens: int) -> dict[str, float]:
    begin = time.perf_counter()
    first = last = None
    count = 0
    stream = api.completions.create(
        model=name,
        prompt=ids,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            first = first or now
            last = now
    return _timing(begin, first, last, count)


def _timing(begin: float, first: float | None, last: float | None, tokens: int) -> dict[str, float]:
    if first is None or last is None or tokens < 2:
        raise RuntimeError(f"the generation produced {tokens} tokens: too few to time")
    return {"first_s": first - begin, "per_token_s": (last - first) / (tokens - 1), "tokens": tokens}


def run_link(link_name: str, runs: int, tokens: int) -> dict[str, Any]:
    import openai
    from transformers import AutoTokenizer

    from bench.runner import swarm_client
    from bench.swarm import Child, free_port
    from bloombee_core.roles import READY

    model = load_bench_model("smollm2")
    # real text: a random prompt's first new token is often a lone byte of a character, which an API
    # holds back until the character is whole (the Python streamer gets the token itself)
    ids = torch.tensor([AutoTokenizer.from_pretrained(model.path)(TEXT)["input_ids"]])
    with swarm_client(model, even_cuts(model.num_blocks, 2), parse_link(link_name), 1, 240.0) as (
        client,
        swarm,
    ):
        port = free_port()
        argv = ["-m", "bloombee_core.cli", "api", str(model.path), "--initial-peers", *swarm.initial_peers]
        argv += ["--port", str(port), "--name", "bench", "--dtype", str(model.dtype).removeprefix("torch.")]
        server = Child("api", [sys.executable, *argv], swarm.log_dir, {"OMP_NUM_THREADS": "1"})
        try:
            server.wait_for(READY + " api", 240.0)
            api = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300
            )
            api_run(api, "bench", ids[0].tolist(), 4)  # warm-up: both paths have routed and measured links
            python_run(client, ids, 4)
            samples: dict[str, list[dict[str, float]]] = {"python": [], "api": []}
            for run in range(runs):
                order = ("python", "api") if run % 2 == 0 else ("api", "python")
                for which in order:
                    if which == "python":
                        samples["python"].append(python_run(client, ids, tokens))
                    else:
                        samples["api"].append(api_run(api, "bench", ids[0].tolist(), tokens))
        finally:
            server.stop()
    return summarize(link_name, samples)


def summarize(link_name: str, samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    def median(which: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[which])

    row: dict[str, Any] = {"link": link_name, "runs": len(samples["python"])}
    for which in ("python", "api"):
        row[which] = {
            "first_ms": 1000 * median(which, "first_s"),
            "per_token_ms": 1000 * median(which, "per_token_s"),
            "tokens": median(which, "tokens"),
            "first_ms_runs": [round(1000 * s["first_s"], 1) for s in samples[which]],
            "per_token_ms_runs": [round(1000 * s["per_token_s"], 2) for s in samples[which]],
        }
    # what the API adds: the median over runs of (API − Python), each pair measured back to back
    for key, name in (("first_s", "added_first_ms"), ("per_token_s", "added_per_token_ms")):
        pairs = zip(samples["api"], samples["python"], strict=True)
        row[name] = 1000 * statistics.median(a[key] - p[key] for a, p in pairs)
    row["meets_targets"] = (
        row["added_first_ms"] <= TARGET_FIRST_MS and row["added_per_token_ms"] <= TARGET_TOKEN_MS
    )
    return row


def one_line(row: dict[str, Any]) -> str:
    py, api = row["python"], row["api"]
    return (
        f"{row['link']:>5}  first token: python {py['first_ms']:7.1f} ms  api {api['first_ms']:7.1f} ms  "
        f"(+{row['added_first_ms']:.1f}, target ≤ {TARGET_FIRST_MS:g})   per token: python "
        f"{py['per_token_ms']:6.2f} ms  api {api['per_token_ms']:6.2f} ms  (+{row['added_per_token_ms']:.2f}, "
        f"target ≤ {TARGET_TOKEN_MS:g})  {py['tokens']:.0f} tokens × {row['runs']} runs"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench api", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--link", action="append", choices=tuple(LINKS), help="repeatable; default: 0ms, 20ms"
    )
    parser.add_argument("--runs", type=int, default=5, help="generations per path, alternating")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # like the servers and the API process: one torch thread each
    rows = []
    for link in args.link or ["0ms", "20ms"]:
        row = run_link(link, args.runs, args.tokens)
        print(one_line(row), flush=True)
        rows.append(row)
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench api " + " ".join(argv if argv is not None else sys.argv[2:]),
        "load_average": os.getloadavg()[0],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0
