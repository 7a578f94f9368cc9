"""Placeholder until the command lands."""

from __future__ import annotations


def main() -> int:
    raise SystemExit("not implemented yet")
