"""Meta-tests: every hook spec is documented with its exact signature and has a test of its own."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from bloombee_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
SPECS = [name for name, fn in vars(hookspecs).items() if name.startswith("bloombee_") and callable(fn)]


def signature_line(name: str) -> str:
    fn = getattr(hookspecs, name)
    params = ", ".join(inspect.signature(fn).parameters)
    return f"def {name}({params}) -> {fn.__annotations__['return']}"


def test_there_is_one_register_hook_per_kind() -> None:
    from bloombee_core.registry import KINDS

    assert sorted(SPECS) == sorted(kind.hook for kind in KINDS.values())


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_documented_with_its_exact_signature(name: str) -> None:
    docs = (ROOT / "docs" / "hooks.md").read_text()
    assert signature_line(name) in docs


@pytest.mark.parametrize("name", SPECS)
def test_hook_has_a_test(name: str) -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert re.search(rf"^def test_hook_{name}\(", tests, re.M)
