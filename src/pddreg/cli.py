"""The ``pddreg`` command (placeholder until the command-line work lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("pddreg: the command line is being built")
