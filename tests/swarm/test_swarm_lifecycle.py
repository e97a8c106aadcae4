"""A script that leaves its distributed models and inference session open exits cleanly: no traceback
at interpreter exit, and nothing it started (DHT processes, p2pd daemons) outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
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
