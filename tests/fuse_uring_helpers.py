"""FUSE over io_uring in tests: the ``fuse.enable_uring`` module parameter, set for one
test and put back afterwards (also when the test fails)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")


@contextlib.contextmanager
def uring_parameter(value: str) -> Iterator[None]:
    """Set ``fuse.enable_uring`` to ``value`` (``Y``/``N``) for the block, then restore
    the value it had. Skips the test on a kernel without FUSE over io_uring."""
    if not PARAMETER.exists():
        pytest.skip(f"this kernel has no FUSE over io_uring ({PARAMETER} is missing)")
    saved = PARAMETER.read_text().strip()
    PARAMETER.write_text(value)
    try:
        yield
    finally:
        PARAMETER.write_text(saved)
