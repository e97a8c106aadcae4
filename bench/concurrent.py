"""``python -m bench concurrent``: N concurrent clients through one server, cross-session batching on vs off.

One server hosts every block of the model (no proxy: the loopback "direct" link), once with batching on
(the defaults) and once with ``--max-batch-tokens 0`` (each step computed alone, one after another:
serial service). For each N of ``--clients`` (default 1, 4, 8, 16), N clients, each with its own model
and session and a random prompt of its own length, generate ``--tokens`` greedy tokens at once.

Numbers per (model, batching, N): aggregate decode tokens/s (all clients' new tokens over the wall time
of the round), per-client latency per token (median and worst client), and the steps the server
computed in batched forwards (from its ``info``). Beside them, the floor measured in this process: one
batched forward of N decode steps over the whole span (the server's compute with no network), as
tokens/s. Targets: with 8 clients, batching on >= 3x the aggregate tokens/s of serial service, and each
client's latency <= 1.5x that of a client alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.floors import LINKS
from bench.models import MODEL_KEYS, load_bench_model, random_prompt
from bench.swarm import READY, BenchSwarm, Child
from bloombee_core.roles import parse_ready

RESULTS = Path(__file__).resolve().parent / "results" / "concurrent.json"


class _OneServer(BenchSwarm):
    """A bench swarm whose servers get extra flags."""

    def __init__(self, *args: Any, server_args: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_args = server_args

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        if name.startswith("server"):
            args = [*args, *self.server_args]
        return super()._spawn(name, args, env)


def batched_floor(path: Path, clients: int, repeats: int = 20) -> float:
    """Decode tokens/s of one batched forward of ``clients`` sessions over the whole model, in process."""
    from bloombee_core import load_plugins
    from bloombee_core.model import load_config
    from bloombee_core.model.batch import BatchItem, batched_forward

    config = load_config(path)
    family = load_plugins().family_for(config)
    span = family.load_span(path, config, 0, family.num_blocks(config), torch.float32)
    caches = [span.new_cache(1, 64) for _ in range(clients)]
    hidden = torch.randn(1, 1, config.hidden_size)
    with torch.inference_mode():
        for i, cache in enumerate(caches):  # pasts of different lengths, as the clients' prompts
            n = 8 + i
            span(torch.randn(1, n, config.hidden_size), position_ids=torch.arange(n)[None], cache=cache)
        times = []
        for _ in range(repeats):
            items = [BatchItem(c, hidden, torch.tensor([[c.length]])) for c in caches]
            begin = time.perf_counter()
            batched_forward(span, items)
            times.append(time.perf_counter() - begin)
            for cache in caches:  # keep the pasts where they were
                cache.kv.crop(-1)
                cache.length -= 1
    return clients / statistics.median(times)


def one_round(models: list, vocab: int, tokens: int) -> tuple[float, list[float]]:
    """All clients generate at once; (wall seconds, each client's seconds per new token)."""
    latencies: list[float] = [0.0] * len(models)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(models))

    def client(i: int) -> None:
        ids = random_prompt(vocab, 1, 8 + i, seed=i + 1)
        try:
            barrier.wait(60)
            begin = time.perf_counter()
            with torch.no_grad():
                models[i].generate(ids, max_new_tokens=tokens, do_sample=False)
            latencies[i] = (time.perf_counter() - begin) / tokens
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(models))]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - begin, latencies


class _Workers:
    """Client processes (``--processes``): each loads its own model and generates when told, as users on
    other machines would; nothing they do shares this process's interpreter lock."""

    def __init__(self, path: Path, peers: list[str], count: int, vocab: int, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.concurrent",
                    "--worker",
                    str(path),
                    str(vocab),
                    str(i),
                    str(threads),
                ]
                + peers,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                start_new_session=True,
            )
            for i in range(count)
        ]
        for proc in self.procs:
            self._expect(proc, "ready")

    @staticmethod
    def _expect(proc: subprocess.Popen, word: str) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(word):
            raise RuntimeError(
                f"client process {proc.pid} said {line!r}, expected {word!r} (exit {proc.poll()})"
            )
        return line[len(word) :].strip()

    def round(self, n: int, tokens: int) -> tuple[float, list[float]]:
        """The first ``n`` clients generate ``tokens`` tokens at once; (wall seconds, s per new token each)."""
        begin = time.perf_counter()
        for proc in self.procs[:n]:
            assert proc.stdin is not None
            proc.stdin.write(f"{tokens}\n")
            proc.stdin.flush()
        latencies = [float(self._expect(proc, "done")) / tokens for proc in self.procs[:n]]
        return time.perf_counter() - begin, latencies

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def worker(argv: list[str]) -> int:
    """One client process: ``PATH VOCAB SEED THREADS PEER...``; on each stdin line N, generates N tokens
    and prints ``done SECONDS``; leaves when stdin closes."""
    from bloombee_core.client import AutoDistributedModelForCausalLM

    path, vocab, seed, threads, peers = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4:]
    torch.set_num_threads(threads)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, peers)
    ids = random_prompt(vocab, 1, 8 + seed, seed=seed + 1)
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: routes, connections
            print("ready", flush=True)
            for line in sys.stdin:
                begin = time.perf_counter()
                model.generate(ids, max_new_tokens=int(line), min_new_tokens=int(line), do_sample=False)
                print(f"done {time.perf_counter() - begin}", flush=True)
    finally:
        model.close()
    return 0


