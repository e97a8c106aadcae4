"""``python -m bench speculative``: speculative decoding beside plain greedy decoding, on one swarm.

Per swarm (SmolLM2-135M fp32 split over 2 or 3 servers, each behind the WAN proxy) every run
generates, back to back on the same swarm, plain greedy decoding of each prompt and then every
speculative setting that uses that prompt; ``--runs`` such rounds follow one short warm-up. Two prompts,
both through the model's chat template, greedy:

* **grounded** — asks to rewrite a paragraph written into this file (about 230 tokens, with spelling
  and grammar mistakes) with its mistakes corrected: the answer mostly copies its input, the task prompt
  lookup is for;
* **open** — "Explain how a distributed hash table works.": nothing to copy.

Settings (the strategy's default options unless said: ``max_nodes`` 16, ``max_depth`` 8, adaptive):

* ``lookup-grounded`` — prompt lookup on the grounded prompt;
* ``lookup-open`` — prompt lookup on the open prompt: the adaptive fallback, which should cost at most
  a few percent over plain;
* ``early-exit-N`` — the target's first N blocks + norm + LM head as the drafter, open prompt;
* ``self-draft`` — ``draft-model`` with SmolLM2 itself, open prompt. It always agrees with the target,
  so it is an **upper bound** (what a perfect drafter of the target's cost buys), not a result.

Numbers per run: decode time per token (first new token to last, over the tokens in between: the
prefill is the same work in both), tokens per round, acceptance by depth, and — from instrumenting the
strategy's own objects in this process only — each round's planned depth and the planner's predicted
tokens for it, the drafted tree, the time spent drafting, in the client's LM head and in the round trip.
Speculative greedy output must equal plain greedy output; each row records whether it did.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.floors import LINKS, parse_link
from bench.report import link_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "speculative.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- speculative:start -->", "<!-- speculative:end -->"

# Written for this benchmark; the mistakes are deliberate (the task is to correct them).
PARAGRAPH = (
    "The old lighthouse at Carrow Point was build in 1871 to guide fishing boats trough the narrow "
    "channel between the cliffs and the sandbanks. For almost a century it's keeper lived in a small "
    "stone cottage at the foot of the tower, climbing the one hundred and twelve steps every evening to "
    "light the lamp and wind the clockwork that turned the lens. In 1958 the light was electrified and "
    "the last keeper, a man named Thomas Reed, moved to the village, were he opened a small shop that "
    "sold rope, paint and tinned food to the fishermen. The tower itself was left empty for many years, "
    "and the salt wind slowly striped the white paint from it's walls. In 2004 a group of volunteers "
    "raised enough money to repair the roof, replace the broken windows and open the ground floor as a "
    "museum. Today visitors can see the original lens, the keepers log books and a collection of "
    "photographs that show the harbour as it looked before the new road was built. The museum is open "
    "every weekend from april to october, and entry is free for children under twelve."
)
PROMPTS = {
    "grounded": "Rewrite the following paragraph with its spelling and grammar mistakes corrected. "
    "Change nothing else.\n\n" + PARAGRAPH,
    "open": "Explain how a distributed hash table works.",
}


@dataclass(frozen=True)
class Setting:
    key: str
    prompt: str  # a key of PROMPTS
    drafter: dict[str, Any]
    label: str
    options: dict[str, Any] = field(default_factory=dict)  # strategy options beyond the defaults
    upper_bound: bool = False

    def strategy_choice(self) -> dict[str, Any]:
        return {"name": "speculative", "drafter": self.drafter, **self.options}


def settings(model_path: Path, blocks: list[int]) -> dict[str, Setting]:
    out = [
        Setting("lookup-grounded", "grounded", {"name": "prompt-lookup"}, "prompt lookup, grounded prompt"),
        Setting("lookup-open", "open", {"name": "prompt-lookup"}, "prompt lookup (defaults), open prompt"),
        *(
            Setting(
                f"early-exit-{n}", "open", {"name": "early-exit", "blocks": n}, f"early exit {n} blocks, open"
            )
            for n in blocks
        ),
        Setting(
            "self-draft",
            "open",
            {"name": "draft-model", "path": str(model_path)},
            "UPPER BOUND: SmolLM2 drafts for itself, open",
            upper_bound=True,
        ),
    ]
    return {s.key: s for s in out}


SETTING_KEYS = ("lookup-grounded", "lookup-open", "early-exit", "self-draft")  # early-exit: one per --blocks


def prompt_ids(tokenizer: Any, kind: str) -> torch.Tensor:
    messages = [{"role": "user", "content": PROMPTS[kind]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # newer transformers may answer a BatchEncoding
        ids = ids["input_ids"]
    return ids


# ---- timing one generation -------------------------------------------------------------------------


class _Streamer:
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class Sample:
    """One generation: its tokens and per-token decode time; for speculative runs, what each round did."""

    tokens: list[int]
    decode_s_per_token: float
    prefill_s: float
    total_s: float
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    drafter_begin_s: float = 0.0
    draft_s: float = 0.0
    head_s: float = 0.0
    head_calls: int = 0
    round_trip_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # the tree step alone (swarm + wire), per round


def _timed(call: Callable[[Any], torch.Tensor], prompt_len: int) -> tuple[list[int], float, float, float]:
    streamer = _Streamer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = call(streamer)
    total = time.perf_counter() - start
    tokens = out[0, prompt_len:].tolist()
    times = streamer.times
    if len(times) != len(tokens) + 1 or len(tokens) < 2:
        raise RuntimeError(f"expected {len(tokens) + 1} streamer calls (prompt + tokens), got {len(times)}")
    return tokens, (times[-1] - times[1]) / (len(tokens) - 1), times[1] - times[0], total


def plain_sample(client: Any, ids: torch.Tensor, new_tokens: int, pad: int) -> Sample:
    tokens, per_token, prefill, total = _timed(
        lambda s: client.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            streamer=s,
            pad_token_id=pad,
        ),
        ids.shape[1],
    )
    return Sample(tokens, per_token, prefill, total)


@contextlib.contextmanager
def _patched(obj: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    had = name in vars(obj)
    old = getattr(obj, name)
    setattr(obj, name, make(old))
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def instrumented(client: Any, strategy: Any, sample: Sample) -> Iterator[None]:
    """Record each round of ``strategy.generate`` into ``sample`` by wrapping, for this call only, the
    strategy's statistics, its planner, its drafter and its LM-head calls (nothing outside this process)."""
    from bloombee_decoding import speculative as spec_module
    from bloombee_decoding.cost_model import DraftPlanner

    pending: dict[str, Any] = {}

    def wrap_observe(old: Callable) -> Callable:
        def observe(self: Any, tree: Any, accepted: int, finished: bool) -> None:
            if not finished:
                plan = pending.pop("plan", None)
                sample.rounds.append(
                    {
                        "nodes": len(tree),
                        "depth": max(tree.depths(), default=0),
                        "accepted": accepted,
                        "planned_depth": None if plan is None else plan[0],
                        "planner_predicted": None if plan is None else plan[1],
                    }
                )
            return old(self, tree, accepted, finished)

        return observe

    def wrap_plan(old: Callable) -> Callable:
        def plan(self: Any, *args: Any, **kwargs: Any) -> int:
            depth = old(self, *args, **kwargs)
            pending["plan"] = (depth, self.expected_tokens(depth))
            return depth

        return plan

    def wrap_observe_round(old: Callable) -> Callable:
        def observe_round(self: Any, tokens_sent: int, seconds: float, *args: Any, **kwargs: Any) -> None:
            sample.round_trip_s.append(seconds)
            return old(self, tokens_sent, seconds, *args, **kwargs)

        return observe_round

    def timer(old: Callable, slot: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return old(*args, **kwargs)
            finally:
                setattr(sample, slot, getattr(sample, slot) + time.perf_counter() - t)
                if slot == "head_s":
                    sample.head_calls += 1

        return timed

    def wrap_create(old: Callable) -> Callable:
        def create(kind: str, *args: Any, **kwargs: Any) -> Any:
            plugin = old(kind, *args, **kwargs)
            if kind == "drafters":
                plugin.begin = timer(plugin.begin, "drafter_begin_s")
                plugin.propose = timer(plugin.propose, "draft_s")
            return plugin

        return create

    def wrap_session(old: Callable) -> Callable:
        @contextlib.contextmanager
        def inference_session(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with old(*args, **kwargs) as session:
                step = session.step_tokens
                calls = [0]

                def step_tokens(*a: Any, **k: Any) -> Any:
                    t = time.perf_counter()
                    try:
                        return step(*a, **k)
                    finally:
                        if calls[0]:  # the first call is the prefill
                            sample.step_s.append(time.perf_counter() - t)
                        calls[0] += 1

                session.step_tokens = step_tokens
                yield session

        return inference_session

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(client, "inference_session", wrap_session))
        stack.enter_context(_patched(spec_module._Stats, "observe", wrap_observe))
        stack.enter_context(_patched(DraftPlanner, "plan", wrap_plan))
        stack.enter_context(_patched(DraftPlanner, "observe_round", wrap_observe_round))
        stack.enter_context(_patched(client.plugins, "create", wrap_create))
        stack.enter_context(_patched(strategy, "_distribution", lambda old: timer(old, "head_s")))
        yield


def speculative_sample(client: Any, setting: Setting, ids: torch.Tensor, new_tokens: int) -> Sample:
    strategy = client.plugins.create("decoding_strategies", setting.strategy_choice())
    sample = Sample([], 0.0, 0.0, 0.0)
    with instrumented(client, strategy, sample):
        tokens, per_token, prefill, total = _timed(
            lambda s: strategy.generate(
                client, ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, streamer=s
            ),
            ids.shape[1],
        )
    sample.tokens, sample.decode_s_per_token, sample.prefill_s, sample.total_s = (
        tokens,
        per_token,
        prefill,
        total,
    )
    sample.stats = dict(strategy.last_stats)
    return sample


# ---- what the rounds say ---------------------------------------------------------------------------


def acceptance_counts(rounds: list[dict[str, Any]], max_depth: int = 64) -> tuple[list[int], list[int]]:
    """(offered, accepted) per depth 1.., counted as the strategy counts them: depth d is offered when the
    tree reaches d and the path reached d − 1; accepted when the path reached d."""
    offered, accepted = [0] * max_depth, [0] * max_depth
    for r in rounds:
        for d in range(1, r["depth"] + 1):
            if d <= r["accepted"] + 1:
                offered[d - 1] += 1
                accepted[d - 1] += d <= r["accepted"]
    last = max((i + 1 for i, o in enumerate(offered) if o), default=0)
    return offered[:last], accepted[:last]


def acceptance_by_depth(rounds: list[dict[str, Any]]) -> list[float]:
    offered, accepted = acceptance_counts(rounds)
    return [a / o for a, o in zip(accepted, offered, strict=True)]


def predicted_from_acceptance(rounds: list[dict[str, Any]]) -> float | None:
    """Mean over rounds of 1 + Σ_{d ≤ D} Π_{j ≤ d} a_j, with a_j the measured acceptance by depth and D
    the depth of the round's tree (0 for a plain step): what the acceptance predicts for these rounds.
    A depth no path ever reached has no measured acceptance and counts 0."""
    if not rounds:
        return None
    rates = acceptance_by_depth(rounds)
    total = 0.0
    for r in rounds:
        expected, reach = 1.0, 1.0
        for d in range(r["depth"]):
            reach *= rates[d] if d < len(rates) else 0.0
            expected += reach
        total += expected
    return total / len(rounds)


def planner_predicted(rounds: list[dict[str, Any]]) -> float | None:
    """Mean over rounds of the planner's expected tokens for the depth it chose (1 where it chose no
    draft or was not asked: the last tokens of a generation)."""
    if not rounds:
        return None
    return sum(r["planner_predicted"] or 1.0 for r in rounds) / len(rounds)


def tokens_per_round(rounds: list[dict[str, Any]]) -> float:
    return sum(r["accepted"] + 1 for r in rounds) / len(rounds) if rounds else 0.0


def step_cost_fit(round_times: list[list[Any]]) -> dict[str, float] | None:
    """Least squares ``step seconds ≈ t0 + per_node × nodes`` over every round (what one more drafted
    token costs on this link); None with fewer than two tree sizes."""
    points = [(float(n), float(s)) for n, s, *_ in round_times if s is not None]
    if len({n for n, _ in points}) < 2:
        return None
    mx = sum(n for n, _ in points) / len(points)
    my = sum(s for _, s in points) / len(points)
    slope = sum((n - mx) * (s - my) for n, s in points) / sum((n - mx) ** 2 for n, _ in points)
    return {"t0_s": my - slope * mx, "per_node_s": slope, "rounds": len(points)}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def make_row(
    *,
    setting: Setting,
    model_label: str,
    servers: int,
    split: str,
    link: str,
    new_tokens: int,
    prompt_tokens: int,
    plain: list[Sample],
    spec: list[Sample],
    command: str,
    code: str = "",
) -> dict[str, Any]:
    """One row: plain and speculative samples of the same prompt on the same swarm, side by side."""
    plain_s = [s.decode_s_per_token for s in plain]
    spec_s = [s.decode_s_per_token for s in spec]
    pooled = [r for s in spec for r in s.rounds]
    offered, accepted = acceptance_counts(pooled)
    per_run = []
    for s in spec:
        rounds = len(s.rounds) or 1
        per_run.append(
            {
                "decode_s_per_token": s.decode_s_per_token,
                "prefill_s": s.prefill_s,
                "total_s": s.total_s,
                "tokens": len(s.tokens),
                "rounds": len(s.rounds),
                "plain_rounds": sum(1 for r in s.rounds if r["depth"] == 0),
                "mean_depth": sum(r["depth"] for r in s.rounds) / rounds,
                "mean_nodes": sum(r["nodes"] for r in s.rounds) / rounds,
                "tokens_per_round": tokens_per_round(s.rounds),
                "planner_predicted": planner_predicted(s.rounds),
                "predicted_from_acceptance": predicted_from_acceptance(s.rounds),
                "drafter_begin_s": s.drafter_begin_s,
                "draft_s_per_round": s.draft_s / rounds,
                "head_s_per_round": s.head_s / rounds,
                "head_calls_per_round": s.head_calls / rounds,
                "round_trip_s_median": statistics.median(s.round_trip_s) if s.round_trip_s else None,
                "step_s_median": statistics.median(s.step_s) if s.step_s else None,
                # per round: (tree nodes, seconds of the tree step, seconds of the whole round trip)
                "round_times": [
                    [r["nodes"], st, rt]
                    for r, st, rt in zip(
                        s.rounds, s.step_s, s.round_trip_s or [None] * len(s.step_s), strict=False
                    )
                ],
                "strategy_stats": s.stats,
            }
        )

    def med(key: str) -> float | None:
        values = [r[key] for r in per_run if r[key] is not None]
        return statistics.median(values) if values else None

    matches = all(s.tokens == plain[0].tokens for s in spec)
    return {
        "setting": setting.key,
        "label": setting.label,
        "upper_bound": setting.upper_bound,
        "strategy": setting.strategy_choice(),
        "prompt": setting.prompt,
        "model_label": model_label,
        "servers": servers,
        "split": split,
        "link": link,
        "prompt_tokens": prompt_tokens,
        "new_tokens_max": new_tokens,
        "tokens": len(plain[0].tokens),
        "plain_s_per_token": _spread(plain_s),
        "spec_s_per_token": _spread(spec_s),
        "plain_runs_s": plain_s,
        "spec_runs_s": spec_s,
        "speedup": statistics.median(plain_s) / statistics.median(spec_s),
        "speedup_paired": [p / s for p, s in zip(plain_s, spec_s, strict=False)],
        "tokens_per_round": med("tokens_per_round"),
        "planner_predicted": med("planner_predicted"),
        "predicted_from_acceptance": med("predicted_from_acceptance"),
        "acceptance_by_depth": [a / o for a, o in zip(accepted, offered, strict=True)],
        "offered_by_depth": offered,
        "plain_rounds": med("plain_rounds"),
        "rounds": med("rounds"),
        "mean_depth": med("mean_depth"),
        "draft_s_per_round": med("draft_s_per_round"),
        "head_s_per_round": med("head_s_per_round"),
        "round_trip_s_median": med("round_trip_s_median"),
        "step_s_median": med("step_s_median"),
        "step_cost_fit": step_cost_fit([rt for run in per_run for rt in run["round_times"]]),
        "drafter_begin_s": med("drafter_begin_s"),
        "latency_floor_per_round_s": (servers + 1) * LINKS[link].delay_ms / 1000,
        "matches_plain": matches,
        "code": code,  # the commit the strategy and drafters were imported from
        "runs": per_run,
        "command": command,
        "notes": f"load average {os.getloadavg()[0]:.1f} at the end",
        "measured_at": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


# ---- the sweep -------------------------------------------------------------------------------------


def command_for(setting: str, servers: int, link: str, runs: int, new_tokens: int) -> str:
    extra = f" --runs {runs}" if runs != 3 else ""
    extra += f" --new-tokens {new_tokens}" if new_tokens != 64 else ""
    if setting.startswith("early-exit-"):
        what = f"--setting early-exit --blocks {setting.removeprefix('early-exit-')}"
    else:
        what = f"--setting {setting}"
    return f"python -m bench speculative --servers {servers} --link {link} {what}{extra}"


def run_group(
    servers: int,
    link_name: str,
    chosen: list[Setting],
    runs: int,
    new_tokens: int,
    threads: int,
    on_row: Callable[[dict[str, Any]], None],
    log: Callable[[str], None] = print,
    ready_timeout: float = 180.0,
) -> None:
    """Every chosen setting and plain decoding of each prompt they use, on one swarm."""
    from transformers import AutoTokenizer

    from bench.models import even_cuts, load_bench_model, split_label
    from bench.runner import swarm_client

    model = load_bench_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cuts = even_cuts(model.num_blocks, servers)
    link = parse_link(link_name)
    prompts = {kind: prompt_ids(tokenizer, kind) for kind in dict.fromkeys(s.prompt for s in chosen)}
    code = code_version()  # the plugins are imported by the warm-up below, from this checkout
    with swarm_client(model, cuts, link, threads, ready_timeout) as (client, _):
        log(f"{servers} servers, {link_name}: swarm ready; warm-up")
        for ids in prompts.values():
            plain_sample(client, ids, 4, pad)
        for s in chosen:
            speculative_sample(client, s, prompts[s.prompt], 4)
        plain: dict[str, list[Sample]] = {kind: [] for kind in prompts}
        spec: dict[str, list[Sample]] = {s.key: [] for s in chosen}
        for run in range(runs):
            for kind, ids in prompts.items():  # interleaved: load from elsewhere hits both alike
                plain[kind].append(plain_sample(client, ids, new_tokens, pad))
                log(f"  run {run + 1} plain {kind}: {plain[kind][-1].decode_s_per_token * 1000:.1f} ms/token")
                for s in (s for s in chosen if s.prompt == kind):
                    spec[s.key].append(speculative_sample(client, s, ids, new_tokens))
                    got = spec[s.key][-1]
                    log(
                        f"  run {run + 1} {s.key}: {got.decode_s_per_token * 1000:.1f} ms/token, "
                        f"{tokens_per_round(got.rounds):.2f} tokens/round"
                    )
        for s in chosen:
            on_row(
                make_row(
                    setting=s,
                    model_label=model.label,
                    servers=servers,
                    split=split_label(cuts),
                    link=link_name,
                    new_tokens=new_tokens,
                    prompt_tokens=prompts[s.prompt].shape[1],
                    plain=plain[s.prompt],
                    spec=spec[s.key],
                    command=command_for(s.key, servers, link_name, runs, new_tokens),
                    code=code,
                )
            )


def exit_agreement(blocks: list[int], new_tokens: int = 64, kind: str = "open") -> dict[int, float]:
    """Locally, no swarm: how often the target's first N blocks + final norm + LM head pick the full
    model's greedy token, along the full model's own greedy continuation of prompt ``kind`` (teacher
    forced). This bounds the early-exit drafter's depth-1 acceptance, whatever the planner does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.models import load_bench_model

    model_info = load_bench_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_info.path)
    model = AutoModelForCausalLM.from_pretrained(model_info.path, dtype=torch.float32).eval()
    ids = prompt_ids(tokenizer, kind)
    with torch.inference_mode():
        full = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
        out = model(full, output_hidden_states=True)
        start = ids.shape[1] - 1  # positions whose next token is a generated one
        target = out.logits[0, start:-1].argmax(-1)
        agreement = {}
        for n in blocks:
            exit_logits = model.lm_head(model.model.norm(out.hidden_states[n][0, start:-1]))
            agreement[n] = float((exit_logits.argmax(-1) == target).float().mean())
    return agreement


# ---- results: JSON and the table -------------------------------------------------------------------


def _key(row: dict[str, Any]) -> tuple:
    return (row["setting"], row["servers"], row["link"])


def load_results(path: Path = RESULTS_JSON) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not path.is_file():
        return [], {}
    data = json.loads(path.read_text())
    return list(data.get("results", [])), dict(data.get("meta", {}))


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged = {_key(r): r for r in old}
    merged.update({_key(r): r for r in new})
    order = ["lookup-grounded", "lookup-open", "early-exit", "self-draft"]

    def rank(r: dict[str, Any]) -> tuple:
        base = next(i for i, k in enumerate(order) if r["setting"].startswith(k))
        return (r["servers"], LINKS[r["link"]].delay_ms, base, r["setting"])

    return sorted(merged.values(), key=rank)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| setting | servers | link | tokens (prompt+new) | plain ms/token (min–max) | speculative ms/token "
        "(min–max) | speed-up | tokens/round: measured / planner / from acceptance | plain rounds of all "
        "| acceptance by depth 1.. | per round, ms: draft / LM head / tree step / whole round | same output | code | reproduce |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        p, s = r["plain_s_per_token"], r["spec_s_per_token"]
        label = f"**{r['setting']}** (upper bound)" if r["upper_bound"] else r["setting"]
        accept = " ".join(f"{a:.2f}" for a in r["acceptance_by_depth"]) or "–"
        rounds = "–" if r["rounds"] is None else f"{r['plain_rounds']:.0f} of {r['rounds']:.0f}"
        lines.append(
            f"| {label} | {r['servers']} ({r['split']}) | {link_text(r['link'])} "
            f"| {r['prompt_tokens']}+{r['tokens']} "
            f"| {_ms(p['median'])} ({_ms(p['min'])}–{_ms(p['max'])}) "
            f"| {_ms(s['median'])} ({_ms(s['min'])}–{_ms(s['max'])}) | {r['speedup']:.2f}× "
            f"| {_num(r['tokens_per_round'])} / {_num(r['planner_predicted'])} / "
            f"{_num(r['predicted_from_acceptance'])} | {rounds} | {accept} "
            f"| {_ms(r['draft_s_per_round'])} / {_ms(r['head_s_per_round'])} / {_ms(r.get('step_s_median'))} / "
            f"{_ms(r['round_trip_s_median'])} "
            f"| {'yes' if r['matches_plain'] else '**NO**'} | {r.get('code') or '?'} | `{r['command']}` |"
        )
    return head + "\n".join(lines) + ("\n" if lines else "")


def render_section(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [START, ""]
    if meta:
        lines += [
            f"Last measured {meta.get('date', '?')} on {meta.get('machine', '?')}, {meta.get('runs', '?')} runs "
            f"per row, load average {meta.get('load_average', '?')}; each row has its own `measured_at` in "
            "`bench/results/speculative.json`.",
            "",
        ]
    lines.append(render_table(rows) if rows else "_No results yet: run `python -m bench speculative`._\n")
    if meta.get("errors"):
        lines.append("Failed in the last run:\n")
        lines += [f"- {e}" for e in meta["errors"]]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def save(
    rows: list[dict[str, Any]], meta: dict[str, Any], path: Path = RESULTS_JSON, doc: Path = DOC
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc} lacks the markers {START} / {END}")
    before, rest = text.split(START, 1)
    doc.write_text(before + render_section(rows, meta) + rest.split(END, 1)[1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench speculative", description=__doc__.splitlines()[0])
    p.add_argument(
        "--servers", action="append", type=int, choices=(2, 3), help="repeatable; default: 2 and 3"
    )
    p.add_argument("--link", action="append", choices=("0ms", "20ms", "50ms"), help="default: 20ms and 50ms")
    p.add_argument("--setting", action="append", choices=SETTING_KEYS, help="repeatable; default: all")
    p.add_argument("--blocks", action="append", type=int, help="early-exit drafter blocks; default: 4, 6, 8")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--report-only", action="store_true", help="re-render the table from the JSON")
    p.add_argument(
        "--agreement",
        action="store_true",
        help="locally: early-exit top-1 agreement with the full model for --blocks (no swarm, no timing)",
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.new_tokens < 3:
        p.error("need --runs >= 1 and --new-tokens >= 3")
    args.servers = args.servers or [2, 3]
    args.link = args.link or ["20ms", "50ms"]
    args.setting = args.setting or list(SETTING_KEYS)
    args.blocks = args.blocks or [4, 6, 8]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.agreement:
        for n, share in exit_agreement(args.blocks, args.new_tokens).items():
            print(f"early exit after {n} of 30 blocks: top-1 agreement with the full model {share:.2f}")
        return 0
    old, meta = load_results()
    if args.report_only:
        save(old, meta)
        return 0
    from bench.models import load_bench_model

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(args.threads)
    every = settings(load_bench_model("smollm2").path, args.blocks)
    chosen = [s for s in every.values() if any(s.key.startswith(k) for k in args.setting)]
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for servers in args.servers:
        for link in args.link:
            done = len(rows)
            try:
                run_group(servers, link, chosen, args.runs, args.new_tokens, args.threads, rows.append)
            except KeyboardInterrupt:
                errors.append(f"{servers} servers, {link}: interrupted")
                break
            except Exception as exc:  # noqa: BLE001 - one broken swarm must not lose the others' rows
                errors.append(f"{servers} servers, {link}: {type(exc).__name__}: {exc}".splitlines()[0])
                print(f"{servers} servers, {link} failed: {exc!r}", file=sys.stderr)
            for r in rows[done:]:
                print(_one_line(r))
            save(merge(old, rows), _meta(args, load_before, errors))  # keep what is done so far
        else:
            continue
        break
    print(f"wrote {RESULTS_JSON} and {DOC}")
    for e in errors:
        print(f"failed: {e}", file=sys.stderr)
    return 1 if errors else 0


def code_version() -> str:
    """The checkout's commit, and "+changes" when the code under test (not bench/) differs from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "?"
    dirty = git("status", "--porcelain", "--", "bloombee_core", "plugins", "model_families").strip()
    return commit + (" +changes" if dirty else "")


def _meta(args: argparse.Namespace, load_before: float, errors: list[str]) -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {cpus} CPUs, {platform.system()}",
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "errors": errors,
        "load_average": f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end",
    }


def _one_line(r: dict[str, Any]) -> str:
    return (
        f"{r['setting']:<16} {r['servers']} servers {r['link']:>5}: plain {_ms(r['plain_s_per_token']['median'])} "
        f"ms/token, speculative {_ms(r['spec_s_per_token']['median'])} ms/token, ×{r['speedup']:.2f}, "
        f"{_num(r['tokens_per_round'])} tokens/round (planner {_num(r['planner_predicted'])}, "
        f"acceptance {_num(r['predicted_from_acceptance'])}), same output: {r['matches_plain']}"
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
