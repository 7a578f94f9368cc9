"""The ``tapdisk`` command (placeholder until the daemon lands)."""

from __future__ import annotations


def main() -> int:
    raise SystemExit("tapdisk: not implemented yet")
