"""Commands that only list or check stay fast: they import neither torch nor transformers nor hivemind.

Each command runs in a fresh interpreter, so what it imported is exactly what ``sys.modules`` holds
afterwards. Every installed plugin is loaded, the third-party examples included (they import torch
where they use it, as the plugin guide recommends).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs one command, then prints, as its last line, which heavy modules had been imported.
WRAPPER = """
import json, sys
from bloombee_core.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
heavy = [name for name in ("torch", "transformers", "hivemind") if name in sys.modules]
print(json.dumps({"status": status, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["plugins", "--json"], ["config", "check", "examples/one_machine_swarm.toml"]],
    ids=["help", "plugins", "config-check"],
)
@pytest.mark.usefixtures("third_party_plugins_installed")
def test_listing_and_checking_import_no_heavy_modules(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"status": 0, "heavy": []}, result.stderr
