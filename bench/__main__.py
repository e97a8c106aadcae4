"""``python -m bench``: run benchmark scenarios, write bench/results/latest.json, docs/benchmarks.md and plots.

With no arguments it sweeps everything (every scenario × model × 2 and 3 servers × every link). Choose
a subset with ``--scenario/--model/--servers/--link`` (each repeatable); ``--quick`` is a small sweep.
Results of a partial run replace only their own rows in the JSON file and the table.
``python -m bench speculative ...`` runs the speculative-decoding benchmark instead (bench/speculative.py),
``python -m bench pipeline ...`` the micro-batch pipeline and chunked prefill on vs off (bench/pipeline.py),
``python -m bench concurrent ...`` concurrent clients through one server, batching on vs off (bench/concurrent.py),
``python -m bench finetune ...`` a fine-tuning step (LoRA, deep prompts) through the swarm beside its floor (bench/finetune.py),
``python -m bench offload ...`` prefill and decode with weights and KV cache offloaded to disk (bench/offload.py),
``python -m bench links ...`` auto compression against none on capped links (bench/links.py),
``python -m bench api ...`` time to first token and per token through the HTTP API against the Python API (bench/api.py),
``python -m bench defaults ...`` batch-1 decode with a user's defaults beside the tuned setup (bench/defaults.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import traceback
from typing import Any

from bench.floors import DEFAULT_LINKS, LINKS
from bench.models import MODEL_KEYS

ALL_SCENARIOS = ("decode", "prefill128", "prefill2048", "batch16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", choices=ALL_SCENARIOS, help="repeatable; default: all")
    p.add_argument(
        "--model", action="append", choices=MODEL_KEYS, help="repeatable; default: tiny and smollm2"
    )
    p.add_argument(
        "--servers", action="append", type=int, choices=(2, 3), help="repeatable; default: 2 and 3"
    )
    p.add_argument(
        "--link", action="append", choices=tuple(LINKS), help="repeatable; default: 0ms, 20ms, 50ms"
    )
    p.add_argument(
        "--variant",
        default="",
        choices=("", "coalesce"),
        help="run a trial hot-path fix from bench/fastpath.py (rows are labelled with it)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per scenario (median and spread over them)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (client, servers, local)"
    )
    p.add_argument("--quick", action="store_true", help="tiny model, 2 servers, 0 and 20 ms, short scenarios")
    p.add_argument("--report-only", action="store_true", help="re-render the table and plots from the JSON")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    if args.quick:
        args.model = args.model or ["tiny"]
        args.servers = args.servers or [2]
        args.link = args.link or ["0ms", "20ms"]
        args.scenario = args.scenario or ["decode", "prefill128", "batch16"]
    args.scenario = args.scenario or list(ALL_SCENARIOS)
    args.model = args.model or list(MODEL_KEYS)
    args.servers = args.servers or [2, 3]
    args.link = args.link or list(DEFAULT_LINKS)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Every benchmark stopped with Ctrl-C or `kill PID` must still stop its swarms (children run in
    # their own process groups, so only this process gets the signal). A shell's background job
    # ignores SIGINT; SIGTERM would end the process without running any cleanup.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    if argv[:1] == ["concurrent"]:
        from bench import concurrent

        return concurrent.main(argv[1:])
    if argv[:1] == ["speculative"]:
        from bench import speculative

        return speculative.main(argv[1:])
    if argv[:1] == ["defaults"]:
        from bench import defaults

        return defaults.main(argv[1:])
    if argv[:1] == ["finetune"]:
        from bench import finetune

        return finetune.main(argv[1:])
    if argv[:1] == ["offload"]:
        from bench import offload

        return offload.main(argv[1:])
    if argv[:1] == ["links"]:
        from bench import links

        return links.main(argv[1:])
    if argv[:1] == ["api"]:
        from bench import api

        return api.main(argv[1:])
    if argv[:1] == ["pipeline"]:
        from bench import pipeline

        return pipeline.main(argv[1:])
    args = parse_args(argv)
    from rich.console import Console

    from bench import report

    console = Console(stderr=True)
    old = report.load_results()
    if args.report_only:
        meta = _load_meta()
        _write(old, meta, console)
        return 0

    load_before = os.getloadavg()[0]
    rows, errors = sweep(args, console)
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {_cpu_count()} CPUs, {platform.system()}",
        "runs": args.runs,
        "threads": args.threads,
        "quick": args.quick,
        "errors": errors,
        "load_average": f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end",
    }
    _write(report.merge_results(old, rows), meta, console)
    for error in errors:
        console.print(f"[red]failed:[/] {error}")
    return 1 if errors else 0


def sweep(args: argparse.Namespace, console: Any) -> tuple[list[dict[str, Any]], list[str]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.models import load_bench_model
    from bench.runner import LocalReference, run_group, scenarios, set_threads

    set_threads(args.threads)
    chosen = [scenarios(args.quick)[name] for name in args.scenario]
    groups = [(m, n, link) for m in args.model for n in args.servers for link in args.link]
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("benchmarks", total=len(groups) * len(chosen))
        locals_: dict[str, LocalReference] = {}
        for model_key, servers, link in groups:
            label = f"{model_key}, {servers} servers, {link}"
            try:
                if model_key not in locals_:
                    progress.update(task, description=f"{model_key}: preparing model and local references")
                    locals_[model_key] = LocalReference(load_bench_model(model_key))
                local = locals_[model_key]
                progress.update(task, description=f"{label}: local compute + baseline, then the swarm")

                def on_row(row: dict[str, Any], label: str = label) -> None:
                    rows.append(row)
                    progress.advance(task)
                    progress.console.print(_one_line(row))
                    progress.update(task, description=f"{label}: running")

                done = len(rows)
                run_group(
                    local.model,
                    servers,
                    link,
                    chosen,
                    local,
                    args.runs,
                    args.threads,
                    args.quick,
                    on_row=on_row,
                    variant=args.variant,
                )
            except KeyboardInterrupt:
                errors.append(f"{label}: interrupted")
                break
            except Exception as exc:  # noqa: BLE001 - one broken group must not lose the others' results
                errors.append(f"{label}: {type(exc).__name__}: {exc}".splitlines()[0])
                progress.console.print(f"[red]{label} failed[/]\n{traceback.format_exc(limit=4)}")
                progress.advance(task, len(chosen) - (len(rows) - done))
    return rows, errors


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _one_line(row: dict[str, Any]) -> str:
    what = f"{row['tokens_per_s']:.1f} tok/s" if row["tokens_per_s"] else f"{row['median_s'] * 1000:.0f} ms"
    return (
        f"{row['scenario']:<11} {row['model']:<8} {row['servers']} servers {row['link']:>5}: {what:>12}  "
        f"×floor {row['ratio_to_floor']:.2f}  ×baseline {row['ratio_to_baseline']:.2f}"
    )


def _write(results: list[dict[str, Any]], meta: dict[str, Any], console: Any) -> None:
    from bench import report

    report.save_results(results, meta)
    report.update_doc(results, meta)
    images = report.plot(results)
    console.print(f"wrote {report.RESULTS_JSON}, {report.DOC}" + "".join(f", {p}" for p in images))


def _load_meta() -> dict[str, Any]:
    import json

    from bench.report import RESULTS_JSON

    return json.loads(RESULTS_JSON.read_text()).get("meta", {}) if RESULTS_JSON.is_file() else {}


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