def run(
    model_key: str, client_counts: list[int], tokens: int, threads: int, processes: bool = False
) -> list[dict[str, Any]]:
    from bloombee_core.client import AutoDistributedModelForCausalLM

    bench_model = load_bench_model(model_key)
    rows = []
    floors = {n: batched_floor(bench_model.path, n) for n in client_counts}
    for batching in (True, False):
        flags = [] if batching else ["--max-batch-tokens", "0"]
        cuts = [0, bench_model.num_blocks]
        with _OneServer(bench_model.path, cuts, LINKS["direct"], threads=threads, server_args=flags) as swarm:
            count = 1 if processes else max(client_counts)  # in-process clients, or one to ask the server
            models = [
                AutoDistributedModelForCausalLM.from_pretrained(bench_model.path, swarm.initial_peers)
                for _ in range(count)
            ]
            workers = None
            try:
                one_round(models[:1], bench_model.vocab_size, 4)  # warm-up
                server = next(c for c in swarm.children if c.name.startswith("server"))
                peer = parse_ready(server.wait_for(READY, 5).strip())[1]["peer"]
                if processes:
                    workers = _Workers(
                        bench_model.path,
                        swarm.initial_peers,
                        max(client_counts),
                        bench_model.vocab_size,
                        threads,
                    )
                for n in client_counts:
                    before = _batching(models[0], peer)
                    if workers is not None:
                        wall, latencies = workers.round(n, tokens)
                    else:
                        wall, latencies = one_round(models[:n], bench_model.vocab_size, tokens)
                    row = {
                        "model": model_key,
                        "clients_in": "processes" if processes else "threads",
                        "batching": batching,
                        "clients": n,
                        "aggregate_tokens_per_s": n * tokens / wall,
                        "latency_ms_median": 1000 * statistics.median(latencies),
                        "latency_ms_worst": 1000 * max(latencies),
                        **_batched(before, _batching(models[0], peer)),
                        "floor_tokens_per_s": floors[n],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                if workers is not None:
                    workers.close()
                for model in models:
                    model.close()
    return rows


def _batched(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Steps computed in shared forwards during a round, and how many shared each forward on average."""
    steps = after["batched_steps"] - before["batched_steps"]
    forwards = after["batched_forwards"] - before["batched_forwards"]
    return {"batched_steps": steps, "mean_batch": steps / forwards if forwards else 1.0}


def _batching(model: Any, peer: str) -> dict[str, int]:
    return model.loop.run(model.swarm.info(peer))["batching"]


def summary(rows: list[dict[str, Any]]) -> str:
    lines = [
        "model    batching clients  agg tok/s  lat ms (med/worst)  batched steps (mean batch)  floor tok/s"
    ]
    for r in rows:
        lines.append(
            f"{r['model']:8} {'on' if r['batching'] else 'off':8} {r['clients']:7} {r['aggregate_tokens_per_s']:10.1f}"
            f"  {r['latency_ms_median']:8.1f}/{r['latency_ms_worst']:<8.1f}  {r['batched_steps']:13} ({r.get('mean_batch', 1.0):4.1f})      "
            f"  {r['floor_tokens_per_s']:11.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench concurrent", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", choices=MODEL_KEYS, help="repeatable; default: both")
    p.add_argument("--clients", action="append", type=int, help="repeatable; default: 1, 4, 8, 16")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per client")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and each client")
    p.add_argument(
        "--processes", action="store_true", help="each client in a process of its own (default: threads here)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.model or list(MODEL_KEYS):
        rows += run(key, sorted(args.clients or [1, 4, 8, 16]), args.tokens, args.threads, args.processes)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[2:]) if sys.argv[1:2] == ["--worker"] else main())
