"""Scenarios and the sweep: one swarm per model × split × link, local references sampled beside it.

Per swarm, every scenario runs ``runs`` times after a short warm-up; each run's time per decode step
(total decode time / steps) or time to the first token is one sample. Σ compute for the floor comes
from the same split run locally (:class:`bench.compute.LocalSplit`); the baseline is local transformers
``generate`` of the whole model. Both are sampled in the same process, interleaved with the swarm runs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from bench.compute import LocalSplit, SplitCompute, load_reference, timed_generate
from bench.floors import Link, decode_floor, parse_link, prefill_floor
from bench.models import BenchModel, even_cuts, random_prompt, split_label
from bench.report import make_result


@dataclass(frozen=True)
class Scenario:
    name: str
    batch: int
    prompt_tokens: int
    new_tokens: int  # 1 for prefill scenarios: the measured time is the time to the first token

    @property
    def per_step(self) -> bool:
        return self.new_tokens > 1


def scenarios(quick: bool = False) -> dict[str, Scenario]:
    new = 8 if quick else 32
    return {
        "decode": Scenario("decode", 1, 16, new + 1),
        "prefill128": Scenario("prefill128", 1, 128, 1),
        "prefill2048": Scenario("prefill2048", 1, 2048, 1),
        "batch16": Scenario("batch16", 16, 16, new + 1),
    }


def command_for(
    scenario: str, model: str, servers: int, link: str, runs: int, quick: bool, variant: str = ""
) -> str:
    extra = (" --quick" if quick else "") + (f" --runs {runs}" if runs != 3 else "")
    extra += f" --variant {variant}" if variant else ""
    return f"python -m bench --scenario {scenario} --model {model} --servers {servers} --link {link}{extra}"


def sample(timing: Any, scenario: Scenario) -> float:
    """One run's number: mean seconds per decode step, or seconds to the first token."""
    if scenario.per_step:
        return timing.decode_total_s / len(timing.step_s)
    return timing.prefill_s


class LocalReference:
    """Baseline (local transformers) and Σ compute (the split run locally) for one model.

    Models are loaded once; every sample is taken on demand, so a sweep can interleave local and swarm
    runs and all of them see the same (shared, noisy) machine.
    """

    def __init__(self, model: BenchModel) -> None:
        self.model = model
        self._reference: Any = None
        self._splits: dict[tuple[int, ...], LocalSplit] = {}
        self.cached: dict[tuple[tuple[int, ...], str], tuple[list[float], list[float]]] = {}

    def reference(self) -> Any:
        if self._reference is None:
            self._reference = load_reference(self.model)
        return self._reference

    def split(self, cuts: list[int]) -> LocalSplit:
        if tuple(cuts) not in self._splits:
            self._splits[tuple(cuts)] = LocalSplit(self.model, cuts)
        return self._splits[tuple(cuts)]

    def warm_up(self, cuts: list[int], scenario: Scenario, ids: torch.Tensor) -> None:
        timed_generate(self.reference(), ids, min(scenario.new_tokens, 2))
        self.split(cuts).run(ids, min(scenario.new_tokens, 2))

    def baseline_sample(self, scenario: Scenario, ids: torch.Tensor) -> float:
        return sample(timed_generate(self.reference(), ids, scenario.new_tokens), scenario)

    def compute_sample(self, cuts: list[int], scenario: Scenario, ids: torch.Tensor) -> float:
        prefill, steps = self.split(cuts).run(ids, scenario.new_tokens)
        return _mean_total(steps) if scenario.per_step else prefill.total_s


def _mean_total(steps: list[SplitCompute]) -> float:
    return sum(s.total_s for s in steps) / len(steps)


def floor_for(model: BenchModel, scenario: Scenario, servers: int, link: Link, compute_s: float):
    if scenario.per_step:
        return decode_floor(servers, link, compute_s, model.hidden_size, model.itemsize, batch=scenario.batch)
    return prefill_floor(
        servers,
        link,
        compute_s,
        scenario.prompt_tokens,
        model.hidden_size,
        model.itemsize,
        batch=scenario.batch,
    )


