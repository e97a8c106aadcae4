"""The registries: discovery through entry points, clashes, unknown names, broken plugins, options."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from bloombee_core import ConfigError, PluginError, hookimpl, load_plugins
from bloombee_core.compression import Compressor

pytestmark = pytest.mark.usefixtures("third_party_plugins_installed")


def plugin_module(name: str, **hooks: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def test_third_party_plugin_is_discovered_with_its_distribution() -> None:
    plugins = load_plugins()
    info = plugins.plugins["compressors"]["example-xor"]
    assert (info.distribution, info.version, info.source) == ("bloombee-plugin-example", "0.3.1", "example")


def test_builtin_plugins_come_through_the_same_entry_point_group() -> None:
    plugins = load_plugins()
    builtin = {info.distribution for kind in plugins.plugins.values() for info in kind.values()}
    assert "bloombee" in builtin
    assert plugins.plugins["compressors"]["zstd"].distribution == "bloombee"


def test_broken_plugin_is_reported_by_name_and_skipped() -> None:
    plugins = load_plugins()
    failure = next(f for f in plugins.failures if f.source == "broken")
    assert failure.distribution == "bloombee-plugin-broken"
    assert "not-installed-anywhere" in failure.error
    assert "example-xor" in plugins.classes("compressors")  # the rest still loaded


def test_strict_mode_turns_a_broken_plugin_into_an_error() -> None:
    with pytest.raises(PluginError, match="'broken'.*bloombee-plugin-broken.*not-installed-anywhere"):
        load_plugins(strict=True)


def test_two_plugins_claiming_one_name_fail_naming_both() -> None:
    class Impostor(Compressor):
        name = "example-xor"

    impostor = plugin_module("impostor_plugin", bloombee_register_compressors=lambda: [Impostor])
    with pytest.raises(PluginError) as excinfo:
        load_plugins(extra=[impostor])
    message = str(excinfo.value)
    assert "'example-xor'" in message
    assert "bloombee_plugin_example.XorCompressor (bloombee-plugin-example 0.3.1)" in message
    assert "Impostor (passed in directly)" in message


def test_unknown_name_lists_the_installed_ones() -> None:
    plugins = load_plugins()
    with pytest.raises(ConfigError) as excinfo:
        plugins.create("compressors", "zstdd", "client.compressor")
    assert str(excinfo.value).startswith("client.compressor.name: unknown compressor 'zstdd'; installed: ")
    assert "example-xor" in str(excinfo.value) and "zstd-bytesplit" in str(excinfo.value)


def test_plugin_options_are_validated_and_name_the_key() -> None:
    plugins = load_plugins()
    xor = plugins.create("compressors", {"name": "example-xor", "key": 7}, "client.compressor")
    assert xor.options.key == 7
    hidden = torch.randn(2, 5, 8)
    assert torch.equal(xor.decode(xor.encode(hidden), hidden.dtype, (2, 5, 8)), hidden)
    with pytest.raises(ConfigError, match=r"^client\.compressor\.kee: unknown option$"):
        plugins.create("compressors", {"name": "example-xor", "kee": 7}, "client.compressor")
    with pytest.raises(
        ConfigError, match=r"^client\.compressor\.key: .*less than or equal to 255 \(got 300\)"
    ):
        plugins.create("compressors", {"name": "example-xor", "key": 300}, "client.compressor")


def test_a_hook_with_a_misspelled_name_takes_down_only_its_plugin() -> None:
    typo = plugin_module("typo_plugin", bloombee_register_compresors=lambda: [])
    plugins = load_plugins(extra=[typo])
    failure = next(f for f in plugins.failures if f.source == "typo_plugin")
    assert "bloombee_register_compresors" in failure.error and "matches no hook spec" in failure.error
    assert "example-xor" in plugins.classes("compressors")


def test_a_hook_returning_something_else_than_plugin_classes_is_reported() -> None:
    wrong = plugin_module("wrong_plugin", bloombee_register_compressors=lambda: [object])
    plugins = load_plugins(extra=[wrong], entry_points=False)
    assert "not a subclass of Compressor" in plugins.failures[0].error
    with pytest.raises(PluginError, match="wrong_plugin"):
        load_plugins(extra=[wrong], entry_points=False, strict=True)


def test_a_hook_that_raises_does_not_crash_the_host() -> None:
    def explode() -> list:
        raise RuntimeError("kaboom")

    bad = plugin_module("exploding_plugin", bloombee_register_compressors=explode)
    plugins = load_plugins(extra=[bad])
    assert any(f.source == "exploding_plugin" and "kaboom" in f.error for f in plugins.failures)


def test_importing_the_core_creates_no_plugin_manager_and_imports_no_plugin() -> None:
    code = (
        "import sys, pluggy, bloombee_core\n"
        "created = []\n"
        "pluggy.PluginManager.__init__ = lambda *a, **k: created.append(1)\n"
        "import bloombee_core.cli, bloombee_core.settings\n"
        "loaded = [m for m in sys.modules if m.startswith(('bloombee_family', 'bloombee_plugin', 'bloombee_compress'))]\n"
        "print(len(created), loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 []"
