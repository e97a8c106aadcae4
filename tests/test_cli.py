"""The `bloombee` command as a user runs it: exit codes, one-line errors, no tracebacks.

Most tests call the CLI's ``main`` in-process (each subprocess pays seconds of torch/transformers
imports); the ones about what a terminal sees run the real command in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bloombee_core.cli import main

pytestmark = pytest.mark.usefixtures("third_party_plugins_installed")
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["bootstrap", "serve", "generate", "api", "status", "run", "plugins", "config"]


def bloombee(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bloombee_core.cli", *args],
        env={**os.environ, "COLUMNS": "200"},  # wide enough that rich does not wrap table cells
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    """stderr without the warning about the (deliberately) broken plugin."""
    return [line for line in stderr.splitlines() if line and "plugin 'broken'" not in line]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main([command, "--help"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: bloombee {command}")


def test_plugins_json_lists_builtins_and_third_party_and_failures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {(p["kind"], p["name"]): p for p in report["plugins"]}
    assert names["compressors", "example-xor"]["distribution"] == "bloombee-plugin-example"
    assert names["transports", "hivemind"]["distribution"] == "bloombee"
    assert names["model_families", "llama"]["distribution"] == "bloombee"
    assert [f["entry_point"] for f in report["failures"]] == ["broken"]


def test_plugins_table_names_the_broken_plugin() -> None:
    result = bloombee("plugins")
    assert result.returncode == 0, result.stderr
    assert "example-xor" in result.stdout and "bloombee-plugin-example" in result.stdout
    assert "failed to load broken (bloombee-plugin-broken)" in result.stdout


def test_plugins_strict_fails_cleanly() -> None:
    result = bloombee("plugins", "--strict")
    assert result.returncode == 2
    assert result.stderr.startswith("error: plugin 'broken' (bloombee-plugin-broken) failed: ImportError")
    assert "Traceback" not in result.stderr


def test_config_check_accepts_a_good_file_and_the_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text('[client]\ncompressor = { name = "example-xor", key = 3 }\n')
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert len(examples) >= 3
    for example in examples:
        assert main(["config", "check", str(example)]) == 0, capsys.readouterr().err


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
def test_config_check_rejects_mistakes_in_one_line(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text(text)
    assert main(["config", "check", str(path)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_a_config_error_in_a_terminal_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text('[[server]]\nblocks = "5:2"\n')
    result = bloombee("config", "check", str(path))
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: server[0].blocks: blocks must look like 'A:B' with A < B (blocks A..B-1), got '5:2'"
    ]


def test_config_schema_is_json_schema_of_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    sections = {"model", "network", "server", "client", "job", "finetune", "api", "plugins"}
    assert set(schema["properties"]) == sections


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--blocks", "3:1"], "error: --blocks: blocks must look like 'A:B' with A < B"),
        (["--blocks", "0:1", "--num-blocks", "2"], "error: --blocks, --num-blocks: give either blocks or"),
        (["--num-blocks", "0"], "error: --num-blocks: Input should be greater than or equal to 1 (got 0)"),
        (
            ["--dtype", "float32", "--offload", "nope"],
            "error: server.offload.name: unknown offload policy 'nope'",
        ),
    ],
)
def test_serve_flags_are_the_server_settings_and_mistakes_name_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bloombee serve` flags are made from ServerSettings: the same validation, the flag named in the error."""
    assert main(["serve", "some-model", "--initial-peers", "/ip4/127.0.0.1/tcp/1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_serve_flags_mirror_every_server_setting() -> None:
    from bloombee_core.cli.flags import flag_name
    from bloombee_core.settings import ServerSettings

    usage = subprocess_free_help("serve")
    assert all(flag_name(name) in usage for name in ServerSettings.model_fields)


def subprocess_free_help(command: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([command, "--help"])
    return out.getvalue()


def test_api_flags_mirror_the_api_settings_and_mistakes_name_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    from bloombee_core.cli.flags import flag_name
    from bloombee_core.settings import ApiSettings

    usage = subprocess_free_help("api")
    assert all(flag_name(name) in usage for name in ApiSettings.model_fields)
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/1"]
    assert main(["api", "some-model", *peers, "--port", "70000"]) == 2
    assert "error: --port: Input should be less than or equal to 65535" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use fails at once, before any model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["api", "some-model", *peers, "--port", port]) == 2
    assert (
        f"error: the API cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    )
