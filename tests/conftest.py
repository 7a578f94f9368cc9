"""Fixtures shared by every test directory, and the end-of-run check for leftovers."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.helpers import (
    RUN_DIRS,
    Tapdisk,
    is_tapdisk_of,
    loops_backed_under,
    mounts_under,
    short_tempdir,
    spawn_tapdisk,
    sweep,
    tapdisks_under,
)

# The NBD fixtures (workdir, serve) of tests/system/test_nbd_server.py and
# tests/interop/test_nbd_clients.py.
pytest_plugins = ["tests.nbd_helpers"]

# Directories of this run besides RUN_DIRS (pytest's base temporary directory).
_RUN_TEMP: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _record_run_temp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Remember this run's tmp_path base, for the end-of-run check."""
    _RUN_TEMP.append(os.path.realpath(tmp_path_factory.getbasetemp()))


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private run directory (BLKTAP_RUN_DIR) and device directory (BLKTAP_DEV_DIR).

    Kernel block devices are off unless a test turns them on (BLKTAP_BLOCKDEV=on).
    Afterwards, whether the test passed or not: every tapdisk of this run directory (a
    tapdisk process bound to its ``ctl<pid>`` socket here; a stale socket's pid is left
    alone) is killed, and every mount under it and loop device backed by a file under it
    (a block device whose tapdisk died) is removed.
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
                    pid = int(name[3:])
                    if is_tapdisk_of(pid, path):
                        Tapdisk(pid, os.path.join(path, name)).kill()
            here = [os.path.realpath(path)]
            for device, _backing in loops_backed_under(here):
                subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)
            for point, _fstype in mounts_under(here):
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.fixture
def tapdisk(run_dir: str) -> Iterator[Tapdisk]:
    """A freshly spawned (daemonized) tapdisk in ``run_dir``; killed afterwards."""
    td = spawn_tapdisk()
    try:
        yield td
    finally:
        td.kill()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it left a tapdisk, a mount or a loop device behind.

    Only this run's resources are looked at: directories this process made
    (tests.helpers.RUN_DIRS, pytest's tmp_path base), tapdisks whose run directory or
    sockets lie there, mounts there, loop devices backed by files there (a FUSE file whose
    server is gone). Other test runs on the same host are never touched. What is found is
    reported, then removed.
    """
    prefixes = sorted(set(RUN_DIRS) | set(_RUN_TEMP))
    if not prefixes:
        return

    def leftovers() -> bool:
        return bool(tapdisks_under(prefixes) or mounts_under(prefixes)
                    or loops_backed_under(prefixes))

    # A tapdisk told to exit by the last test may take a moment to go.
    deadline = time.monotonic() + 5
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not leftovers():
        return
    found = sweep(prefixes)
    message = ("the test run left resources behind (removed now; a test or fixture is "
               "missing its cleanup):\n  " + "\n  ".join(found))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "leftovers", red=True, bold=True)
        reporter.write_line(message)
    else:
        print(message)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
