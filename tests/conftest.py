"""Shared fixtures. Area-specific fixtures live beside their tests (tests/*_helpers.py, subfolders)."""

from __future__ import annotations

import importlib.metadata

import pytest

THIRD_PARTY = ("bloombee-plugin-example", "bloombee-plugin-broken")


@pytest.fixture(scope="session")
def third_party_plugins_installed() -> None:
    """The example plugin packages must be pip-installed, as `nox -s tests` does."""
    for dist in THIRD_PARTY:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(
                f"{dist} is not installed; run the suite with `nox -s tests`, or "
                f"`pip install --no-deps tests/plugin_packages/{dist}`"
            )


@pytest.fixture
def bench_children(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every process a benchmark swarm starts (``bench.swarm.Child``), recorded as it starts."""
    import bench.swarm

    started: list[bench.swarm.Child] = []
    original = bench.swarm.Child.__init__

    def remember(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(bench.swarm.Child, "__init__", remember)
    return started
