"""The `bloombee` command as a user runs it: a real subprocess, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("third_party_plugins_installed")
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["bootstrap", "serve", "generate", "status", "run", "plugins", "config"]


def bloombee(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bloombee_core.cli", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = bloombee(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: bloombee {command}")


def test_plugins_json_lists_builtins_and_third_party_and_failures() -> None:
    report = json.loads(bloombee("plugins", "--json", check=True).stdout)
    names = {(p["kind"], p["name"]): p for p in report["plugins"]}
    assert names["compressors", "example-xor"]["distribution"] == "bloombee-plugin-example"
    assert names["transports", "hivemind"]["distribution"] == "bloombee"
    assert names["model_families", "llama"]["distribution"] == "bloombee"
    assert [f["entry_point"] for f in report["failures"]] == ["broken"]


def test_plugins_table_names_the_broken_plugin() -> None:
    out = bloombee("plugins", check=True).stdout
    assert "example-xor" in out and "bloombee-plugin-example" in out
    assert "failed to load broken (bloombee-plugin-broken)" in out


def test_plugins_strict_fails_cleanly() -> None:
    result = bloombee("plugins", "--strict")
    assert result.returncode == 2
    assert result.stderr.startswith("error: plugin 'broken'") and "Traceback" not in result.stderr


def test_config_check_accepts_a_good_file_and_the_examples(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text('[client]\ncompressor = { name = "example-xor", key = 3 }\n')
    assert bloombee("config", "check", str(path), check=True).stdout.startswith("ok:")
    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert len(examples) >= 3
    for example in examples:
        result = bloombee("config", "check", str(example))
        assert result.returncode == 0, (example, result.stderr)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[client]\ncompressor = { name = "example-xor", key = "x" }\n', "error: client.compressor.key: "),
        (
            '[client]\ncompressor = "nope"\n',
            "error: client.compressor.name: unknown compressor 'nope'; installed:",
        ),
        ('[jbo]\nkind = "generate"\n', "error: jbo: unknown key; did you mean 'job'?"),
    ],
)
def test_config_check_rejects_mistakes_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text(text)
    result = bloombee("config", "check", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_config_schema_is_json_schema_of_the_settings() -> None:
    schema = json.loads(bloombee("config", "schema", check=True).stdout)
    assert set(schema["properties"]) == {"model", "network", "server", "client", "job", "plugins"}
