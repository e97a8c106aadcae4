"""Where a decode step's time goes: py-spy samples of the client and every server during a long decode.

    python -m bench.profile --link direct --tokens 200      # framework overhead without any proxy
    python -m bench.profile --link 0ms                      # with the proxies in the path

Starts a benchmark swarm (tiny LLaMA by default), decodes ``--tokens`` tokens while ``py-spy record``
samples each process (CPU time, not idle waits, ``--nonblocking`` so the sampled process never stops),
then prints per process: the share of samples by category (model compute, wire encoding, asyncio,
hivemind / p2p, transformers generate, ...) and the hottest functions. Raw stacks are kept under
``$TMPDIR/bloombee-bench-profile/`` (collapsed format; feed them to speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

OUT = Path(tempfile.gettempdir()) / "bloombee-bench-profile"

# First match wins, tested from the leaf frame upwards: the innermost frame we recognise names the cost.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("model compute (torch layers)", ("torch/nn/", "modeling_", "torch/_tensor", "torch/functional", "sdpa")),
    ("wire encode/decode", ("bloombee_core/swarm/wire", "msgpack", "compression", "bloombee_compress")),
    ("hivemind / p2p", ("hivemind/",)),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
    ("transformers generate", ("generation/", "masking_utils", "cache_utils")),
    ("bloombee swarm (other)", ("bloombee_core/",)),
]


def categorize(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarize(raw: Path, top: int = 12) -> str:
    """Category shares and the hottest leaf functions of one py-spy raw (collapsed) file."""
    categories: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        total += count
        categories[categorize(stack)] += count
        leaves[stack[-1]] += count
    if total == 0:
        return f"{raw.name}: no samples (the process was idle)"
    lines = [f"{raw.stem}: {total} CPU samples"]
    lines += [f"  {share / total:6.1%}  {name}" for name, share in categories.most_common()]
    lines.append("  hottest functions (self time):")
    lines += [f"  {n / total:6.1%}  {name[:110]}" for name, n in leaves.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--link", default="direct")
    p.add_argument("--tokens", type=int, default=200, help="tokens decoded while sampling")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", default="", help="a trial fix from bench/fastpath.py (e.g. coalesce)")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="no sampling: CPU seconds per decode step of every process group (robust on a shared machine)",
    )
    args = p.parse_args(argv)
    if args.cpu:
        return cpu_per_step(args)
    if shutil.which("py-spy") is None:
        p.error("py-spy is not installed (pip install py-spy)")

    from bench.compute import timed_generate
    from bench.floors import parse_link
    from bench.models import even_cuts, load_bench_model, random_prompt
    from bench.runner import set_threads, swarm_client

    set_threads(args.threads)
    model = load_bench_model(args.model)
    cuts = even_cuts(model.num_blocks, args.servers)
    OUT.mkdir(parents=True, exist_ok=True)
    ids = random_prompt(model.vocab_size, 1, 16)
    with swarm_client(model, cuts, parse_link(args.link), args.threads, 120.0, args.variant) as (
        client,
        swarm,
    ):
        timed_generate(client, ids, 8)  # warm-up
        targets = {"client": os.getpid()} | {
            c.name: c.proc.pid for c in swarm.children if c.name.startswith("server")
        }
        recorders = {}
        for name, pid in targets.items():
            out = OUT / f"{args.link}-{name}.txt"
            argv_ = ["py-spy", "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw"]
            argv_ += ["--nonblocking", "--output", str(out)]
            recorders[name] = (
                subprocess.Popen(argv_, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                out,
            )
        time.sleep(1.0)  # py-spy attaches
        before = swarm.proxy_bytes() if swarm.proxy_ports else None
        timing = timed_generate(client, ids, args.tokens)
        after = swarm.proxy_bytes() if swarm.proxy_ports else None
        for proc, _ in recorders.values():
            proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        for name, (proc, out) in recorders.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if not out.is_file():
                print(f"{name}: py-spy wrote nothing: {proc.stderr.read().decode(errors='replace')[-500:]}")
    step_ms = timing.decode_total_s / len(timing.step_s) * 1000
    print(f"{args.model}, {args.servers} servers, link {args.link}: {step_ms:.2f} ms per decode step")
    if before is not None and after is not None:
        steps = args.tokens  # the prefill's bytes are included, spread over the steps
        hidden = model.hidden_size * model.itemsize
        print(f"bytes per decode step through each server's link (one hidden state = {hidden} B):")
        for i, ((up0, down0), (up1, down1)) in enumerate(zip(before, after, strict=True)):
            print(
                f"  server{i}: to it {(up1 - up0) / steps:8.0f} B   from it {(down1 - down0) / steps:8.0f} B"
            )
    for _, out in recorders.values():
        if out.is_file():
            print(summarize(out))
    return 0


def cpu_per_step(args: argparse.Namespace) -> int:
    """CPU time (not wall time) per decode step, per process group: contention barely moves it."""
    from bench.compute import LocalSplit, timed_generate
    from bench.floors import parse_link
    from bench.models import even_cuts, load_bench_model, random_prompt
    from bench.runner import set_threads, swarm_client
    from bench.swarm import group_cpu_seconds

    set_threads(args.threads)
    model = load_bench_model(args.model)
    cuts = even_cuts(model.num_blocks, args.servers)
    ids = random_prompt(model.vocab_size, 1, 16)
    split = LocalSplit(model, cuts)
    split.run(ids, 8)
    cpu = time.process_time()
    split.run(ids, args.tokens + 1)
    local_ms = (time.process_time() - cpu) / args.tokens * 1000
    with swarm_client(model, cuts, parse_link(args.link), args.threads, 120.0, args.variant) as (
        client,
        swarm,
    ):
        timed_generate(client, ids, 8)  # warm-up
        groups = {"client": os.getpgid(0)} | {
            c.name: c.proc.pid for c in swarm.children if c.name != "bootstrap"
        }
        before = {name: group_cpu_seconds(pgid) for name, pgid in groups.items()}
        timing = timed_generate(client, ids, args.tokens + 1)
        after = {name: group_cpu_seconds(pgid) for name, pgid in groups.items()}
    wall_ms = timing.decode_total_s / len(timing.step_s) * 1000
    label = f"{args.model}, {args.servers} servers, link {args.link}" + (
        f", variant {args.variant}" if args.variant else ""
    )
    print(f"{label}: {wall_ms:.2f} ms wall per decode step; CPU ms per step (prefill included, spread):")
    total = 0.0
    for name in groups:
        parts = {k: (v - before[name].get(k, 0.0)) / args.tokens * 1000 for k, v in after[name].items()}
        total += sum(parts.values())
        detail = "  ".join(f"{k} {v:5.2f}" for k, v in sorted(parts.items()))
        print(f"  {name:<8} {sum(parts.values()):6.2f}   ({detail})")
    print(
        f"  {'all':<8} {total:6.2f}   (the same split run locally: {local_ms:.2f}; the rest is framework + p2pd)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
