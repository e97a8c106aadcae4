"""Declarative settings: one ``swarm.toml`` (plus ``BLOOMBEE_``-prefixed environment overrides).

Environment variables override the file; nested keys use ``__``, e.g. ``BLOOMBEE_JOB__PROMPT="Hi"`` or
``BLOOMBEE_MODEL__DTYPE=bfloat16``. Plugin choices are a name with the plugin's own options beside it
(``compressor = { name = "zstd", level = 3 }``); those options are validated against the plugin's
``Options`` model once plugins are loaded (:func:`check_plugin_choices`).
"""

from __future__ import annotations

import contextvars
import difflib
import importlib.resources
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bloombee_core.about import DEFAULT_MODEL
from bloombee_core.api.settings import ApiSettings
from bloombee_core.dtypes import DtypeName
from bloombee_core.errors import ConfigError, dotted

if TYPE_CHECKING:
    from bloombee_core.registry import PluginSet

_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("bloombee_toml_path", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginChoice(BaseModel):
    """A plugin picked by ``name``; every other key is an option of that plugin."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def choice(name: str, description: str | None = None) -> Any:
    """A field choosing a plugin, ``name`` by default."""
    return Field(default_factory=lambda: PluginChoice(name=name), description=description)


class ModelSettings(_Section):
    path: str = Field(DEFAULT_MODEL, description="Hub id, local folder or .gguf file.")
    dtype: DtypeName = Field("float32", description="Weights and hidden states dtype.")
    family: str | None = Field(
        None, description="Model-family adapter; default: chosen by config.model_type."
    )


class NetworkSettings(_Section):
    initial_peers: list[str] = Field(
        default_factory=list, description="Multiaddrs of peers already in the swarm."
    )
    bootstrap: bool = Field(False, description="Start a DHT bootstrap node as part of this stack.")
    listen: list[str] = Field(
        default_factory=list,
        description="Multiaddrs the bootstrap node listens on, e.g. /ip4/0.0.0.0/tcp/31337.",
    )
    identity: Path | None = Field(
        None, description="Private-key file of the bootstrap node, created if missing (a stable peer id)."
    )
    transport: PluginChoice = choice("hivemind", description="How peers find each other and talk.")

    @field_validator("initial_peers", mode="before")
    @classmethod
    def _split_peers(cls, value: Any) -> Any:
        """Several multiaddrs may come as one comma- or space-separated string (a flag, an env var)."""
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list):
            return value
        return [part for v in values for part in str(v).replace(",", " ").split()]


BLOCKS_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_blocks(text: str) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)``: blocks A..B-1."""
    match = BLOCKS_RE.match(text)
    if not match or int(match[1]) >= int(match[2]):
        raise ValueError(f"blocks must look like 'A:B' with A < B (blocks A..B-1), got {text!r}")
    return int(match[1]), int(match[2])


class ServerSettings(_Section):
    blocks: str | None = Field(None, description="Span to host, 'A:B' (blocks A..B-1).")
    num_blocks: int | None = Field(
        None,
        ge=1,
        description="Without blocks: host this many blocks where they raise the swarm's throughput most.",
    )
    rebalance_every: float = Field(
        120.0,
        ge=0,
        description="Seconds between checks whether moving to other blocks would raise the swarm's "
        "throughput clearly (servers without blocks only; 0: never move).",
    )
    throughput: float | None = Field(
        None, gt=0, description="Tokens/s to announce instead of measuring the span (at start, after a move)."
    )
    device: str = Field("cpu", description="Where the blocks compute: cpu, cuda, cuda:1 ...")
    dtype: DtypeName | None = Field(
        None, description="Weights and hidden states dtype; default: model.dtype."
    )
    listen: list[str] = Field(default_factory=list, description="Multiaddrs to listen on.")
    announce: list[str] = Field(default_factory=list, description="Multiaddrs to announce (e.g. a proxy's).")
    identity: Path | None = Field(
        None, description="Private-key file, created if missing (a stable peer id)."
    )
    public_name: str | None = Field(None, description="A name shown by `bloombee status`.")
    cache_bytes: int | None = Field(None, ge=0, description="KV-cache memory budget in bytes.")
    memory_budget: ByteSize | None = Field(
        None,
        gt=0,
        description="Most memory the server may use (RSS on cpu, allocated device memory on a GPU), "
        "e.g. 2GiB: weights that do not fit stream from CPU memory or disk; sessions beyond it are busy.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch compute threads; default: this machine's share (bloombee run splits cores).",
    )
    ttl: float = Field(
        30.0, gt=0, description="Seconds the server's DHT records live (refreshed every ttl/3)."
    )
    batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Most milliseconds a due inference step waits for other sessions' steps to share "
        "its forward (0: batch only what is already queued).",
    )
    max_batch_tokens: int = Field(
        256,
        ge=0,
        description="Tokens (rows x new tokens) of all steps in one batched forward; larger steps run "
        "alone; 0 turns cross-session batching off.",
    )
    offload: PluginChoice = choice(
        "none", description="Offload policy: where the span's weights and KV cache live."
    )
    compressor: PluginChoice = choice(
        "auto",
        description="Compressor for the hidden states this server sends; auto: per message and link, "
        "lossless zstd-exponent where it gets the tensor across sooner, else raw.",
    )

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, value: str | None) -> str | None:
        if value is not None:
            parse_blocks(value)
        return value

    @model_validator(mode="after")
    def _one_span_rule(self) -> ServerSettings:
        if self.blocks is not None and self.num_blocks is not None:
            raise ValueError("give either blocks or num_blocks, not both")
        return self

    def span(self) -> tuple[int, int] | None:
        return parse_blocks(self.blocks) if self.blocks else None