@contextmanager
def swarm_client(
    model: BenchModel,
    cuts: list[int],
    link: Link,
    threads: int | None,
    ready_timeout: float,
    variant: str = "",
    proxy_per_server: bool = False,
    dtype: torch.dtype | None = None,
    server_args: list[str] | None = None,
    client_options: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """A running swarm for ``cuts`` behind ``link`` and a client connected to it: yields (client, swarm).
    ``threads``: the servers' torch threads (None: their default); ``dtype``: servers' and client's
    (default: the bench model's); ``server_args``: extra ``bloombee serve`` flags; ``client_options``:
    extra ``from_pretrained`` keywords."""
    from bench.fastpath import patched
    from bench.swarm import BenchSwarm
    from bloombee_core.client import AutoDistributedModelForCausalLM

    dtype = dtype or model.dtype
    swarm_at = BenchSwarm(
        model.path,
        cuts,
        link,
        dtype=str(dtype).removeprefix("torch."),
        threads=threads,
        variant=variant,
        proxy_per_server=proxy_per_server,
        server_args=server_args,
    )
    with patched(variant), swarm_at as swarm:
        client = AutoDistributedModelForCausalLM.from_pretrained(
            model.path, initial_peers=swarm.initial_peers, dtype=dtype, **(client_options or {})
        )
        try:
            _wait_until_served(client, model, swarm, ready_timeout)
            yield client, swarm
        finally:
            for method in ("shutdown", "close"):
                if callable(getattr(client, method, None)):
                    getattr(client, method)()
                    break


def _wait_until_served(client: Any, model: BenchModel, swarm: Any, timeout: float) -> None:
    """Servers announce themselves a moment after starting: retry a 2-token generation until it works."""
    ids = random_prompt(model.vocab_size, 1, 4)
    deadline = time.monotonic() + timeout
    while True:
        swarm.check_alive()
        try:
            timed_generate(client, ids, 2)
            return
        except Exception as exc:  # noqa: BLE001 - routing fails until every block is announced
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the swarm did not serve a generation within {timeout:.0f}s: {exc}"
                ) from exc
            time.sleep(1.0)


def run_group(
    model: BenchModel,
    servers: int,
    link_name: str,
    chosen: list[Scenario],
    local: LocalReference,
    runs: int,
    threads: int,
    quick: bool,
    on_row: Callable[[dict[str, Any]], None],
    ready_timeout: float = 120.0,
    variant: str = "",
) -> None:
    """Every chosen scenario on one swarm (model split over ``servers``, each behind ``link_name``)."""
    link = parse_link(link_name)
    cuts = even_cuts(model.num_blocks, servers)
    local.split(cuts)  # load before the swarm starts
    with swarm_client(model, cuts, link, threads, ready_timeout, variant) as (client, _):
        for scenario in chosen:
            ids = random_prompt(model.vocab_size, scenario.batch, scenario.prompt_tokens)
            if scenario.prompt_tokens <= 128:  # a full warm-up of a 2048-token prefill costs a whole run
                local.warm_up(cuts, scenario, ids)
                timed_generate(client, ids, min(scenario.new_tokens, 2))
            # Interleaved: each round samples the local split, the local baseline and the swarm back to back,
            # so a burst of load from elsewhere on the machine hits all three alike.
            # A long prefill's local numbers do not depend on the link: sample them beside the first swarm
            # that needs them and reuse them for the other links (a full sweep must stay within minutes).
            reuse = local.cached.get((tuple(cuts), scenario.name)) if scenario.prompt_tokens >= 1024 else None
            swarm: list[float] = []
            compute, baseline = (list(reuse[0]), list(reuse[1])) if reuse else ([], [])
            for _ in range(runs):
                if reuse is None:
                    compute.append(local.compute_sample(cuts, scenario, ids))
                    baseline.append(local.baseline_sample(scenario, ids))
                swarm.append(sample(timed_generate(client, ids, scenario.new_tokens), scenario))
            local.cached[(tuple(cuts), scenario.name)] = (compute, baseline)
            on_row(
                make_result(
                    scenario=scenario.name,
                    model=model.key,
                    model_label=model.label,
                    servers=servers,
                    split=split_label(cuts),
                    link=link_name,
                    batch=scenario.batch,
                    prompt_tokens=scenario.prompt_tokens,
                    new_tokens=scenario.new_tokens,
                    runs_s=swarm,
                    floor=floor_for(model, scenario, servers, link, statistics.median(compute)),
                    baseline_s=statistics.median(baseline),
                    command=command_for(scenario.name, model.key, servers, link_name, runs, quick, variant),
                    variant=variant,
                    notes=f"load average {os.getloadavg()[0]:.1f} at the end",
                )
            )


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
