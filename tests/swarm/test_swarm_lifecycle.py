"""A script that leaves its distributed models and inference session open exits cleanly: no traceback
at interpreter exit, and nothing it started (DHT processes, p2pd daemons) outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from bench.swarm import live_session_members

from .conftest import kill_all

SCRIPT = textwrap.dedent(
    """
    import sys

    import torch

    from bloombee_core.client import AutoDistributedModelForCausalLM

    folder, peers = sys.argv[1], sys.argv[2:]
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, peers)
    idle = AutoDistributedModelForCausalLM.from_pretrained(folder, peers)  # never used
    opened = model.inference_session(max_length=16)
    session = opened.__enter__()  # never left
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    print("generated", session.position, flush=True)
    """
)


def test_unclosed_models_and_session_exit_silently(tmp_path, swarm, tiny_models, family_servers):
    family_servers["llama"]
    script = tmp_path / "leave_open.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_models["llama"]), *swarm.peers],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its session id is its pid: everything it starts can be found
    )
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    deadline = time.monotonic() + 10  # a daemon of the script's may take a moment to exit
    while (left := live_session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.25)
    commands = {pid: _command(pid) for pid in left}
    kill_all(left)
    assert proc.returncode == 0, err
    assert "generated 5" in out
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert not left, f"processes left behind by the script: {commands}"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


STACK_SCRIPT = textwrap.dedent(
    """
    import sys

    from bloombee_core import build, load_settings

    settings = load_settings(sys.argv[1])
    stack = build(settings)
    stack.start()  # a bootstrap node and a server, never closed
    print("started", len(stack.children), flush=True)
    """
)


def test_an_unclosed_stack_stops_its_swarm_at_exit(tmp_path, tiny_models):
    """A program that builds a whole swarm and ends without closing it: the children (bootstrap node,
    server, their DHT processes and p2pd daemons, each in its own process group) stop with it."""
    toml = tmp_path / "swarm.toml"
    toml.write_text(
        f"""
[model]
path = "{tiny_models["llama"]}"

[network]
bootstrap = true

[[server]]
blocks = "0:4"
"""
    )
    script = tmp_path / "leave_stack_open.py"
    script.write_text(STACK_SCRIPT)
    tag = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, str(script), str(toml)],
        env={**os.environ, "BLOOMBEE_TEST_TAG": tag},
        capture_output=True,
        text=True,
        timeout=240,
    )
    deadline = time.monotonic() + 10
    while (left := tagged_with(tag)) and time.monotonic() < deadline:
        time.sleep(0.25)
    commands = {pid: _command(pid) for pid in left}
    kill_all(left)
    assert result.returncode == 0, result.stderr
    assert "started 2" in result.stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert not left, f"processes left behind by the unclosed stack: {commands}"


def tagged_with(tag: str) -> list[int]:
    needle = f"BLOOMBEE_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes() and not _command(int(entry.name)).startswith(
                "torch_shm_manager"
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found