class ClientSettings(_Section):
    compressor: PluginChoice = choice(
        "auto",
        description="Compressor for the hidden states the client sends; auto: per message and link, "
        "lossless zstd-exponent where it gets the tensor across sooner, else raw.",
    )
    decoding: PluginChoice = choice(
        "greedy", description="Decoding strategy: greedy, sampling, speculative ..."
    )
    micro_batch: int | Literal["auto"] = Field(
        "auto",
        description="Rows per micro-batch of a batched generation (pipelined over the servers); "
        "auto: chosen from measured latency and compute, off where it cannot pay; 0: off.",
    )
    prefill_chunk: int | Literal["auto"] = Field(
        "auto",
        description="Tokens per chunk of a long prompt's prefill (chunks pipelined over the servers); 0: off.",
    )

    @field_validator("micro_batch", "prefill_chunk")
    @classmethod
    def _not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be 'auto' or a non-negative integer, got {value}")
        return value


class JobSettings(_Section):
    kind: Literal["generate", "finetune", "api", "none"] = Field(
        "none", description="What the client does: generate, finetune, api (serve the HTTP API), none."
    )
    prompt: str = Field("Explain DHTs in one sentence.", description="What the job generates from.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens to generate at most.")
    chat: bool = Field(True, description="Wrap the prompt in the tokenizer's chat template when it has one.")


