"""swarm.toml: one declarative file, environment overrides, one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bloombee_core import ConfigError, build, load_plugins, load_settings
from bloombee_core.settings import check_plugin_choices

pytestmark = pytest.mark.usefixtures("third_party_plugins_installed")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "swarm.toml"
    path.write_text(text)
    return path


def test_embedded_default_is_a_two_server_demo_swarm() -> None:
    settings = load_settings()
    assert settings.network.bootstrap and settings.job.kind == "generate"
    assert [s.span() for s in settings.server] == [(0, 15), (15, 30)]


def test_a_full_file_round_trips(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            """
[model]
path = "/models/tiny"
dtype = "bfloat16"
[network]
initial_peers = ["/ip4/127.0.0.1/tcp/31337/p2p/QmPeer"]
[[server]]
blocks = "0:3"
offload = { name = "percent", weights_on_device = 50 }
[[server]]
num_blocks = 2
[client]
compressor = { name = "example-xor", key = 9 }
[job]
kind = "generate"
prompt = "Hello"
""",
        )
    )
    assert settings.model.dtype == "bfloat16"
    assert settings.server[0].offload.options() == {"weights_on_device": 50}
    assert settings.server[1].num_blocks == 2
    compressor = load_plugins().create("compressors", settings.client.compressor, "client.compressor")
    assert compressor.options.key == 9


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[job]\nprompt = "from file"\n')
    monkeypatch.setenv("BLOOMBEE_JOB__PROMPT", "from env")
    monkeypatch.setenv("BLOOMBEE_MODEL__DTYPE", "bfloat16")
    settings = load_settings(path)
    assert (settings.job.prompt, settings.model.dtype) == ("from env", "bfloat16")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[model]\npth = "x"\n', "model.pth: unknown key; did you mean 'path'?"),
        ('[modle]\npath = "x"\n', "modle: unknown key; did you mean 'model'?"),
        ('[[server]]\nblocks = "3:1"\n', "server[0].blocks: blocks must look like 'A:B' with A < B"),
        ('[job]\nmax_new_tokens = "many"\n', "job.max_new_tokens: Input should be a valid integer"),
        ('[model]\ndtype = "float8"\n', "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ('[[server]]\nblocks = "0:2"\nnum_blocks = 2\n', "server[0]: give either blocks or num_blocks"),
        ("[model\n", "not valid TOML"),
        ("[finetune]\nsteps = 0\n", "finetune.steps: Input should be greater than or equal to 1"),
    ],
)
def test_mistakes_give_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, text))
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[client]\ncompressor = "zstdd"\n',
            "client.compressor.name: unknown compressor 'zstdd'; installed: ",
        ),
        (
            '[client]\ncompressor = { name = "example-xor", kee = 1 }\n',
            "client.compressor.kee: unknown option",
        ),
        (
            '[[server]]\nblocks = "0:1"\noffload = { name = "percent", weights_on_device = "half" }\n',
            "server[0].offload.weights_on_device: ",
        ),
        ('[model]\nfamily = "gpt5"\n', "model.family: unknown model family 'gpt5'; installed: "),
        ('[finetune]\ntuning = { name = "lora", rr = 4 }\n', "finetune.tuning.rr: unknown option"),
    ],
)
def test_plugin_choices_are_checked_against_installed_plugins(
    tmp_path: Path, text: str, message: str
) -> None:
    settings = load_settings(write(tmp_path, text))
    with pytest.raises(ConfigError) as excinfo:
        check_plugin_choices(settings, load_plugins())
    assert message in str(excinfo.value)
    with pytest.raises(ConfigError):
        build(settings)
