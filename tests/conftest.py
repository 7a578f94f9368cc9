"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import Tapdisk, short_tempdir, spawn_tapdisk


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private run directory (BLKTAP_RUN_DIR) and device directory (BLKTAP_DEV_DIR).

    Kernel block devices are off unless a test turns them on (BLKTAP_BLOCKDEV=on).
    Every tapdisk still running from this run directory is killed afterwards.
    """
    with short_tempdir() as path:
        monkeypatch.setenv("BLKTAP_RUN_DIR", path)
        monkeypatch.setenv("BLKTAP_DEV_DIR", os.path.join(path, "dev"))
        monkeypatch.setenv("BLKTAP_BLOCKDEV", "off")
        try:
            yield path
        finally:
            for name in os.listdir(path):
                if name.startswith("ctl") and name[3:].isdigit():
                    Tapdisk(int(name[3:]), os.path.join(path, name)).kill()


@pytest.fixture
def tapdisk(run_dir: str) -> Iterator[Tapdisk]:
    """A freshly spawned (daemonized) tapdisk in ``run_dir``; killed afterwards."""
    td = spawn_tapdisk()
    try:
        yield td
    finally:
        td.kill()