class FinetuneSettings(_Section):
    """A finetune job: train a tuning method on a text file through the swarm, save it, compare replies."""

    data: Path | None = Field(None, description="Plain-text file to train on (relative: to the cwd).")
    steps: int = Field(30, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per step.")
    seq_len: int = Field(64, ge=2, description="Tokens per sequence (the text is cut into pieces this long).")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate.")
    tuning: PluginChoice = choice("lora", description="Tuning method: lora, prompt, deep-prompt ...")
    output: Path = Field(Path("finetuned"), description="Folder the trained parameters are saved to.")
    seed: int = Field(0, description="Seed of the batches' order (and of torch, for the method's init).")


class PluginsSettings(_Section):
    strict: bool = Field(False, description="A plugin that fails to load is an error instead of a warning.")


class BootstrapJob(_Section):
    """What a bootstrap node reads: where to listen, which identity, which transport."""

    network: NetworkSettings = Field(default_factory=NetworkSettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)


class ServerJob(_Section):
    """Everything one server process reads: the model, how to reach the swarm, its own settings.

    ``bloombee serve`` builds it from flags; ``bloombee run`` hands it to each server process as JSON.
    """

    model: ModelSettings = Field(default_factory=ModelSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)


class ClientJob(_Section):
    """What a client job reads: the model, the swarm, the client's plugins, the job itself."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    job: JobSettings = Field(default_factory=JobSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)


class Settings(BaseSettings):
    """Everything a stack needs: which model, which network, which servers, which client job."""

    model_config = SettingsConfigDict(env_prefix="BLOOMBEE_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    server: list[ServerSettings] = Field(default_factory=list)
    client: ClientSettings = Field(default_factory=ClientSettings)
    job: JobSettings = Field(default_factory=JobSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and validate a swarm.toml (``None``: the embedded default swarm).

    :raises ConfigError: naming the offending key, in one line.
    """
    file = Path(path) if path is not None else default_settings_path()
    if not file.is_file():
        raise ConfigError("", f"settings file {str(file)!r} does not exist")
    try:
        with file.open("rb") as fh:
            tomllib.load(fh)  # a clearer message than pydantic's for TOML syntax errors
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{file}: not valid TOML: {exc}") from None
    token = _toml_path.set(file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc) from None
    finally:
        _toml_path.reset(token)


def default_settings_path() -> Path:
    return Path(str(importlib.resources.files("bloombee_core") / "default_swarm.toml"))


def settings_error(exc: ValidationError) -> ConfigError:
    """Turn pydantic's report into one line that names the key."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = dotted(err["loc"])
    if err["type"] == "extra_forbidden":
        hint = _closest(loc)
        return ConfigError(key, "unknown key" + (f"; did you mean {hint!r}?" if hint else ""))
    message = err["msg"].removeprefix("Value error, ")
    shown = err.get("input")
    if err["type"] != "missing" and not isinstance(shown, dict | list) and repr(shown) not in message:
        message += f" (got {shown!r})"
    more = len(exc.errors()) - 1
    return ConfigError(key, message + (f" (and {more} more error{'s' * (more > 1)})" if more else ""))


def _closest(loc: list[str]) -> str | None:
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))[0]
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
    matches = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return matches[0] if matches else None


# which registry a plugin-choice field picks from, by the field's name (wherever it appears)
CHOICE_KINDS = {
    "transport": "transports",
    "compressor": "compressors",
    "decoding": "decoding_strategies",
    "offload": "offload_policies",
    "drafter": "drafters",  # inside the speculative strategy's options
    "tuning": "tuning_methods",
}


def plugin_choices(
    settings: BaseModel, prefix: tuple[str | int, ...] = ()
) -> list[tuple[str, tuple[str | int, ...], PluginChoice]]:
    """Every plugin choice in ``settings`` (a :class:`Settings`, a role's job, a plugin's options) as
    ``(kind, key path, choice)``."""
    found: list[tuple[str, tuple[str | int, ...], PluginChoice]] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            key = (*prefix, name) if index is None else (*prefix, name, index)
            if isinstance(item, PluginChoice):
                found.append((CHOICE_KINDS[name], key, item))
            elif isinstance(item, BaseModel):
                found.extend(plugin_choices(item, key))
    return found


def check_plugin_choices(settings: BaseModel, plugins: PluginSet) -> None:
    """Validate each chosen plugin's name and options (and ``model.family``) against the installed plugins."""
    _check_choices(settings, (), plugins)
    model = getattr(settings, "model", None)
    if model is not None and model.family:
        plugins.get("model_families", model.family, "model.family")


def _check_choices(settings: BaseModel, prefix: tuple[str | int, ...], plugins: PluginSet) -> None:
    for kind, key, chosen in plugin_choices(settings, prefix):
        plugin = plugins.create(kind, chosen, dotted(key))
        _check_choices(plugin.options, key, plugins)  # a plugin's own choices (a drafter in a strategy)
