"""The layout tells the architecture: which part may import which, and files a reader takes in at once.

Imports are read from the source (every ``import`` statement, inside functions too), not from a running
interpreter, so a lazy import that breaks the layering is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "bloombee_core"
PLUGIN_PACKAGES = sorted(
    p.name for folder in ("plugins", "model_families") for p in (ROOT / folder).iterdir() if p.is_dir()
)
# runtime package -> runtime packages it must not import (the shared layers are swarm/ and the kernel)
FORBIDDEN = {
    "swarm": {"server", "client", "cli"},
    "model": {"swarm", "server", "client", "cli"},
    "server": {"client", "cli"},
    "client": {"server", "cli"},
    "api": {"server", "cli"},  # the HTTP API is a client of the swarm
}
MAX_RUNTIME_LINES = 400


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def core_files() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_core_never_imports_plugins_or_model_families():
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in core_files()
        for module in imported_modules(path)
        if module.split(".")[0] in PLUGIN_PACKAGES
    ]
    assert not offenders, offenders


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_runtime_packages_import_only_the_layers_below_them(package: str):
    offenders = []
    for path in sorted((CORE / package).rglob("*.py")):
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "bloombee_core" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, offenders


def test_no_runtime_file_is_longer_than_a_reader_takes_in_at_once():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in core_files()}
    long = {name: n for name, n in lengths.items() if n > MAX_RUNTIME_LINES}
    assert not long, long
