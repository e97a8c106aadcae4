"""The swarm commands as separate processes: status, generate, and `bloombee run` with a config file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bloombee_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        start_new_session=True,
    )


def test_status_lists_servers_spans_and_coverage(swarm, tiny_models, family_servers):
    family_servers["llama"]  # started on first use
    result = cli("status", "--initial-peers", *swarm.peers, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_name = {m["name"]: m for m in report["models"]}
    # a record names a local model by its folder's name, never by where the server keeps it
    assert tiny_models["llama"].name in by_name, (
        f"llama missing from the status report: {result.stdout} {result.stderr}"
    )
    assert str(tiny_models["llama"].parent) not in result.stdout
    llama = by_name[tiny_models["llama"].name]
    assert llama["num_blocks"] == 4 and llama["family"] == "llama"
    alive = [c for c in family_servers["llama"] if c.proc.poll() is None]
    assert {s["peer"] for s in llama["servers"]} >= {c.ready["peer"] for c in alive}
    assert all(count >= 1 for count in llama["coverage"])
    server = llama["servers"][0]
    assert server["throughput"] > 0 and server["cache_left"] > 0 and server["dtype"] == "float32"

    table = cli("status", "--initial-peers", *swarm.peers)
    assert table.returncode == 0, table.stderr
    assert "every block is served" in table.stdout and "throughput" in table.stdout


def test_status_highlights_missing_blocks():
    from rich.console import Console

    from bloombee_core.cli.status import render

    report = {
        "models": [
            {
                "key": "llama-x",
                "name": "demo",
                "family": "llama",
                "num_blocks": 6,
                "coverage": [1, 1, 0, 0, 1, 0],
                "servers": [],
            }
        ]
    }
    console = Console(record=True, width=120)
    render(report, console)
    assert "missing blocks: 2-3, 5" in console.export_text()


@pytest.mark.slow
def test_generate_command_streams_the_reference_reply(swarm, smollm2, smollm2_servers):
    prompt = "The capital of France is"
    result = cli(
        "generate",
        str(smollm2),
        "--initial-peers",
        *swarm.peers,
        "--prompt",
        prompt,
        "--no-chat",
        "--max-new-tokens",
        "8",
    )
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()


PROMPT = "The capital of France is"


def run_swarm_toml(toml: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`bloombee run --config toml`; afterwards no process it started may be left."""
    tag = uuid.uuid4().hex
    try:
        result = cli(
            "run", "--config", str(toml), env={**os.environ, **(env or {}), "BLOOMBEE_TEST_TAG": tag}
        )
    finally:
        leftovers = _tagged(tag)
        for pid, _ in leftovers:
            os.kill(int(pid), 9)
    assert not leftovers, leftovers
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reference_reply(folder: Path, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def swarm_toml(folder: Path, model_extra: str = "", network_extra: str = "") -> str:
    return f"""
[model]
path = "{folder}"
dtype = "float32"
{model_extra}

[network]
bootstrap = true
{network_extra}

[[server]]
blocks = "0:1"

[[server]]
num_blocks = 2

[job]
kind = "generate"
prompt = "{PROMPT}"
chat = false
max_new_tokens = 6
"""


def test_bloombee_run_with_a_config_file(tmp_path, tiny_with_tokenizer):
    """A whole swarm from one file (bootstrap + 2 servers + a generation), then nothing is left running;
    the reply is checked against transformers."""
    toml = tmp_path / "swarm.toml"
    toml.write_text(swarm_toml(tiny_with_tokenizer))
    result = run_swarm_toml(toml)
    assert "server-1: blocks 1:3" in result.stderr  # it chose the blocks nobody served
    # three compute-heavy processes (two servers, the client) share this machine's cores
    share = max(1, (os.cpu_count() or 1) // 3)
    assert result.stderr.count(f"(torch threads: {share})") == 2, result.stderr
    assert result.stdout.strip() == reference_reply(tiny_with_tokenizer, 6)


@pytest.mark.usefixtures("third_party_plugins_installed")
def test_transport_and_family_chosen_in_swarm_toml_are_the_ones_every_role_uses(
    tmp_path, tiny_with_tokenizer
):
    """network.transport and model.family name third-party plugins (bloombee-plugin-example) that are
    never picked by default; each notes its use with the process id. The bootstrap node, both servers
    and the client must have used them, and the reply is still exact."""
    log = tmp_path / "used.log"
    toml = tmp_path / "swarm.toml"
    toml.write_text(
        swarm_toml(
            tiny_with_tokenizer,
            model_extra='family = "example-llama"',
            network_extra='transport = "example-recording"',
        )
    )
    result = run_swarm_toml(toml, env={"BLOOMBEE_EXAMPLE_LOG": str(log)})
    assert result.stdout.strip() == reference_reply(tiny_with_tokenizer, 6)
    uses: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        pid, what = line.split(" ", 1)
        uses.setdefault(what, []).append(pid)
    peers, spans = uses.get("transport peer", []), uses.get("family span", [])
    assert len(peers) == 3 and len(set(peers)) == 3, uses  # bootstrap node and two servers
    assert sorted(spans) == sorted(p for p in peers if p in spans) and len(set(spans)) == 2, uses
    assert uses.get("transport client") == uses.get("family client"), uses  # the client job, one process
    assert len(uses.get("transport client", [])) == 1 and uses["transport client"][0] not in peers, uses


def _tagged(tag: str) -> list:
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"BLOOMBEE_TEST_TAG={tag}".encode() in environ and not cmd.startswith(b"torch_shm_manager"):
                found.append((entry.name, cmd[:120]))
    return found


GROUNDED = (
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog while the farmer "
    "watches from the old wooden fence."
)


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["prompt-lookup", '{"name": "early-exit", "blocks": 6}'])
def test_generate_with_speculative_decoding_equals_plain_greedy(swarm, smollm2, smollm2_servers, drafter):
    """The packaged SmolLM2 through three servers: `bloombee generate --drafter ...` prints the plain
    greedy reply, and how many tokens each round yielded."""

    def generate(*extra: str) -> subprocess.CompletedProcess:
        args = ["generate", str(smollm2), "--initial-peers", *swarm.peers, "--prompt", GROUNDED]
        return cli(*args, "--max-new-tokens", "24", *extra)

    plain, fast = generate(), generate("--drafter", drafter)
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr[-2000:]
    assert fast.stdout == plain.stdout
    assert "speculative decoding: " in fast.stderr and "per round" in fast.stderr


def test_bloombee_run_serves_the_api_job_and_sigterm_stops_everything(tmp_path, tiny_with_tokenizer):
    """``[job] kind = "api"``: a whole swarm and its HTTP API from one file; the API answers like
    transformers; SIGTERM to ``bloombee run`` stops every process it started."""
    import signal
    import urllib.request

    from bloombee_core.stack import Child

    toml = tmp_path / "swarm.toml"
    text = swarm_toml(tiny_with_tokenizer).replace('kind = "generate"', 'kind = "api"')
    toml.write_text(text + '\n[api]\nport = 0\nname = "tiny"\n')
    tag = uuid.uuid4().hex
    os.environ["BLOOMBEE_TEST_TAG"], outer = tag, os.environ["BLOOMBEE_TEST_TAG"]
    try:
        stack = Child("run-api", ["bloombee_core.cli", "run", "--config", str(toml)], tmp_path)
    finally:
        os.environ["BLOOMBEE_TEST_TAG"] = outer
    try:
        url = stack.wait_ready()["url"]
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
        assert reply["choices"][0]["text"].strip() == reference_reply(tiny_with_tokenizer, 6)
        assert reply["usage"]["completion_tokens"] == 6
        os.kill(stack.proc.pid, signal.SIGTERM)
        assert stack.proc.wait(60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 20
        while _tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not _tagged(tag), _tagged(tag)
    finally:
        stack.stop()
        for pid, _ in _tagged(tag):
            os.kill(int(pid), 9)
