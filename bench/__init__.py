"""Benchmarks: WAN emulation, floors, scenarios and reports (run with `python -m bench` or `nox -s bench`)."""
